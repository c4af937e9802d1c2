"""The pillar model: defaults, validation with paths, and the desired host state."""

import copy
import os

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _hanet import desired, model

CONTRACT = os.environ.get(
    "HANET_CONTRACT", os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "contract")
)
EXAMPLE_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "pillar", "hanet.sls")


def example():
    """The contract's pillar.example.sls (a copy lives in pillar/hanet.sls)."""
    for path in (os.path.join(CONTRACT, "pillar.example.sls"), EXAMPLE_PATH):
        if os.path.exists(path):
            with open(path) as fh:
                return yaml.safe_load(fh)["hanet"]
    raise AssertionError("no example pillar found")


def problems(pillar):
    with pytest.raises(model.PillarError) as err:
        model.load(pillar)
    return err.value.problems


def test_contract_example_validates_with_defaults():
    cfg = model.load(example())
    assert set(cfg.networks) == {"private", "shared", "red", "green", "blue"}
    assert cfg.networks["private"].dhcp_start == "192.168.0.2"
    assert cfg.networks["red"].vlan == 101
    assert cfg.networks["blue"].vxlan.vni == 5102
    assert cfg.networks["shared"].network_hosts == ("net1", "net2")
    assert cfg.instances["web1"].floating_ips[0] == model.FloatingIp("203.0.113.50", "192.168.0.10")
    assert cfg.instances["db1"].floating_ips[0].fixed_ip == "172.16.101.20"
    assert cfg.metadata_port == 8775 and cfg.dhcp_domain == "novalocal"


def test_defaults_fill_a_minimal_pillar():
    cfg = model.load({"networks": {"n": {"cidr": "10.0.0.0/24", "bridge": "br0", "multi_host": True}}})
    assert cfg.firewall_driver == "nftables"
    assert cfg.send_arp_for_ha is False and cfg.send_arp_for_ha_count == 3
    assert cfg.ha == model.Ha(100, 3)
    assert cfg.networks["n"].dhcp_start == "10.0.0.1"
    assert cfg.networks["n"].mtu == 1500


def test_broken_pillar_reports_every_mistake_with_its_path():
    p = example()
    p["networks"]["red"]["vlan"] = 5000  # 1 VLAN out of range
    p["networks"]["green"]["gateway"] = "10.9.9.1"  # 2 gateway outside cidr
    p["instances"]["web1"]["nics"][0]["ip"] = "10.9.9.9"  # 3 address outside cidr
    p["instances"]["db1"]["nics"][0]["mac"] = "fa:16:3e:00:00:01"  # 4 duplicate MAC
    p["instances"]["db1"]["host"] = "compute9"  # 5 unknown host
    p["networks"]["blue"]["cidr"] = "192.168.0.0/23"  # 6 overlaps private
    p["instances"]["web1"]["floating_ips"] = ["192.168.0.3"]  # 7 floating IP is a fixed IP
    p["networks"]["shared"]["bridge_interface"] = "eth1"  # 8 same flat uplink as private on a host
    p["hosts"]["compute2"]["networks"]["private"]["address"] = "192.168.0.3"  # 9 duplicate IP
    p["instances"]["db1"]["nics"].append({"network": "nosuchnet", "mac": "fa:16:3e:00:00:77", "ip": "10.1.1.1"})  # 10
    p["firewall_driver"] = "pf"  # 11 bad option
    p["netwroks"] = {}  # 12 typo
    got = problems(p)
    paths = [path for path, _ in got]
    expected = {
        "hanet:networks:red:vlan": "out of range 1..4094",
        "hanet:networks:green:gateway": "not in the network's cidr",
        "hanet:instances:web1:nics:0:ip": "not in network private's cidr 192.168.0.0/24",
        "hanet:instances:web1:nics:0:mac": "already used at hanet:instances:db1:nics:0:mac",
        "hanet:instances:db1:host": "unknown host 'compute9'",
        "hanet:networks:private:cidr": "overlaps network blue",
        "hanet:instances:web1:floating_ips:0": "also a fixed IP",
        "hanet:networks:shared:bridge_interface": "one uplink fits one bridge",
        "hanet:hosts:compute2:networks:private:address": "already used",
        "hanet:instances:db1:nics:1:network": "unknown network 'nosuchnet'",
        "hanet:firewall_driver": "not nftables or iptables",
        "hanet:netwroks": "did you mean networks",
    }
    for path, text in expected.items():
        assert any(p == path and text in m for p, m in got), (path, text, got)
    assert len(set(paths)) >= 12
    # one message lists them all
    rendered = model.PillarError(got).render()
    assert rendered.startswith(f"hanet pillar has {len(got)} problems:")
    assert all(path in rendered for path in expected)


