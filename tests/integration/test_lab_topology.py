"""The lab's topology description (pure: no root, no namespaces)."""

import pytest

from hanet_lab import Topology, TopologyError, default_topology
from hanet_lab.pillar import lab_pillar

YAML = """
segments: [mgmt, public, seg-private]
master: {name: master, links: {mgmt0: mgmt}, addresses: {mgmt0: 192.0.2.1/24}}
hosts:
  compute1:
    links: {mgmt0: mgmt, eth0: public, eth1: seg-private}
    addresses: {mgmt0: 192.0.2.11/24, eth0: 203.0.113.11/24}
    gateway: 203.0.113.1
router: {links: {eth0: public}, addresses: {eth0: 203.0.113.1/24}}
vms:
  web1: {host: compute1, bridge: br100, mac: 'FA:16:3E:00:00:01'}
  two: {host: compute1, nics: [{bridge: br100, mac: 'fa:16:3e:00:00:02'}, {bridge: br200, mac: 'fa:16:3e:00:00:03'}]}
"""


def test_default_topology_matches_the_contract_addresses():
    t = default_topology()
    assert list(t.hosts) == ["compute1", "compute2", "net1", "net2"]
    assert t.master.addresses == {"mgmt0": ["192.0.2.1/24"]}
    assert [h.first_address("eth0") for h in t.hosts.values()] == [
        "203.0.113.11",
        "203.0.113.12",
        "203.0.113.21",
        "203.0.113.22",
    ]
    assert [h.first_address("mgmt0") for h in t.hosts.values()] == [
        "192.0.2.11",
        "192.0.2.12",
        "192.0.2.21",
        "192.0.2.22",
    ]
    assert t.router.addresses["eth0"] == ["203.0.113.1/24"]
    assert {v.name: (v.host, v.bridge, v.mac) for v in t.vms.values()}["web1"] == (
        "compute1",
        "br100",
        "fa:16:3e:00:00:01",
    )


def test_more_hosts_get_fresh_addresses_and_fewer_hosts_drop_their_vms():
    t = default_topology(hosts=6)
    assert list(t.hosts)[4:] == ["compute3", "compute4"]
    octets = [h.first_address("eth0").rsplit(".", 1)[1] for h in t.hosts.values()]
    assert len(set(octets)) == 6
    t = default_topology(hosts=1)
    assert set(t.vms) == {"web1", "app1"}


def test_yaml_round_trip():
    t = Topology.from_yaml(YAML)
    assert t.vms["web1"].mac == "fa:16:3e:00:00:01"
    assert [n.ifname for n in t.vms["two"].nics] == ["eth0", "eth1"]
    assert t.vms["two"].tap(1) == "tap-two-1"
    assert Topology.from_yaml(t.to_yaml()).to_dict() == t.to_dict()
    d = default_topology()
    assert Topology.from_yaml(d.to_yaml()).to_dict() == d.to_dict()


@pytest.mark.parametrize(
    "change, problem",
    [
        (lambda d: d["hosts"]["compute1"]["links"].update(eth9="nowhere"), "unknown segment"),
        (lambda d: d["hosts"]["compute1"]["addresses"].update(eth0="203.0.113.11"), "bad address"),
        (lambda d: d["vms"]["web1"].update(host="compute9"), "unknown host"),
        (lambda d: d["vms"]["web1"].update(mac="fa:16:3e:00:00:02"), "also used by"),
        (
            lambda d: d["vms"].update(
                averyveryverylongname={"host": "compute1", "bridge": "br1", "mac": "fa:16:3e:00:00:09"}
            ),
            "too long",
        ),
        (lambda d: d["segments"].append("a-segment-name-too-long"), "<= 15"),
    ],
)
def test_invalid_topologies_are_refused(change, problem):
    import yaml

    d = yaml.safe_load(YAML)
    change(d)
    with pytest.raises(TopologyError, match=problem):
        Topology.from_dict(d)


def test_lab_pillar_follows_the_topology():
    p = lab_pillar(default_topology())["hanet"]
    assert set(p["networks"]) == {"private", "shared", "hw"}
    assert p["hosts"]["compute1"]["routing_source_ip"] == "203.0.113.11"
    assert set(p["instances"]) == {"web1", "db1", "app1", "hw1"}
    p = lab_pillar(default_topology(hosts=2))["hanet"]
    assert set(p["networks"]) == {"private", "hw"}  # no net1/net2: no shared network
    assert set(p["instances"]) == {"web1", "db1", "hw1"}
