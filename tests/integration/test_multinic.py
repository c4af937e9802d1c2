"""Multi-NIC instances end to end in the namespace lab: one instance with a NIC on each of
two networks served by different hosts.

    compute1  br100 192.168.0.3 (private, multi_host)   multi1 eth0 192.168.0.20
              br200 member of `shared`                  multi1 eth1 10.20.0.20
    compute2  br100 192.168.0.4 (private, multi_host)
    net1      br200 10.20.0.2 + gateway 10.20.0.1 (shared: network host)

Each NIC gets its lease from the host serving its network (compute1 for private, net1 for
shared), with dhclient and with udhcpc. With ``use_single_default_gateway: true`` only the
first NIC gets a router, so the VM ends with one default route; without it both NICs get
their network's router.
"""

import pytest
from hanet_checks import changes_of, state_apply as _state_apply

pytestmark = pytest.mark.lab

HOSTS = ["compute1", "compute2", "net1"]
SOURCE_IP = {"compute1": "203.0.113.11", "compute2": "203.0.113.12", "net1": "203.0.113.21"}
NICS = [  # (network, mac, ip, the address that serves it)
    ("private", "fa:16:3e:00:20:01", "192.168.0.20", "192.168.0.3"),
    ("shared", "fa:16:3e:00:20:02", "10.20.0.20", "10.20.0.1"),
]


@pytest.fixture(scope="module")
def lab_topology():
    from hanet_lab.topology import VM, Nic, default_topology

    topo = default_topology(hosts=3, vms=False, hardware_router=False)
    topo.vms["multi1"] = VM(
        name="multi1", host="compute1", nics=[Nic(bridge="br100", mac=NICS[0][1]), Nic(bridge="br200", mac=NICS[1][1])]
    )
    topo.validate()
    return topo


def make_pillar(single=None, nics=2):
    hanet = {
        "networks": {
            "private": {
                "cidr": "192.168.0.0/24",
                "bridge": "br100",
                "bridge_interface": "eth1",
                "multi_host": True,
                "gateway": "192.168.0.1",
            },
            "shared": {
                "cidr": "10.20.0.0/24",
                "bridge": "br200",
                "bridge_interface": "eth3",
                "multi_host": False,
                "gateway": "10.20.0.1",
                "network_hosts": ["net1"],
            },
        },
        "hosts": {
            "compute1": {
                "public_interface": "eth0",
                "routing_source_ip": SOURCE_IP["compute1"],
                "networks": {"private": {"address": "192.168.0.3"}},
            },
            "compute2": {
                "public_interface": "eth0",
                "routing_source_ip": SOURCE_IP["compute2"],
                "networks": {"private": {"address": "192.168.0.4"}},
            },
            "net1": {
                "public_interface": "eth0",
                "routing_source_ip": SOURCE_IP["net1"],
                "networks": {"shared": {"address": "10.20.0.2"}},
            },
        },
        "instances": {
            "multi1": {
                "host": "compute1",
                "nics": [{"network": net, "mac": mac, "ip": ip} for net, mac, ip, _ in NICS[:nics]],
            }
        },
    }
    if single is not None:
        hanet["use_single_default_gateway"] = single
    return {"hanet": hanet}


def state_apply(lab, tgt=HOSTS, test=False, timeout=240):
    return _state_apply(lab, tgt, test=test, timeout=timeout)


def dnsmasq_pids(lab):
    return {h: sorted(p for p, c in lab.processes(h)[h] if "dnsmasq" in c) for h in HOSTS}


def boot(lab, client):
    """Both NICs leased from scratch (addresses and routes flushed first)."""
    lab.exec("multi1", "ip -4 addr flush dev eth0; ip -4 addr flush dev eth1; ip -4 route flush table main")
    return [lab.dhcp("multi1", client=client, ifname=f"eth{i}") for i in range(len(NICS))]


def default_routes(lab):
    return [ln for ln in lab.exec("multi1", "ip -4 route show default").stdout.splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def applied(lab):
    lab.set_pillar(make_pillar())
    state_apply(lab)
    lab.plug_vm("multi1")
    state_apply(lab)
    return True


@pytest.mark.parametrize("client", ["dhclient", "udhcpc"])
def test_each_nic_leased_by_the_host_serving_its_network_with_both_routers(lab, applied, client):
    leases = boot(lab, client)
    for (net, _, ip, server), lease in zip(NICS, leases):
        assert lease["address"] == ip, (net, lease)
        assert lease["server"] == server, (net, lease)
        assert lease["routers"] == [server], (net, lease)
    # both NICs work: the private one through compute1, the shared one through net1
    assert lab.ping("multi1", "192.168.0.3") and lab.ping("multi1", "10.20.0.1")


def test_single_default_gateway(lab, applied):
    pids = dnsmasq_pids(lab)
    lab.set_pillar(make_pillar(single=True))
    res = changes_of(state_apply(lab, test=True))
    assert set(res) == {"net1"} and set(res["net1"]) == {"dnsmasq"}, res  # only the 2nd NIC changes
    assert dnsmasq_pids(lab) == pids
    state_apply(lab)
    assert changes_of(state_apply(lab)) == {}
    for client in ("dhclient", "udhcpc"):
        first, second = boot(lab, client)
        assert (first["address"], first["routers"]) == ("192.168.0.20", ["192.168.0.3"]), first
        assert (second["address"], second["server"]) == ("10.20.0.20", "10.20.0.1"), second
        assert second["routers"] == [], (client, second)
        routes = default_routes(lab)
        assert len(routes) == 1 and routes[0].split()[:5] == ["default", "via", "192.168.0.3", "dev", "eth0"], routes
        assert lab.http_get("multi1", "http://203.0.113.1/whoami").strip() == SOURCE_IP["compute1"]

    # back to the default (false): the second NIC gets its router again
    lab.set_pillar(make_pillar(single=False))
    state_apply(lab)
    assert boot(lab, "udhcpc")[1]["routers"] == ["10.20.0.1"]


def test_removing_the_second_nic(lab, applied):
    lab.set_pillar(make_pillar(nics=1))
    res = changes_of(state_apply(lab, test=True))
    assert "dnsmasq" in res.get("net1", {}), res
    state_apply(lab)
    assert changes_of(state_apply(lab)) == {}
    lab.exec("multi1", "ip -4 addr flush dev eth1")
    assert lab.dhcp("multi1", client="udhcpc", ifname="eth1", timeout=4, check=False) is None
    assert lab.dhcp("multi1", client="udhcpc", ifname="eth0")["address"] == "192.168.0.20"
    # compute1 no longer carries `shared`: its bridge is gone (the VM's tap left it)
    assert "br200" not in lab.links("compute1")
    # the NIC comes back (hot-plugged into the new bridge)
    lab.set_pillar(make_pillar())
    state_apply(lab)
    lab.unplug_vm("multi1")
    lab.plug_vm("multi1")
    state_apply(lab)
    assert changes_of(state_apply(lab)) == {}
    assert lab.dhcp("multi1", client="udhcpc", ifname="eth1")["address"] == "10.20.0.20"