@pytest.mark.parametrize(
    "mutate, path, text",
    [
        (lambda p: p["networks"]["private"].update(cidr="192.168.0.1/24"), "hanet:networks:private:cidr", "host bits"),
        (
            lambda p: p["networks"]["blue"]["vxlan"].update(group="10.0.0.1"),
            "hanet:networks:blue:vxlan:group",
            "not a multicast",
        ),
        (
            lambda p: p["networks"]["blue"]["vxlan"].update(remotes=["192.0.2.1"]),
            "hanet:networks:blue:vxlan",
            "exclusive",
        ),
        (lambda p: p["networks"]["blue"].update(vlan=7), "hanet:networks:blue", "exclusive"),
        (lambda p: p["networks"]["shared"].update(network_hosts=[]), "hanet:networks:shared:network_hosts", "required"),
        (
            lambda p: p["networks"]["shared"].update(network_hosts=["net1", "net9"]),
            "hanet:networks:shared:network_hosts:1",
            "unknown host",
        ),
        (
            lambda p: p["hosts"]["net2"]["networks"].pop("shared"),
            "hanet:networks:shared:network_hosts:1",
            "no address on shared",
        ),
        (
            lambda p: p["hosts"]["net1"]["networks"]["shared"].update(address="10.20.0.1"),
            "hanet:hosts:net1:networks:shared:address",
            "gateway",
        ),
        (
            lambda p: p["networks"]["green"].update(vlan=101, bridge_interface="eth2"),
            "hanet:networks:red:vlan",
            "already network green's",
        ),
        (
            lambda p: p["networks"]["green"].update(bridge="br101"),
            "hanet:networks:red:bridge",
            "already network green's",
        ),
        (
            lambda p: p["networks"]["red"].pop("gateway"),
            "hanet:networks:red:gateway",
            "required with gateway_mode: hardware",
        ),
        (
            lambda p: p["networks"]["red"].update(multi_host=False, network_hosts=["net1", "net2"]),
            "hanet:networks:red:dhcp_server",
            "required with gateway_mode: hardware and network_hosts",
        ),
        (
            lambda p: p["networks"]["private"].update(dhcp_server="192.168.0.2"),
            "hanet:networks:private:dhcp_server",
            "is for networks with network_hosts and gateway_mode: hardware",
        ),
        (
            lambda p: p["networks"]["red"].update(
                multi_host=False, network_hosts=["net1", "net2"], dhcp_server="172.16.200.2"
            ),
            "hanet:networks:red:dhcp_server",
            "not in the network's cidr",
        ),
        (
            lambda p: p["networks"]["red"].update(
                multi_host=False, network_hosts=["net1", "net2"], dhcp_server="172.16.100.3"
            ),
            "hanet:hosts:compute1:networks:red:address",
            "is network red's dhcp_server",
        ),
        (
            lambda p: p["networks"]["red"].update(gateway_mode="router"),
            "hanet:networks:red:gateway_mode",
            "not host or hardware",
        ),
        (
            lambda p: p["networks"]["red"].update(bridge="a-very-long-bridge-name"),
            "hanet:networks:red:bridge",
            "interface name",
        ),
        (
            lambda p: p["hosts"]["compute1"]["networks"].pop("private"),
            "hanet:instances:web1:nics:0:network",
            "no address on it",
        ),
        (lambda p: p["instances"]["web1"].update(nics=[]), "hanet:instances:web1:nics", "at least one NIC"),
        (
            lambda p: p["instances"]["web1"]["nics"].append(
                {"network": "private", "mac": "fa:16:3e:00:00:09", "ip": "192.168.0.99"}
            ),
            "hanet:instances:web1:nics:2:network",
            "already has NIC 0",
        ),
        (
            lambda p: p["instances"]["db1"]["floating_ips"][0].update(fixed_ip="172.16.101.99"),
            "hanet:instances:db1:floating_ips:0:fixed_ip",
            "not one of",
        ),
        (
            lambda p: p["instances"]["db1"].update(floating_ips=["203.0.113.50"]),
            "hanet:instances:web1:floating_ips:0",
            "already used at hanet:instances:db1",
        ),
        (
            lambda p: p["instances"]["db1"]["nics"][0].update(mac="01:00:5e:00:00:01"),
            "hanet:instances:db1:nics:0:mac",
            "multicast",
        ),
        (
            lambda p: p["instances"]["db1"]["nics"][0].update(ip="172.16.101.1"),
            "hanet:instances:db1:nics:0:ip",
            "gateway",
        ),
        (
            lambda p: p["instances"]["db1"]["nics"][0].update(ip="172.16.101.255"),
            "hanet:instances:db1:nics:0:ip",
            "broadcast",
        ),
        (lambda p: p["ha"].update(probe_misses=0), "hanet:ha:probe_misses", "out of range"),
        (lambda p: p.update(dhcp_lease_time="a day"), "hanet:dhcp_lease_time", "integer"),
        (lambda p: p.update(send_arp_for_ha="yes"), "hanet:send_arp_for_ha", "true or false"),
        (lambda p: p.update(dns_servers=["8.8.8.x"]), "hanet:dns_servers:0", "not an IPv4"),
        (lambda p: p.update(networks=[]), "hanet:networks", "must be a mapping"),
        (
            lambda p: p["hosts"]["compute1"].update(routing_source_ip="203.0.113.50"),
            "hanet:hosts:compute1:routing_source_ip",
            "floating IP",
        ),
        (
            lambda p: p["networks"]["private"].update(snat_address="203.0.113.40"),
            "hanet:networks:private:snat_address",
            "for networks with network_hosts",
        ),
        (
            lambda p: p["networks"]["shared"].update(snat_address="203.0.113.50"),
            "hanet:networks:shared:snat_address",
            "already used at hanet:instances:",
        ),
        (
            lambda p: p["networks"]["shared"].update(snat_address="203.0.113.21"),
            "hanet:networks:shared:snat_address",
            "already used at hanet:hosts:net1:routing_source_ip",
        ),
        (
            lambda p: p["networks"]["shared"].update(snat_address="192.168.0.77"),
            "hanet:networks:shared:snat_address",
            "inside network private's cidr",
        ),
        (
            lambda p: p["networks"]["shared"].update(snat_address="203.0.113.x"),
            "hanet:networks:shared:snat_address",
            "not an IPv4",
        ),
        (
            lambda p: p.setdefault("ha", {}).update(conntrack_sync={"interface": "mgmt0", "group": "10.0.0.1"}),
            "hanet:ha:conntrack_sync:group",
            "not a multicast address",
        ),
        (
            lambda p: p.setdefault("ha", {}).update(conntrack_sync={"group": "225.0.0.50"}),
            "hanet:ha:conntrack_sync:interface",
            "interface name",
        ),
        (
            lambda p: p.setdefault("ha", {}).update(conntrack_sync={"interface": "mgmt0", "port": 70000}),
            "hanet:ha:conntrack_sync:port",
            "out of range",
        ),
        # a value ending in a newline passed a ^...$ match: every pattern must match all of it
        (lambda p: p["networks"]["red"].update(bridge="br102\n"), "hanet:networks:red:bridge", "interface name"),
        (lambda p: p["instances"]["web1"].update(hostname="web1\n"), "hanet:instances:web1:hostname", ""),
        (lambda p: p.update(dhcp_domain="novalocal\n"), "hanet:dhcp_domain", "DNS domain"),
        (lambda p: p.update(dnsmasq_user="dns masq"), "hanet:dnsmasq_user", "user name"),
        (lambda p: p.update(dnsmasq_user=0), "hanet:dnsmasq_user", "user name"),
    ],
)
def test_each_mistake_is_named_by_its_path(mutate, path, text):
    p = example()
    mutate(p)
    got = problems(p)
    assert any(pp == path and text in m for pp, m in got), got


