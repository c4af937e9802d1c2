"""share_dhcp_address (nova's option of that name) on the multi_host network `private`,
through a real salt-master and minions, with real DHCP clients (the namespace lab):

    compute1  br100 192.168.0.1 + the shared MAC   web1 192.168.0.10 (floating 203.0.113.50)
    compute2  br100 192.168.0.1 + the shared MAC   db1  192.168.0.11
    seg-private  the switch between their eth1 (each host's uplink of br100)

Every host is its own instances' gateway and DHCP server at one address, the network's
gateway, with one MAC: neither is ever seen on the uplink, so an instance moved to another
host (a live migration: its taps move, the guest keeps its ARP cache) reaches the world
through its new host at once, without renewing its lease.
"""

import copy
import re
import time

import pytest
from hanet_checks import sniff, state_apply

pytestmark = pytest.mark.lab

GATEWAY = "192.168.0.1"
ROUTER = "203.0.113.1"
HOSTS = ("compute1", "compute2")


@pytest.fixture(scope="module")
def lab_topology():
    from hanet_lab import default_topology

    return default_topology(hosts=2)


def shared(pillar):
    p = copy.deepcopy(pillar)
    p["hanet"]["networks"]["private"]["share_dhcp_address"] = True
    for host in HOSTS:
        p["hanet"]["hosts"][host]["networks"]["private"] = {}  # no address of its own
    return p


@pytest.fixture(scope="module")
def pillar(lab):
    from hanet_lab.pillar import lab_pillar

    p = shared(lab_pillar(lab.topology))
    lab.set_pillar(p)
    state_apply(lab)
    for vm in ("web1", "db1"):
        lab.plug_vm(vm)
    return p


def shared_mac():
    from _hanet import model

    return model.Network(
        label="private",
        cidr="192.168.0.0/24",
        bridge="br100",
        bridge_interface="eth1",
        multi_host=True,
        gateway=GATEWAY,
        dhcp_start="192.168.0.2",
        share_dhcp_address=True,
    ).shared_mac


def test_every_host_is_the_gateway_with_one_mac(lab, pillar):
    mac = shared_mac()
    for host in HOSTS:
        assert lab.addresses(host, "br100") == [f"{GATEWAY}/24"], host
        assert lab.mac(host, "br100") == mac, host
    assert mac != lab.mac("compute1", "eth1") and mac != lab.mac("compute2", "eth1")
    # and the apply after that has nothing to do
    res = state_apply(lab)
    assert {m: [k for k, v in r.items() if v["changes"]] for m, r in res.items()} == {h: [] for h in HOSTS}


@pytest.mark.parametrize("vm,client", [("web1", "dhclient"), ("db1", "udhcpc")])
def test_each_vm_gets_its_lease_from_its_own_host_at_the_shared_address(lab, pillar, vm, client):
    lease = lab.dhcp(vm, client)
    assert lease["address"] == pillar["hanet"]["instances"][vm]["nics"][0]["ip"]
    assert lease["router"] == GATEWAY and lease["server"] == GATEWAY
    assert lab.ping(vm, ROUTER, count=3)
    assert lab.arp_cache(vm)[GATEWAY]["mac"] == shared_mac()


def test_neither_the_shared_address_nor_its_mac_crosses_the_uplink(lab, pillar):
    """Both VMs ARP for their gateway and use it, both hosts ARP for their VMs: on the
    segment between the hosts, nothing says or asks who has the shared address, and no
    frame carries the shared MAC."""
    mac = shared_mac()
    lab.dhcp("web1", "dhclient")
    lab.dhcp("db1", "udhcpc")
    with sniff(lab, "compute2", "eth1", f"arp or ether host {mac}") as seen:
        for vm in ("web1", "db1"):
            lab.exec(vm, "ip neigh flush dev eth0", check=True)
            assert lab.ping(vm, ROUTER, count=2)
        for host in HOSTS:
            lab.exec(host, "ip neigh flush dev br100", check=True)
        assert lab.ping("web1", ROUTER, count=2) and lab.ping("db1", ROUTER, count=2)
        # a control that the capture sees this segment: web1 asks for db1 (VM to VM
        # crosses the hosts' uplinks, as it should)
        assert lab.ping("web1", "192.168.0.11", count=2)
    assert any("192.168.0.11" in line for line in seen), "the capture saw nothing of web1 asking for db1"
    leaked = [line for line in seen if re.search(r"192\.168\.0\.1\b", line) or mac in line]
    assert leaked == [], leaked


def test_a_migrated_vm_keeps_its_gateway_without_renewing(lab, pillar):
    """web1 moves from compute1 to compute2 (the pillar says so, applied; then its tap
    moves, as libvirt's live migration does): its ARP entry for the gateway still holds,
    its next packets leave through compute2 at once, with its floating IP, and its lease
    renews from compute2 at the same address."""
    lab.dhcp("web1", "dhclient")
    assert lab.http_get("web1", f"http://{ROUTER}/whoami").strip() == "203.0.113.50"
    before = lab.arp_cache("web1")[GATEWAY]["mac"]
    p = copy.deepcopy(pillar)
    p["hanet"]["instances"]["web1"]["host"] = "compute2"
    lab.set_pillar(p)
    state_apply(lab)
    try:
        lab.move_vm("web1", "compute2")
        t0 = time.monotonic()
        assert lab.ping("web1", ROUTER, count=1, timeout=3)
        took = time.monotonic() - t0
        print(f"migrated web1: first ping through compute2 answered after {took * 1000:.0f} ms")
        assert lab.arp_cache("web1")[GATEWAY]["mac"] == before == shared_mac()
        assert lab.http_get("web1", f"http://{ROUTER}/whoami").strip() == "203.0.113.50"
        assert any(a.split("/")[0] == "203.0.113.50" for a in lab.addresses("compute2", "eth0"))
        again = lab.dhcp("web1", "dhclient")
        assert again["address"] == "192.168.0.10" and again["server"] == GATEWAY
        log = open(f"{lab.minion_root('compute2')}/var/lib/hanet/dnsmasq/private.log").read()
        assert "192.168.0.10 fa:16:3e:00:00:01" in log
    finally:
        lab.set_pillar(pillar)
        lab.move_vm("web1", "compute1")
        state_apply(lab)


def test_turning_it_off_gives_the_hosts_their_own_addresses_and_macs_back(lab, pillar):
    from hanet_lab.pillar import lab_pillar

    plain = lab_pillar(lab.topology)
    lab.set_pillar(plain)
    try:
        state_apply(lab)
        for host in HOSTS:
            want = plain["hanet"]["hosts"][host]["networks"]["private"]["address"]
            assert lab.addresses(host, "br100") == [f"{want}/24"]
            assert lab.mac(host, "br100") == lab.mac(host, "eth1")
        lease = lab.dhcp("db1", "udhcpc")
        assert lease["router"] == plain["hanet"]["hosts"]["compute2"]["networks"]["private"]["address"]
    finally:
        lab.set_pillar(pillar)
        state_apply(lab)
