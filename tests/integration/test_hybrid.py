"""Floating IPs on a hardware-gateway network (the seed's "hybrid" option, nova's ebtables
redirect), through a real salt-master and minions, with real DHCP clients (the namespace lab):

    network hw  172.16.100.0/24  br300 on eth4 (segment seg-hw), gateway_mode hardware:
                the router's eth1 (172.16.100.1) is the VMs' gateway
    compute2    br300 172.16.100.4   hw1 172.16.100.10, floating IP 203.0.113.51
    compute1    br300 172.16.100.3   (hw1 moves here in the last test)
    router      eth0 203.0.113.1 on the public segment, eth1 172.16.100.1 on seg-hw

The VM keeps the hardware router as its default gateway (its lease says so), and the host
still does not route its traffic, except what leaves the network from an address whose
floating IP the host holds (and, with ``force_snat_range``, what goes to those ranges):
the bridge hands those frames to the host's IP stack, where the floating IP's SNAT runs,
so upstream sees the floating IP, as with a host-gatewayed network.
"""

import copy
import os
import sys

import pytest
from hanet_checks import eventually, state_apply

pytestmark = pytest.mark.lab

ROUTER, HW_ROUTER = "203.0.113.1", "172.16.100.1"
VM, FIXED, FIP = "hw1", "172.16.100.10", "203.0.113.51"
SOURCE_IP = {"compute1": "203.0.113.11", "compute2": "203.0.113.12"}


def whoami(lab, node=VM, host=ROUTER, timeout=3):
    cp = lab.exec(node, ["curl", "-sS", "--max-time", str(timeout), f"http://{host}/whoami"], timeout=timeout + 10)
    return cp.stdout.strip() if cp.returncode == 0 else None


def pillar_with(base, fip=True, force=(), host=None):
    p = copy.deepcopy(base)
    inst = p["hanet"]["instances"][VM]
    inst["floating_ips"] = [{"address": FIP, "fixed_ip": FIXED}] if fip else []
    p["hanet"]["force_snat_range"] = list(force)
    if host:
        inst["host"] = host
    return p


@pytest.fixture(scope="module")
def base(lab):
    from hanet_lab.pillar import lab_pillar

    p = lab_pillar(lab.topology)
    assert p["hanet"]["networks"]["hw"]["gateway_mode"] == "hardware"
    assert p["hanet"]["instances"][VM]["host"] == "compute2"
    lab.set_pillar(pillar_with(p))
    state_apply(lab)
    lab.plug_vm(VM)
    lease = lab.dhcp(VM, "dhclient")
    assert (lease["address"], lease["router"]) == (FIXED, HW_ROUTER), lease
    httpd = os.path.join(os.path.dirname(sys.modules["hanet_lab"].__file__), "httpd.py")
    lab.popen(VM, [sys.executable, httpd, VM, "80", os.path.join(lab.rundir, f"http-{VM}.log")], name=f"httpd-{VM}")
    return p


def apply(lab, pillar):
    lab.set_pillar(pillar)
    state_apply(lab)


def test_the_vm_s_connections_leave_as_its_floating_ip(lab, base):
    apply(lab, pillar_with(base))
    assert eventually(lambda: whoami(lab), FIP) == FIP
    # the VM's gateway is still the hardware router: only what leaves the network is
    # routed by the host, the router's own segment address is reached directly
    assert f"default via {HW_ROUTER}" in lab.exec(VM, ["ip", "route"], check=True).stdout
    assert whoami(lab, host=HW_ROUTER) == FIXED


def test_upstream_reaches_the_vm_by_its_floating_ip(lab, base):
    apply(lab, pillar_with(base))
    cp = lab.exec("router", ["curl", "-sS", "--max-time", "3", f"http://{FIP}/whoami"], timeout=15)
    assert cp.returncode == 0 and cp.stdout.strip() == ROUTER, cp.stderr


def test_without_a_floating_ip_the_vm_leaves_through_the_hardware_router(lab, base):
    apply(lab, pillar_with(base, fip=False))
    assert eventually(lambda: whoami(lab), FIXED) == FIXED
    table = lab.exec("compute2", ["nft", "list", "table", "bridge", "hanet"], check=True).stdout
    assert f"ip saddr {FIXED}" not in table and "169.254.169.254" in table  # metadata only
    # and back: the redirect comes with the floating IP
    apply(lab, pillar_with(base))
    assert eventually(lambda: whoami(lab), FIP) == FIP