def test_not_a_mapping():
    assert problems("hanet") == [("hanet", "must be a mapping, not a string")]
    assert problems(None) == [("hanet", "is required")]


# ---------------------------------------------------------------- property tests

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 70000),
    st.text(max_size=12),
    st.sampled_from(
        [
            "10.0.0.0/24",
            "10.0.0.1",
            "fa:16:3e:00:00:01",
            "br0",
            "eth1",
            "203.0.113.5",
            "239.1.1.1",
            "hardware",
            "host",
            "nftables",
        ]
    ),
)
trees = st.recursive(
    scalars,
    lambda kids: st.one_of(
        st.lists(kids, max_size=4),
        st.dictionaries(
            st.sampled_from(
                sorted(
                    model.TOP_KEYS
                    | model.NETWORK_KEYS
                    | model.INSTANCE_KEYS
                    | model.NIC_KEYS
                    | {"vni", "group", "remotes", "address", "a", "b", "compute1"}
                )
            ),
            kids,
            max_size=5,
        ),
    ),
    max_leaves=30,
)


def _assert_only_model_errors(value):
    try:
        model.load(value)
    except model.PillarError as err:
        assert err.problems, "a PillarError always says what is wrong"
        for path, msg in err.problems:
            assert path == "hanet" or path.startswith("hanet:"), path
            assert isinstance(msg, str) and msg


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees)
def test_validator_never_crashes_on_arbitrary_input(value):
    _assert_only_model_errors(value)


