"""A host with one NIC (nova-network's one-NIC FlatDHCP host), through a real salt-master
and minions, with real DHCP clients (the namespace lab):

    mgmt0     each host's only NIC in use: its management address (192.0.2.11, .12), over
              which its minion talks to the master (192.0.2.1), its public address (the
              pillar's public_interface and routing_source_ip), a static route, and the
              uplink of the VM bridge br100 (network private, multi_host)
    web1      on compute1, floating IP 192.0.2.150 (on the same segment as the master)
    db1       on compute2, no floating IP

The apply enslaves mgmt0 to br100 and moves the host's addresses and routes onto the
bridge without losing the route for its own minion's connection; the floating IP and SNAT
go out of the bridge. Removing hanet moves everything back. The minions stay connected
throughout: every step is a state.apply through the master.
"""

import copy
import os
import sys
import time

import pytest
from hanet_checks import state_apply

pytestmark = pytest.mark.lab

MASTER = "192.0.2.1"
HOSTS = {"compute1": "192.0.2.11", "compute2": "192.0.2.12"}
FIP = "192.0.2.150"
STATIC = "198.18.99.0/24"


def one_nic(pillar):
    p = copy.deepcopy(pillar)
    h = p["hanet"]
    h["networks"] = {"private": dict(h["networks"]["private"], bridge_interface="mgmt0")}
    h["hosts"] = {host: h["hosts"][host] for host in HOSTS}
    for host, addr in HOSTS.items():
        h["hosts"][host] = {
            "public_interface": "mgmt0",
            "routing_source_ip": addr,
            "networks": {"private": h["hosts"][host]["networks"]["private"]},
        }
    h["instances"] = {k: v for k, v in h["instances"].items() if k in ("web1", "db1")}
    h["instances"]["web1"]["floating_ips"] = [FIP]
    h["instances"]["db1"]["floating_ips"] = []
    return p


def get(lab, node, url, timeout=3):
    cp = lab.exec(node, ["curl", "-sS", "--max-time", str(timeout), url], timeout=timeout + 10)
    return cp.stdout.strip() if cp.returncode == 0 else None


def routes(lab, host):
    return lab.exec(host, ["ip", "-4", "route", "show", STATIC], check=True).stdout


def serve(lab, node, port):
    httpd = os.path.join(os.path.dirname(sys.modules["hanet_lab"].__file__), "httpd.py")
    lab.popen(node, [sys.executable, httpd, node, str(port), os.path.join(lab.rundir, f"http-{node}.log")])


def applied_cleanly(res):
    return {m: all(v["result"] for v in r.values()) for m, r in res.items()}


@pytest.fixture(scope="module")
def one(lab):
    from hanet_lab.pillar import lab_pillar

    for host in HOSTS:
        lab.exec(host, ["ip", "route", "add", STATIC, "via", MASTER, "dev", "mgmt0"], check=True)
    p = one_nic(lab_pillar(lab.topology))
    lab.set_pillar(p)
    res = state_apply(lab)
    assert set(HOSTS) <= set(res) and all(applied_cleanly(res).values()), res
    for vm in ("web1", "db1"):
        lab.plug_vm(vm)
    serve(lab, "master", 8080)
    serve(lab, "web1", 80)
    return p


def test_the_host_s_addresses_and_routes_are_on_the_bridge_and_its_minion_answers(lab, one):
    for host, addr in HOSTS.items():
        assert f"{addr}/24" in lab.addresses(host, "br100"), host
        assert lab.addresses(host, "mgmt0") == [], host
        assert "dev br100" in routes(lab, host), host
    assert all(lab.salt(h, "test.ping").get(h) is True for h in HOSTS)
    # the next apply has nothing to do: the host's addresses are not the bridge's
    res = state_apply(lab)
    assert {m: [k for k, v in r.items() if v["changes"]] for m, r in res.items()} == {h: [] for h in res}


def test_vms_get_their_leases_and_leave_by_the_bridge(lab, one):
    assert lab.dhcp("web1", "dhclient")["router"] == "192.168.0.3"
    assert lab.dhcp("db1", "udhcpc")["router"] == "192.168.0.4"
    deadline = time.monotonic() + 5
    while get(lab, "web1", f"http://{MASTER}:8080/whoami") != FIP and time.monotonic() < deadline:
        time.sleep(0.2)
    assert get(lab, "web1", f"http://{MASTER}:8080/whoami") == FIP  # its floating IP
    assert get(lab, "db1", f"http://{MASTER}:8080/whoami") == HOSTS["compute2"]  # routing_source_ip
    assert get(lab, "master", f"http://{FIP}/whoami") == MASTER  # reached by its floating IP


def test_removing_hanet_moves_everything_back_and_the_minions_stay(lab, one):
    p = copy.deepcopy(one)
    p["hanet"]["hosts"] = {}
    p["hanet"]["instances"] = {}
    p["hanet"]["networks"] = {}
    try:
        lab.set_pillar(p)
        res = state_apply(lab)
        assert set(HOSTS) <= set(res) and all(applied_cleanly(res).values()), res
        for host, addr in HOSTS.items():
            assert lab.addresses(host, "mgmt0") == [f"{addr}/24"], host
            assert "br100" not in lab.links(host), host
            assert "dev mgmt0" in routes(lab, host), host
        assert all(lab.salt(h, "test.ping").get(h) is True for h in HOSTS)
    finally:
        lab.set_pillar(one)
        state_apply(lab)