def test_force_snat_range_is_routed_by_the_host_for_every_vm(lab, base):
    """No floating IP, a force_snat_range covering the router: SNAT to the host's
    routing_source_ip, as nova's force_snat_range did on hardware-gateway networks."""
    apply(lab, pillar_with(base, fip=False, force=[f"{ROUTER}/32"]))
    assert eventually(lambda: whoami(lab), SOURCE_IP["compute2"]) == SOURCE_IP["compute2"]
    assert whoami(lab, host=HW_ROUTER) == FIXED  # not in the range: the router directly


def test_the_floating_ip_follows_a_migrated_vm(lab, base):
    """hw1 moves to compute1 (the pillar says so, applied; then its tap moves, as a live
    migration does): its connections leave as its floating IP through compute1 now."""
    apply(lab, pillar_with(base))
    assert eventually(lambda: whoami(lab), FIP) == FIP
    try:
        apply(lab, pillar_with(base, host="compute1"))
        lab.move_vm(VM, "compute1")
        assert eventually(lambda: whoami(lab), FIP, timeout=10) == FIP
        assert any(a.split("/")[0] == FIP for a in lab.addresses("compute1", "eth0"))
        assert not any(a.split("/")[0] == FIP for a in lab.addresses("compute2", "eth0"))
        cp = lab.exec("router", ["curl", "-sS", "--max-time", "3", f"http://{FIP}/whoami"], timeout=15)
        assert cp.returncode == 0 and cp.stdout.strip() == ROUTER, cp.stderr
    finally:
        apply(lab, pillar_with(base))
        lab.move_vm(VM, "compute2")


def test_the_floating_ip_follows_an_evacuated_vm(lab, base):
    """compute2 loses power; hw1 is evacuated to compute1 (the pillar says so, applied on
    compute1, and the VM boots there): the router's ARP entry for the floating IP follows
    compute1's announcement, upstream reaches hw1 by it and hw1 leaves as it again."""
    from hanet_lab import chaos

    apply(lab, pillar_with(base))
    assert eventually(lambda: whoami(lab), FIP) == FIP
    assert lab.arp_cache("router")[FIP]["mac"] == lab.mac("compute2", "eth0")
    chaos.power_off(lab, "compute2")
    try:
        lab.set_pillar(pillar_with(base, host="compute1"))
        state_apply(lab, tgt="compute1")
        lab.unplug_vm(VM)
        lab.plug_vm(VM, host="compute1")
        lease = lab.dhcp(VM, "dhclient")
        assert (lease["address"], lease["router"]) == (FIXED, HW_ROUTER), lease
        assert lab.arp_cache("router")[FIP]["mac"] == lab.mac("compute1", "eth0")
        cp = lab.exec("router", ["curl", "-sS", "--max-time", "3", f"http://{FIP}/whoami"], timeout=15)
        assert cp.returncode == 0 and cp.stdout.strip() == ROUTER, cp.stderr
        assert eventually(lambda: whoami(lab), FIP, timeout=10) == FIP
    finally:
        chaos.power_on_started(lab, "compute2")
        apply(lab, pillar_with(base))
        lab.unplug_vm(VM)
        lab.plug_vm(VM)
        assert lab.dhcp(VM, "dhclient")["address"] == FIXED


@pytest.mark.parametrize("fip", [True, False], ids=["with-floating-ip", "without"])
def test_the_vm_reads_its_metadata_with_nothing_configured_on_the_router(lab, base, fip):
    """The router has no route for 169.254.169.254 (the lab's router never had one): the
    bridge hands the request to the host serving the VM, whose metadata service answers."""
    assert "169.254" not in lab.exec("router", ["ip", "route"], check=True).stdout
    apply(lab, pillar_with(base, fip=fip))
    url = "http://169.254.169.254/latest/meta-data/local-ipv4"
    assert eventually(lambda: _get(lab, VM, url), FIXED) == FIXED


def _get(lab, node, url):
    cp = lab.exec(node, ["curl", "-sS", "--max-time", "3", url], timeout=15)
    return cp.stdout.strip() if cp.returncode == 0 else None


def test_the_host_routes_what_it_takes_off_the_bridge_only_to_the_public_side(lab, base):
    """db1 (network private, on compute2 too) is reachable from hw1 only through the
    hardware router, which does not route to it: compute2 must not forward hw1's frames
    into br100 behind the router's back, although it takes them off br300."""
    apply(lab, pillar_with(base))
    if "db1" not in lab.plugged:
        lab.plug_vm("db1")
    assert lab.dhcp("db1", "udhcpc")["address"] == "192.168.0.11"
    assert lab.ping("compute2", "192.168.0.11", count=1)  # db1 is there
    assert not lab.ping(VM, "192.168.0.11", count=2)
    assert whoami(lab) == FIP  # and the public side still works