def _mutations():
    """Replace one leaf of the example by an arbitrary value."""
    leaves = []

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, path + (k,))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, path + (i,))
        leaves.append(path)

    walk(example(), ())
    return st.tuples(st.sampled_from([p for p in leaves if p]), scalars | trees)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mutations())
def test_mutated_example_only_raises_model_errors(mutation):
    path, value = mutation
    p = example()
    node = p
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    _assert_only_model_errors(p)
    # and the desired state of every host computes when it validates
    try:
        cfg = model.load(p)
    except model.PillarError:
        return
    for host in cfg.hosts:
        desired.compute(cfg, host)


# ---------------------------------------------------------------- desired state


def test_every_hosts_dnsmasq_names_every_instance_of_the_network():
    """nova's update_dns_entries: compute1's dnsmasq for `private` resolves db2 too,
    which compute2 serves; compute1's DHCP hosts stay its own."""
    p = example()
    p["instances"]["db2"] = {
        "host": "compute2",
        "nics": [{"network": "private", "mac": "fa:16:3e:00:00:09", "ip": "192.168.0.11"}],
    }
    cfg = model.load(p)
    for host in ("compute1", "compute2"):
        dm = {d.network: d for d in desired.compute(cfg, host).dnsmasqs}["private"]
        assert dm.names == (
            ("192.168.0.10", "web1.novalocal", "web1"),
            ("192.168.0.11", "db2.novalocal", "db2"),
        )
    dm = {d.network: d for d in desired.compute(cfg, "compute1").dnsmasqs}["private"]
    assert [h.ip for h in dm.hosts] == ["192.168.0.10"]


def test_multi_host_compute_host_serves_its_own_instances():
    cfg = model.load(example())
    st_ = desired.compute(cfg, "compute1")
    br = {b.name: b for b in st_.bridges}
    assert br["br100"].addresses == ("192.168.0.3/24",) and br["br100"].uplink == "eth1"
    assert br["br101"].segment.kind == "vlan" and br["br101"].uplink == "vlan101"
    assert br["br200"].addresses == ()  # a member of the network-host network: bridge only
    dm = {d.network: d for d in st_.dnsmasqs}
    assert set(dm) == {"private", "red"}
    assert dm["private"].router == "192.168.0.3" and dm["private"].listen_address == "192.168.0.3"
    assert dm["red"].router == "172.16.100.1"  # hardware gateway
    assert [h.ip for h in dm["private"].hosts] == ["192.168.0.10"]
    assert dm["private"].hosts[0].hostname == "web1.novalocal"
    assert st_.ruleset.snat[0].source == "203.0.113.11"
    assert [f.address for f in st_.floating_ips] == ["203.0.113.50"]
    assert dict(st_.roles) == {"private": "serving", "red": "serving", "shared": "member"}
    assert st_.ruleset.forward_bridges == ("br100",)  # not the hardware-gateway bridge
    # metadata: the hardware router routes 169.254.169.254 to the host, which REDIRECTs it
    assert st_.ruleset.metadata.bridges == ("br100", "br101")


def test_network_host_holds_gateway_and_standby_does_not():
    cfg = model.load(example())
    a, b = desired.compute(cfg, "net1"), desired.compute(cfg, "net2")
    assert a.bridges[0].addresses == ("10.20.0.2/24", "10.20.0.1/24")
    assert b.bridges[0].addresses == ("10.20.0.3/24",)
    assert a.dnsmasqs[0].listen_address == "10.20.0.1" and a.dnsmasqs[0].router == "10.20.0.1"
    assert [h.mac for h in a.dnsmasqs[0].hosts] == ["fa:16:3e:00:01:01"]  # web1 on compute1
    assert b.dnsmasqs == () and dict(b.roles) == {"shared": "standby"}
    # a hot standby already holds the network's rules, but no address and no dnsmasq
    assert b.ruleset.snat[0].source == "203.0.113.22" and b.ruleset.forward_bridges == ("br200",)
    # each watches the other on the VM network and the public side; compute1 watches both
    assert dict(b.liveness) == {"net1": (("br200", "10.20.0.2"), ("eth0", "203.0.113.21"))}
    assert dict(desired.compute(cfg, "compute1").liveness) == {
        "net1": (("br200", "10.20.0.2"), ("eth0", "203.0.113.21")),
        "net2": (("br200", "10.20.0.3"), ("eth0", "203.0.113.22")),
    }
    # after a failover the record says net2 holds it
    a2, b2 = desired.compute(cfg, "net1", {"shared": "net2"}), desired.compute(cfg, "net2", {"shared": "net2"})
    assert a2.bridges[0].addresses == ("10.20.0.2/24",) and dict(a2.roles) == {"shared": "standby"}
    assert b2.bridges[0].addresses == ("10.20.0.3/24", "10.20.0.1/24") and b2.dnsmasqs
    # what a standby probes (DAD) the moment its peer is reported down: the gateway it
    # would take over; the serving host and a compute host probe nothing
    assert dict(b.standby_for) == {"net1": (("br200", "10.20.0.1"),)}
    assert a.standby_for == () and desired.compute(cfg, "compute1").standby_for == ()
    assert dict(a2.standby_for) == {"net2": (("br200", "10.20.0.1"),)} and b2.standby_for == ()


