"""Floating IPs on a hardware-gateway network served by network hosts (the seed's
"hybrid" option where a failover moves the floating IPs), through a real salt-master and
minions, with real DHCP clients and a real power loss:

    network hw  172.16.100.0/24  br300 on eth4 (segment seg-hw), gateway_mode hardware,
                network_hosts [net1, net2], dhcp_server 172.16.100.2 (held by the owner)
    router      eth1 172.16.100.1 on seg-hw: the network's gateway; eth0 203.0.113.1
    compute2    hw1 172.16.100.10, floating IP 203.0.113.51
    compute1    hw2 172.16.100.11, no floating IP
    net1, net2  br300 172.16.100.5 / .6; the owner adds 172.16.100.2 (DHCP, the floating
                IP's NAT) and the floating IP on eth0

dnsmasq on the owner hands hw2 the hardware router and hw1, which has a floating IP, the
dhcp_server: hw1's connections leave through the owner as its floating IP, and both
move together in a failover or an evacuation. The tests check what an operator would:
who each VM's router is, the source the upstream router sees, that upstream reaches hw1
by its floating IP, metadata, and all of it again after the owner loses power and after
a planned move back.
"""

import copy
import os
import sys
import time

import pytest
from hanet_checks import eventually, holders, state_apply

pytestmark = pytest.mark.lab

NET = "hw"
ROUTER, HW_ROUTER, SERVER = "203.0.113.1", "172.16.100.1", "172.16.100.2"
FIP = "203.0.113.51"
VMS = {
    "hw1": ("compute2", "fa:16:3e:00:02:01", "172.16.100.10"),
    "hw2": ("compute1", "fa:16:3e:00:02:02", "172.16.100.11"),
}
METADATA = "http://169.254.169.254/latest/meta-data/local-ipv4"


@pytest.fixture(scope="module")
def lab_topology():
    from hanet_lab import default_topology
    from hanet_lab.topology import VM, Nic

    topo = default_topology(hosts=4)
    for name, (host, mac, _) in VMS.items():
        topo.vms[name] = VM(name=name, host=host, nics=[Nic(bridge="br300", mac=mac)])
    return topo


def nh_pillar(lab):
    from hanet_lab.pillar import lab_pillar

    p = copy.deepcopy(lab_pillar(lab.topology))
    h = p["hanet"]
    h["networks"][NET].update(multi_host=False, network_hosts=["net1", "net2"], dhcp_server=SERVER)
    for c in ("compute1", "compute2"):
        h["hosts"][c]["networks"].pop(NET)
    h["hosts"]["net1"]["networks"][NET] = {"address": "172.16.100.5"}
    h["hosts"]["net2"]["networks"][NET] = {"address": "172.16.100.6"}
    for name, (host, mac, ip) in VMS.items():
        h["instances"][name] = {"host": host, "nics": [{"network": NET, "mac": mac, "ip": ip}]}
    h["instances"]["hw1"]["floating_ips"] = [{"address": FIP, "fixed_ip": VMS["hw1"][2]}]
    return p


@pytest.fixture(scope="module")
def cluster(lab):
    lab.set_pillar(nh_pillar(lab))
    state_apply(lab, sorted(lab.topology.hosts), timeout=300)
    httpd = os.path.join(os.path.dirname(sys.modules["hanet_lab"].__file__), "httpd.py")
    for vm in VMS:
        lab.plug_vm(vm)
        lab.popen(vm, [sys.executable, httpd, vm, "80", os.path.join(lab.rundir, f"http-{vm}.log")], name=f"httpd-{vm}")
    time.sleep(2)  # the beacons' first verdicts (peers up)
    return lab


def http(lab, node, url, timeout=3):
    cp = lab.exec(node, ["curl", "-sS", "--max-time", str(timeout), url], timeout=timeout + 10)
    return cp.stdout.strip() if cp.returncode == 0 else None


def served_as_before(lab, owner):
    """What an operator checks on the network: one owner holds the dhcp_server and the
    floating IP, hw1 leaves as its floating IP and is reached by it, hw2 leaves with its
    own address through the hardware router, and hw1 reads its metadata."""
    assert holders(lab, SERVER) == [owner] and holders(lab, FIP) == [owner]
    assert eventually(lambda: http(lab, "hw1", f"http://{ROUTER}/whoami"), FIP) == FIP
    assert http(lab, "router", f"http://{FIP}/whoami") == ROUTER
    assert http(lab, "hw2", f"http://{ROUTER}/whoami") == VMS["hw2"][2]
    assert eventually(lambda: http(lab, "hw1", METADATA), VMS["hw1"][2]) == VMS["hw1"][2]


def test_the_owner_hands_a_vm_with_a_floating_ip_itself_as_router(cluster):
    lab = cluster
    for client in ("dhclient", "udhcpc"):
        hw1, hw2 = lab.dhcp("hw1", client), lab.dhcp("hw2", client)
        assert (hw1["address"], hw1["router"], hw1["server"]) == (VMS["hw1"][2], SERVER, SERVER), hw1
        assert (hw2["address"], hw2["router"], hw2["server"]) == (VMS["hw2"][2], HW_ROUTER, SERVER), hw2
    served_as_before(lab, "net1")
    # the hardware router sees hw1's fixed address only on the segment itself
    assert http(lab, "hw1", f"http://{HW_ROUTER}/whoami") == VMS["hw1"][2]


