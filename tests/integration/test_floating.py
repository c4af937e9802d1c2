"""Floating IPs end to end, applied by `state.apply hanet` (and highstate) through a real
salt-master to real minions in the namespace lab:

    compute1  eth0 203.0.113.11  br100 192.168.0.3   web1 192.168.0.10  floating 203.0.113.50
                                                     web2 192.168.0.12  (none; 203.0.113.53 later)
    compute2  eth0 203.0.113.12  br100 192.168.0.4   db1  192.168.0.11  floating 203.0.113.52
    router    eth0 203.0.113.1 (upstream)

Every VM runs a tiny web server (the lab's httpd: ``GET /whoami`` answers the source
address it saw, other paths ``router <vm>``), so a request tells both who answered and
which source address reached it. What is checked is what a user checks: the router
reaches a VM by its floating IP, the VM's own connections leave as its floating IP, VMs
reach each other's floating IPs (same host and other host), and after an evacuation
(the instance's ``host`` changes in pillar) the floating IP answers from the new host,
the router's ARP cache shows the new host's MAC at once (gratuitous ARP), and the old
host keeps no address, rule or conntrack entry for it.
"""

import os
import re
import sys
import time

import pytest
from hanet_checks import changes_of, state_apply as _state_apply

pytestmark = pytest.mark.lab

ROUTER = "203.0.113.1"
FIP_WEB1, FIP_DB1, FIP_WEB2 = "203.0.113.50", "203.0.113.52", "203.0.113.53"
SOURCE_IP = {"compute1": "203.0.113.11", "compute2": "203.0.113.12"}
HOST_ADDR = {"compute1": "192.168.0.3", "compute2": "192.168.0.4"}
VM_IP = {"web1": "192.168.0.10", "db1": "192.168.0.11", "web2": "192.168.0.12"}
VM_MAC = {"web1": "fa:16:3e:00:00:01", "db1": "fa:16:3e:00:00:02", "web2": "fa:16:3e:00:00:03"}
VM_HOST = {"web1": "compute1", "db1": "compute2", "web2": "compute1"}
HOSTS = ["compute1", "compute2"]


@pytest.fixture(scope="module")
def lab_topology():
    from hanet_lab.topology import VM, Nic, default_topology

    topo = default_topology(hosts=2, vms=False, hardware_router=False)
    for vm, host in VM_HOST.items():
        topo.vms[vm] = VM(name=vm, host=host, nics=[Nic(bridge="br100", mac=VM_MAC[vm])])
    topo.validate()
    return topo


def make_pillar(web1_host="compute1", web2_floating=()):
    instances = {
        vm: {"host": host, "nics": [{"network": "private", "mac": VM_MAC[vm], "ip": VM_IP[vm]}]}
        for vm, host in VM_HOST.items()
    }
    instances["web1"]["host"] = web1_host
    instances["web1"]["floating_ips"] = [FIP_WEB1]
    instances["db1"]["floating_ips"] = [{"address": FIP_DB1, "fixed_ip": VM_IP["db1"]}]
    if web2_floating:
        instances["web2"]["floating_ips"] = list(web2_floating)
    return {
        "hanet": {
            "send_arp_for_ha": True,
            "networks": {
                "private": {
                    "cidr": "192.168.0.0/24",
                    "bridge": "br100",
                    "bridge_interface": "eth1",
                    "multi_host": True,
                    "gateway": "192.168.0.1",
                }
            },
            "hosts": {
                h: {
                    "public_interface": "eth0",
                    "routing_source_ip": SOURCE_IP[h],
                    "networks": {"private": {"address": HOST_ADDR[h]}},
                }
                for h in HOSTS
            },
            "instances": instances,
        }
    }


def state_apply(lab, tgt=HOSTS, test=False, highstate=False, timeout=240):
    return _state_apply(lab, tgt, test=test, timeout=timeout, highstate=highstate)


def get(lab, node, url, timeout=3):
    cp = lab.exec(node, ["curl", "-sS", "--max-time", str(timeout), url], timeout=timeout + 10)
    return cp.stdout.strip() if cp.returncode == 0 else None


def has_address(lab, host, ip, ifname="eth0"):
    return any(a.split("/")[0] == ip for a in lab.addresses(host, ifname))


def ruleset_text(lab, host):
    return lab.exec(host, ["nft", "-s", "list", "ruleset"], check=True).stdout  # -s: no counters