def test_single_default_gateway_marks_non_first_nics():
    p = example()
    p["use_single_default_gateway"] = True
    cfg = model.load(p)
    net1 = desired.compute(cfg, "net1")
    assert net1.dnsmasqs[0].hosts[0].default_route is False  # web1's second NIC
    c1 = desired.compute(cfg, "compute1")
    assert {d.network: d for d in c1.dnsmasqs}["private"].hosts[0].default_route is True


def test_unknown_host_gets_an_empty_state():
    st_ = desired.compute(model.load(example()), "stranger")
    assert st_.bridges == () and st_.dnsmasqs == () and st_.ruleset.snat == ()


def test_desired_state_is_deterministic_and_plain():
    cfg = model.load(example())
    assert desired.compute(cfg, "compute2") == desired.compute(model.load(copy.deepcopy(example())), "compute2")
    import json

    json.dumps(desired.compute(cfg, "compute2").to_dict())


def test_nic_port_names_the_tap_and_reaches_the_guard():
    p = example()
    p["instances"]["web1"]["nics"][0]["port"] = "tap-web1"
    cfg = model.load(p)
    assert cfg.instances["web1"].nics[0].port == "tap-web1"
    assert cfg.instances["web1"].nics[1].port is None  # not given: libvirt's MAC rule
    guard = {g.bridge: g for g in desired.compute(cfg, "compute1").ruleset.guards}["br100"]
    assert guard.ports == (("fa:16:3e:00:00:01", "tap-web1"),)
    assert guard.pairs == (("fa:16:3e:00:00:01", "192.168.0.10"),)


@pytest.mark.parametrize(
    "port, text",
    [
        ("a-very-long-tap-name", "interface name"),
        ("tap web1", "interface name"),
        ("", "interface name"),
        (7, "interface name"),
    ],
)
def test_bad_nic_port_is_named_by_its_path(port, text):
    p = example()
    p["instances"]["web1"]["nics"][0]["port"] = port
    got = problems(p)
    assert any(pp == "hanet:instances:web1:nics:0:port" and text in m for pp, m in got), got


def test_one_port_is_one_nics():
    p = example()
    p["instances"]["web1"]["nics"][0]["port"] = "vnet0"
    p["instances"]["web1"]["nics"][1]["port"] = "vnet0"  # same host compute1
    got = problems(p)
    assert any(
        pp == "hanet:instances:web1:nics:1:port" and "already hanet:instances:web1:nics:0:port" in m for pp, m in got
    ), got
    p["instances"]["web1"]["nics"][1]["port"] = "vnet1"
    p["instances"]["db1"]["nics"][0]["port"] = "vnet0"  # another host: fine
    model.load(p)


def test_unicode_digits_are_not_integers():
    """'¹'.isdigit() is True but int('¹') fails: found by hypothesis."""
    p = example()
    p["send_arp_for_ha_count"] = "\u00b9"
    assert problems(p) == [("hanet:send_arp_for_ha_count", "must be an integer in 0..100, not '\u00b9'")]


def test_a_standby_probes_the_floating_ips_that_would_move_with_the_network():
    p = example()
    p["instances"]["web1"]["floating_ips"].append({"address": "203.0.113.70", "fixed_ip": "10.20.0.10"})
    cfg = model.load(p)
    b = desired.compute(cfg, "net2")
    assert dict(b.standby_for) == {"net1": (("br200", "10.20.0.1"), ("eth0", "203.0.113.70"))}
    # the FIP of web1's first NIC (private, multi-host) is not the standby's business
    assert all(ip != "203.0.113.50" for _, ip in dict(b.standby_for)["net1"])