def test_without_a_floating_ip_a_vm_s_router_is_the_hardware_one_again(cluster):
    lab = cluster
    p = nh_pillar(lab)
    p["hanet"]["instances"]["hw1"]["floating_ips"] = []
    try:
        lab.set_pillar(p)
        state_apply(lab, ["net1", "net2"])
        lease = lab.dhcp("hw1", "dhclient")
        assert (lease["address"], lease["router"]) == (VMS["hw1"][2], HW_ROUTER), lease
        assert eventually(lambda: http(lab, "hw1", f"http://{ROUTER}/whoami"), VMS["hw1"][2]) == VMS["hw1"][2]
        assert holders(lab, FIP) == []
    finally:
        lab.set_pillar(nh_pillar(lab))
        state_apply(lab, ["net1", "net2"])
        assert lab.dhcp("hw1", "dhclient")["router"] == SERVER


def test_a_router_that_routes_to_the_dhcp_server_gives_every_vm_metadata_and_force_snat_range(cluster):
    """The docs' recipe for VMs whose router is the hardware one: one static route per
    destination on the router, to the dhcp_server, which moves with the owner. hw2 reads
    its metadata, and reaches compute1's public address (in force_snat_range) as the
    owner's routing_source_ip, not as its fixed address."""
    lab = cluster
    target = lab.topology.hosts["compute1"].first_address("eth0")
    source = lab.topology.hosts["net1"].first_address("eth0")
    httpd = os.path.join(os.path.dirname(sys.modules["hanet_lab"].__file__), "httpd.py")
    lab.popen("compute1", [sys.executable, httpd, "compute1", "8080", os.path.join(lab.rundir, "http-c1.log")])
    p = nh_pillar(lab)
    p["hanet"]["force_snat_range"] = [f"{target}/32"]
    lab.set_pillar(p)
    state_apply(lab, ["net1", "net2"])
    for dst in ("169.254.169.254/32", f"{target}/32"):
        lab.exec("router", ["ip", "route", "replace", dst, "via", SERVER], check=True)
    try:
        assert eventually(lambda: http(lab, "hw2", METADATA), VMS["hw2"][2]) == VMS["hw2"][2]
        assert eventually(lambda: http(lab, "hw2", f"http://{target}:8080/whoami"), source) == source
    finally:
        for dst in ("169.254.169.254/32", f"{target}/32"):
            lab.exec("router", ["ip", "route", "del", dst])
        lab.set_pillar(nh_pillar(lab))
        state_apply(lab, ["net1", "net2"])


def test_a_power_loss_of_the_owner_moves_the_dhcp_server_and_the_floating_ip_together(cluster):
    from hanet_lab import chaos
    from hanet_lab.arpwatch import ArpWatch

    lab = cluster
    lab.dhcp("hw1", "dhclient")
    lab.dhcp("hw2", "dhclient")
    served_as_before(lab, "net1")
    wire = ArpWatch(lab, [("seg-hw", SERVER), ("public", FIP)]).start()
    out = chaos.Pinger(lab, "hw1", ROUTER).start()
    inbound = chaos.Pinger(lab, "router", FIP).start()
    try:
        with lab.events() as ev:
            time.sleep(1)
            chaos.power_off(lab, "net1")
            done = ev.wait(f"hanet/failover/{NET}/complete", timeout=20)
            time.sleep(1.5)
    finally:
        out.stop()
        inbound.stop()
        wire.stop()
    assert done, f"no hanet/failover/{NET}/complete event"
    data = done["data"]
    assert (data["from"], data["to"]) == ("net1", "net2") and set(data["addresses"]) == {SERVER, FIP}, data
    seen = wire.summary()
    assert seen[SERVER]["two_holders_s"] == 0 and seen[FIP]["two_holders_s"] == 0, seen
    for pinger in (out, inbound):
        assert [t for t, _ in pinger.replies() if t > data["completed_at"]], f"{pinger.node}: no reply after"
    served_as_before(lab, "net2")
    # a renewal from the new owner keeps both VMs' addresses and routers
    hw1 = lab.dhcp("hw1", "dhclient")
    assert (hw1["address"], hw1["router"], hw1["server"]) == (VMS["hw1"][2], SERVER, SERVER), hw1
    assert lab.dhcp("hw2", "udhcpc")["router"] == HW_ROUTER
    chaos.power_on_started(lab, "net1")
    time.sleep(2)
    assert holders(lab, SERVER) == ["net2"] and holders(lab, FIP) == ["net2"]


def test_an_evacuation_moves_them_back_and_the_vm_still_leaves_as_its_floating_ip(cluster):
    from hanet_lab import chaos

    lab = cluster
    if holders(lab, SERVER) != ["net2"]:
        pytest.skip("needs the power-loss test's outcome (net2 serving)")
    out = chaos.Pinger(lab, "hw1", ROUTER).start()
    try:
        time.sleep(1)
        res = lab.salt_run("hanet.evacuate", ["net2"], timeout=120)
        time.sleep(1)
    finally:
        out.stop()
    # net2 serves the lab's other network-host network (shared) too: it moves as well
    assert [(m["to"], m["moved"]) for m in res if m["network"] == NET] == [("net1", True)], res
    gap, _, lost = out.outage()
    assert lost <= 1 and gap < 0.5, f"hw1 -> router: {lost} probes lost (longest gap {gap:.3f} s)"
    served_as_before(lab, "net1")