def conntrack_lines(lab, host, ip):
    out = lab.exec(host, ["conntrack", "-L"]).stdout
    return [ln for ln in out.splitlines() if re.search(rf"={re.escape(ip)}(\s|$)", ln)]


def router_mac_for(lab, ip):
    entry = lab.arp_cache("router").get(ip)
    return entry["mac"] if entry else None


def serve(lab, vm):
    """The lab's tiny web server on :80 inside ``vm``."""
    httpd = os.path.join(os.path.dirname(sys.modules["hanet_lab"].__file__), "httpd.py")
    lab.popen(vm, [sys.executable, httpd, vm, "80", os.path.join(lab.rundir, f"http-{vm}.log")], name=f"httpd-{vm}")


@pytest.fixture(scope="module")
def applied(lab):
    """The pillar applied; VMs plugged (then applied again, so that the bridge guards name
    their ports), leased (dhclient for web1, udhcpc for the others) and serving HTTP."""
    lab.set_pillar(make_pillar())
    state_apply(lab)
    for vm in VM_HOST:
        lab.plug_vm(vm)
    state_apply(lab)
    for vm in VM_HOST:
        lease = lab.dhcp(vm, client="dhclient" if vm == "web1" else "udhcpc")
        assert (lease["address"], lease["router"]) == (VM_IP[vm], HOST_ADDR[VM_HOST[vm]]), lease
        serve(lab, vm)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(get(lab, vm, "http://127.0.0.1/") for vm in VM_HOST):
        time.sleep(0.2)
    return True


def test_router_reaches_vm_by_its_floating_ip(lab, applied):
    assert lab.ping("router", FIP_WEB1, count=2)
    assert get(lab, "router", f"http://{FIP_WEB1}/") == "router web1"
    # DNAT only: the VM sees the router's own address as the client
    assert get(lab, "router", f"http://{FIP_WEB1}/whoami") == ROUTER
    assert get(lab, "router", f"http://{FIP_DB1}/") == "router db1"
    # negative: an address nobody binds does not answer (the router is not faking it)
    assert get(lab, "router", "http://203.0.113.59/", timeout=1) is None


def test_vm_connections_leave_as_its_floating_ip(lab, applied):
    assert get(lab, "web1", f"http://{ROUTER}/whoami") == FIP_WEB1
    assert get(lab, "db1", f"http://{ROUTER}/whoami") == FIP_DB1
    # a VM without a floating IP leaves as its host's routing_source_ip
    assert get(lab, "web2", f"http://{ROUTER}/whoami") == SOURCE_IP["compute1"]


def test_hairpin_same_host(lab, applied):
    """web2 and web1 share compute1's bridge: DNAT alone would make web1 answer web2
    directly (wrong source); the hairpin masquerade brings the answer back through the host."""
    assert get(lab, "web2", f"http://{FIP_WEB1}/") == "router web1"
    assert get(lab, "web2", f"http://{FIP_WEB1}/whoami") == HOST_ADDR["compute1"]
    # the host itself (output DNAT)
    assert lab.exec("compute1", ["curl", "-sS", "-m", "3", f"http://{FIP_WEB1}/"]).stdout.strip() == "router web1"


def test_hairpin_other_host(lab, applied):
    assert get(lab, "db1", f"http://{FIP_WEB1}/") == "router web1"
    assert get(lab, "db1", f"http://{FIP_WEB1}/whoami") == FIP_DB1
    assert get(lab, "web1", f"http://{FIP_DB1}/") == "router db1"
    assert get(lab, "web2", f"http://{FIP_DB1}/whoami") == SOURCE_IP["compute1"]


def test_second_apply_changes_nothing(lab, applied):
    assert changes_of(state_apply(lab)) == {}