def test_a_snat_address_is_bound_by_the_owner_and_moves_with_the_gateway():
    """networks:shared:snat_address: the SNAT source of both network hosts (the owner's
    and the hot standby's rule), bound by the owner like a floating IP (no NAT of its
    own), probed by the standby, and bound by the standby once the record names it."""
    p = example()
    p["networks"]["shared"]["snat_address"] = "203.0.113.40"
    cfg = model.load(p)
    a, b = desired.compute(cfg, "net1"), desired.compute(cfg, "net2")
    assert [s.source for s in a.ruleset.snat if s.network == "shared"] == ["203.0.113.40"]
    assert [s.source for s in b.ruleset.snat if s.network == "shared"] == ["203.0.113.40"]
    assert [(f.address, f.public_interface) for f in a.floating_ips if f.network == "shared"] == [
        ("203.0.113.40", "eth0")
    ]
    assert b.floating_ips == () and "203.0.113.40" not in {f.address for f in b.ruleset.floating}
    assert a.ruleset.snat_addresses == b.ruleset.snat_addresses == ("203.0.113.40",)
    assert ("eth0", "203.0.113.40") in dict(b.standby_for)["net1"]
    b2 = desired.compute(cfg, "net2", {"shared": "net2"})
    assert "203.0.113.40" in {f.address for f in b2.floating_ips}
    # a compute host of the network SNATs nothing of it and knows nothing of the address
    c = desired.compute(cfg, "compute1")
    assert c.ruleset.snat_addresses == () and "203.0.113.40" not in {f.address for f in c.floating_ips}


def test_conntrack_sync_runs_on_the_network_hosts_only():
    """ha:conntrack_sync: each network host gets a conntrackd for the fixed ranges of the
    networks it serves or stands by for; compute hosts get none; off by default."""
    p = example()
    assert desired.compute(model.load(p), "net1").conntrack_sync is None
    p.setdefault("ha", {})["conntrack_sync"] = {"interface": "mgmt0"}
    cfg = model.load(p)
    for h in ("net1", "net2"):
        sync = desired.compute(cfg, h).conntrack_sync
        assert (sync.interface, sync.group, sync.port, sync.accept) == ("mgmt0", "225.0.0.50", 3780, ("10.20.0.0/24",))
    assert desired.compute(cfg, "compute1").conntrack_sync is None


def shared_private():
    """The example with share_dhcp_address on `private` (multi_host): the hosts that
    serve it list it without an address (with it, their address is the gateway)."""
    p = example()
    p["networks"]["private"]["share_dhcp_address"] = True
    for host in p["hosts"].values():
        if "private" in (host.get("networks") or {}):
            host["networks"]["private"] = {}
    return p


def test_share_dhcp_address_gives_every_host_the_gateway_and_one_mac():
    cfg = model.load(shared_private())
    net = cfg.networks["private"]
    assert net.share_dhcp_address and net.shared_mac
    first = int(net.shared_mac.split(":")[0], 16)
    assert first & 2 and not first & 1  # locally administered, unicast
    by_host = {}
    for host in ("compute1", "compute2"):
        st_ = desired.compute(cfg, host)
        br = {b.name: b for b in st_.bridges}["br100"]
        dm = {d.network: d for d in st_.dnsmasqs}["private"]
        guard = {g.bridge: g for g in st_.ruleset.guards}["br100"]
        assert br.addresses == ("192.168.0.1/24",) and br.shared_mac == net.shared_mac
        assert dm.listen_address == dm.router == "192.168.0.1"
        assert guard.local_only == (("192.168.0.1", net.shared_mac),) and guard.trusted_ports == ("eth1",)
        assert dict(st_.roles)["private"] == "serving"
        by_host[host] = [h.ip for h in dm.hosts]
    assert by_host == {"compute1": ["192.168.0.10"], "compute2": []}  # each its own instances
    # a network without it keeps the uplink's MAC and per-host addresses
    plain = {b.name: b for b in desired.compute(model.load(example()), "compute1").bridges}["br100"]
    assert plain.shared_mac is None and plain.addresses == ("192.168.0.3/24",)


def test_the_shared_mac_is_the_same_for_the_same_network_and_differs_between_networks():
    a = model.load(shared_private()).networks["private"].shared_mac
    assert a == model.load(shared_private()).networks["private"].shared_mac
    p = shared_private()
    p["networks"]["private"]["cidr"] = "192.168.8.0/24"
    p["networks"]["private"]["gateway"] = "192.168.8.1"
    p["networks"]["private"]["dhcp_start"] = "192.168.8.2"
    for inst in p["instances"].values():
        for nic in inst["nics"]:
            if nic["network"] == "private":
                nic["ip"] = nic["ip"].replace("192.168.0.", "192.168.8.")
    assert model.load(p).networks["private"].shared_mac != a


@pytest.mark.parametrize(
    "mutate, path, text",
    [
        (
            lambda p: p["networks"]["shared"].update(share_dhcp_address=True),
            "hanet:networks:shared:share_dhcp_address",
            "is for multi_host networks",
        ),
        (
            lambda p: p["networks"]["red"].update(share_dhcp_address=True),
            "hanet:networks:red:share_dhcp_address",
            "gateway_mode: host",
        ),
        (
            lambda p: p["networks"]["private"].pop("gateway"),
            "hanet:networks:private:gateway",
            "is required with share_dhcp_address",
        ),
        (
            lambda p: p["networks"]["private"].update(share_dhcp_address="yes"),
            "hanet:networks:private:share_dhcp_address",
            "must be true or false",
        ),
        (
            lambda p: p["hosts"]["compute1"]["networks"].update(private={"address": "192.168.0.3"}),
            "hanet:hosts:compute1:networks:private:address",
            "every host uses its gateway 192.168.0.1",
        ),
        (
            lambda p: p["instances"]["web1"]["nics"][0].update(ip="192.168.0.1"),
            "hanet:instances:web1:nics:0:ip",
            "gateway",
        ),
    ],
)
def test_share_dhcp_address_mistakes_are_named_by_their_path(mutate, path, text):
    p = shared_private()
    mutate(p)
    got = problems(p)
    assert any(where == path and text in why for where, why in got), got


def test_share_dhcp_address_allows_the_gateway_as_a_hosts_address():
    p = shared_private()
    p["hosts"]["compute1"]["networks"]["private"] = {"address": "192.168.0.1"}
    cfg = model.load(p)
    assert cfg.hosts["compute1"].networks["private"].address == "192.168.0.1"
    assert cfg.hosts["compute2"].networks["private"].address == "192.168.0.1"


def test_dhcp_checksum_fill_covers_every_bridge_a_host_serves_dhcp_on():
    p = example()
    for host in ("compute1", "net1", "net2"):
        assert desired.compute(model.load(p), host).ruleset.checksum_fill == ()
    p["dhcp_checksum_fill"] = True
    cfg = model.load(p)
    for host in ("compute1", "net1", "net2"):
        rs = desired.compute(cfg, host).ruleset
        assert rs.checksum_fill == tuple(sorted(set(rs.service_bridges))) and rs.checksum_fill
    p["dhcp_checksum_fill"] = "yes"
    assert any(path == "hanet:dhcp_checksum_fill" for path, _ in problems(p))


def test_hybrid_on_hardware_gateway_networks_where_the_host_holds_the_floating_ips():
    """The example's green network (gateway_mode hardware, multi_host): compute2 serves
    green1, whose floating IP it holds: its frames off the network, and every VM's
    metadata requests, go to compute2's IP stack; a host-gatewayed network has none."""
    cfg = model.load(example())
    guards = {g.bridge: g for g in desired.compute(cfg, "compute2").ruleset.guards}
    green = next(g for g in guards.values() if "172.16.101.20" in dict((ip, m) for m, ip in g.pairs))
    assert green.routed_from == ("172.16.101.20",) and green.routed_metadata
    assert "172.16.101.0/24" in green.routed_exempt and not green.routed_force
    assert not any(g.routed_from or g.routed_metadata for b, g in guards.items() if b == "br100")
    p = example()
    p["force_snat_range"] = ["198.51.100.0/24"]
    p["metadata_host"] = "10.0.0.5"  # a central metadata host: not taken off the bridge
    guards = {g.bridge: g for g in desired.compute(model.load(p), "compute2").ruleset.guards}
    green = next(g for g in guards.values() if g.routed_from)
    assert green.routed_force == ("198.51.100.0/24",) and not green.routed_metadata
    assert "10.0.0.5/32" in green.routed_exempt


def test_a_one_nic_host_s_public_traffic_leaves_by_the_bridge_that_took_its_nic():
    """public_interface is the flat uplink of a bridge on this host: the bridge carries
    the public address (links.carry), so floating IPs are bound there and SNAT goes out
    of it; a host whose public interface is no uplink is unchanged."""
    p = example()
    uplink = p["networks"]["private"]["bridge_interface"]
    p["hosts"]["compute1"]["public_interface"] = uplink
    state = desired.compute(model.load(p), "compute1")
    assert desired.public_link(model.load(p), "compute1") == "br100"
    assert {f.public_interface for f in state.floating_ips} == {"br100"}
    assert {s.out_interface for s in state.ruleset.snat} == {"br100"}
    assert desired.public_link(model.load(p), "compute2") == p["hosts"]["compute2"]["public_interface"]


def test_a_shared_dhcp_address_network_cannot_ride_on_a_host_s_public_nic():
    p = example()
    p["networks"]["private"]["share_dhcp_address"] = True
    for host in p["hosts"].values():
        host.get("networks", {}).pop("private", None)  # every host serves at the gateway
    assert model.load(p)
    p["hosts"]["compute1"]["public_interface"] = p["networks"]["private"]["bridge_interface"]
    assert [path for path, _ in problems(p)] == ["hanet:hosts:compute1:public_interface"]