def test_test_mode_idempotence_and_removal(lab, applied):
    lab.set_pillar(make_pillar(web2_floating=[FIP_WEB2]))
    before = {h: ruleset_text(lab, h) for h in HOSTS}
    res = changes_of(state_apply(lab, test=True))
    assert set(res) == {"compute1"}, res
    assert any(FIP_WEB2 in c for c in res["compute1"]["floating"]), res
    assert "ruleset" in res["compute1"], res
    assert not has_address(lab, "compute1", FIP_WEB2)
    assert {h: ruleset_text(lab, h) for h in HOSTS} == before
    assert get(lab, "router", f"http://{FIP_WEB2}/", timeout=1) is None

    res = changes_of(state_apply(lab))
    assert set(res) == {"compute1"} and set(res["compute1"]) == {"ruleset", "floating"}, res
    assert has_address(lab, "compute1", FIP_WEB2)
    assert get(lab, "router", f"http://{FIP_WEB2}/") == "router web2"
    assert get(lab, "web2", f"http://{ROUTER}/whoami") == FIP_WEB2
    assert changes_of(state_apply(lab)) == {}
    assert conntrack_lines(lab, "compute1", FIP_WEB2), "precondition: a tracked flow"

    lab.set_pillar(make_pillar())
    res = changes_of(state_apply(lab))
    assert set(res) == {"compute1"} and set(res["compute1"]) == {"ruleset", "floating"}, res
    assert not has_address(lab, "compute1", FIP_WEB2)
    assert FIP_WEB2 not in ruleset_text(lab, "compute1")
    assert conntrack_lines(lab, "compute1", FIP_WEB2) == []
    assert get(lab, "router", f"http://{FIP_WEB2}/", timeout=1) is None
    assert get(lab, "web2", f"http://{ROUTER}/whoami") == SOURCE_IP["compute1"]
    assert changes_of(state_apply(lab)) == {}


def test_evacuation_moves_the_floating_ip(lab, applied):
    """web1's ``host`` changes to compute2 in pillar; the VM is re-plugged there and the
    highstate runs on both hosts."""
    old_mac, new_mac = lab.mac("compute1", "eth0"), lab.mac("compute2", "eth0")
    assert get(lab, "router", f"http://{FIP_WEB1}/") == "router web1"
    assert router_mac_for(lab, FIP_WEB1) == old_mac
    assert conntrack_lines(lab, "compute1", FIP_WEB1), "precondition: a tracked flow on the old host"

    lab.set_pillar(make_pillar(web1_host="compute2"))
    lab.unplug_vm("web1")
    lab.plug_vm("web1", host="compute2")
    res = changes_of(state_apply(lab, highstate=True))
    assert any(FIP_WEB1 in c for c in res["compute1"]["floating"]), res
    assert any(FIP_WEB1 in c for c in res["compute2"]["floating"]), res

    # at once, before the router sends anything: its ARP entry follows the GARP
    assert router_mac_for(lab, FIP_WEB1) == new_mac, (lab.arp_cache("router").get(FIP_WEB1), old_mac, new_mac)
    # the old host keeps nothing for it
    assert not has_address(lab, "compute1", FIP_WEB1)
    assert FIP_WEB1 not in ruleset_text(lab, "compute1")
    assert VM_IP["web1"] not in ruleset_text(lab, "compute1")
    assert conntrack_lines(lab, "compute1", FIP_WEB1) == [], res["compute1"]
    assert has_address(lab, "compute2", FIP_WEB1)

    lease = lab.dhcp("web1", client="dhclient")
    assert (lease["address"], lease["router"], lease["server"]) == (
        VM_IP["web1"],
        HOST_ADDR["compute2"],
        HOST_ADDR["compute2"],
    ), lease
    assert get(lab, "router", f"http://{FIP_WEB1}/") == "router web1"
    assert get(lab, "router", f"http://{FIP_WEB1}/whoami") == ROUTER
    assert get(lab, "web1", f"http://{ROUTER}/whoami") == FIP_WEB1
    assert get(lab, "web2", f"http://{FIP_WEB1}/") == "router web1"  # now across hosts
    assert get(lab, "db1", f"http://{FIP_WEB1}/") == "router web1"  # now on the same host
    assert changes_of(state_apply(lab, highstate=True)) == {}


def test_without_garp_the_router_keeps_the_old_mac(lab, applied):
    """The negative of the evacuation's ARP check: with ``send_arp_for_ha: false`` the same
    move leaves the router's ARP entry on the old host's MAC (so it is the GARP that moves it)."""
    old_mac, new_mac = lab.mac("compute2", "eth0"), lab.mac("compute1", "eth0")
    assert get(lab, "router", f"http://{FIP_WEB1}/") == "router web1"
    assert router_mac_for(lab, FIP_WEB1) == old_mac
    pillar = make_pillar(web1_host="compute1")
    pillar["hanet"]["send_arp_for_ha"] = False
    lab.set_pillar(pillar)
    lab.unplug_vm("web1")
    lab.plug_vm("web1", host="compute1")
    state_apply(lab, highstate=True)
    assert has_address(lab, "compute1", FIP_WEB1) and not has_address(lab, "compute2", FIP_WEB1)
    assert router_mac_for(lab, FIP_WEB1) == old_mac != new_mac