def _green_on_network_hosts(p):
    """The example's green network (hardware router 172.16.101.1) served by net1 and
    net2 instead of multi_host: dhcp_server 172.16.101.2 moves between them."""
    p["networks"]["green"].update(multi_host=False, network_hosts=["net1", "net2"], dhcp_server="172.16.101.2")
    p["hosts"]["compute2"]["networks"].pop("green")
    p["hosts"]["net1"]["networks"]["green"] = {"address": "172.16.101.5"}
    p["hosts"]["net2"]["networks"]["green"] = {"address": "172.16.101.6"}
    return p


def test_a_hardware_network_with_network_hosts_moves_its_dhcp_server_not_the_router():
    """The owner binds the dhcp_server (never the router's gateway) and listens there;
    every NIC's router is the hardware one; the standby probes the dhcp_server and the
    floating IP before a takeover; both route what reaches them from the bridge to the
    public side only. The compute host readdresses what its VM with a floating IP sends
    out of the network, and every VM's metadata requests, to the owner (its MAC, which
    the beacon follows): nothing to its own IP stack."""
    cfg = model.load(_green_on_network_hosts(example()))
    net = cfg.networks["green"]
    # (the contract's example has no such network: this is the extension, on green)
    assert (net.service_address, net.service_cidr) == ("172.16.101.2", "172.16.101.2/24")
    owner, standby, compute = (desired.compute(cfg, h) for h in ("net1", "net2", "compute2"))
    br = {b.network: b for b in owner.bridges}["green"]
    assert br.addresses == ("172.16.101.5/24", "172.16.101.2/24") and br.guarded == ("172.16.101.2/24",)
    assert {b.network: b for b in standby.bridges}["green"].addresses == ("172.16.101.6/24",)
    (dm,) = [d for d in owner.dnsmasqs if d.network == "green"]
    assert (dm.listen_address, dm.router) == ("172.16.101.2", "172.16.101.1")
    assert not [d for d in standby.dnsmasqs if d.network == "green"]
    assert ("br102", "172.16.101.2") in dict(standby.standby_for)["net1"]
    assert ("eth0", "203.0.113.51") in dict(standby.standby_for)["net1"]
    for hs in (owner, standby):
        assert ("br102", "eth0") in hs.ruleset.routed and ("net.ipv4.ip_forward", "1") in hs.sysctls
        assert "br102" not in hs.ruleset.forward_bridges and "br102" in hs.ruleset.metadata.bridges
    assert [f.address for f in owner.floating_ips if f.network == "green"] == ["203.0.113.51"]
    assert owner.follow == () and standby.follow == ()
    green = {b.network: b for b in compute.bridges}["green"]
    assert green.addresses == () and not [d for d in compute.dnsmasqs if d.network == "green"]
    guard = next(g for g in compute.ruleset.guards if g.bridge == "br102")
    assert (guard.routed_from, guard.routed_metadata, guard.routed_via) == (("172.16.101.20",), True, "172.16.101.2")
    assert compute.follow == (("br102", "172.16.101.2"),)
    assert ("br102", "eth0") not in compute.ruleset.routed
    from _hanet.host import beacon_config

    assert {"follow": [["br102", "172.16.101.2"]]} in beacon_config(compute)
    # nothing to route (no floating IP here, a central metadata host, no force_snat_range):
    # no redirect, no owner to follow
    p = _green_on_network_hosts(example())
    p["instances"]["db1"]["floating_ips"] = []
    p["metadata_host"] = "10.0.0.5"
    compute = desired.compute(model.load(p), "compute2")
    guard = next(g for g in compute.ruleset.guards if g.bridge == "br102")
    assert (guard.routed_from, guard.routed_metadata, guard.routed_via, compute.follow) == ((), False, None, ())


def test_dhcp_server_mistakes_are_named():
    p = _green_on_network_hosts(example())
    p["networks"]["green"]["dhcp_server"] = "172.16.101.1"
    assert any(path == "hanet:networks:green:dhcp_server" and "already used" in msg for path, msg in problems(p))
    p = _green_on_network_hosts(example())
    p["instances"]["db1"]["nics"][0]["ip"] = "172.16.101.2"
    assert any(path.endswith("nics:0:ip") and "dhcp_server" in msg for path, msg in problems(p))
    p = _green_on_network_hosts(example())
    del p["networks"]["green"]["dhcp_server"]
    assert any(path == "hanet:networks:green:dhcp_server" and "required" in msg for path, msg in problems(p))
