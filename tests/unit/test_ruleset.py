"""The ruleset applier: rendering (both drivers), and apply/current/plan against the real
kernel in a network namespace each test creates (never the root namespace's ruleset)."""

import dataclasses
import os
import random
import shutil

import kernel_ns
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _hanet import ruleset as R
from _hanet.common import Managed, Paths
from _hanet.desired import FloatingIp, Metadata, PortGuard, Ruleset, Snat

MAC1, MAC2 = "fa:16:3e:00:00:01", "fa:16:3e:00:00:02"


def sample(driver="nftables", metadata_host="127.0.0.1", table="hanet"):
    return Ruleset(
        driver=driver,
        table=table,
        snat=(
            Snat(
                network="private",
                cidr="192.168.0.0/24",
                source="203.0.113.11",
                out_interface="eth0",
                exempt=("10.0.0.0/8", "192.168.0.0/24"),
                force=("198.51.100.0/24",),
            ),
            Snat(
                network="red",
                cidr="172.16.100.0/24",
                source=None,
                out_interface="eth0",
                exempt=("172.16.100.0/24",),
                force=("198.51.100.0/24",),
                **({"all_destinations": False} if "all_destinations" in Snat.__dataclass_fields__ else {}),
            ),
        ),
        metadata=Metadata(
            bridges=("br100",), host=metadata_host, port=8775, local_service=metadata_host == "127.0.0.1"
        ),
        forward_bridges=("br100",),
        service_bridges=("br100", "br101"),
        guards=(
            PortGuard(
                bridge="br100",
                trusted_ports=("eth1",),
                pairs=((MAC1, "192.168.0.10"), (MAC2, "192.168.0.11")),
                dhcp_isolated=True,
            ),
            PortGuard(bridge="br101", trusted_ports=("vlan101",), pairs=(), dhcp_isolated=False),
        ),
        floating=(
            FloatingIp(
                address="203.0.113.50",
                fixed_ip="192.168.0.10",
                instance="web1",
                network="private",
                public_interface="eth0",
                cidr="192.168.0.0/24",
            ),
        ),
    )


def empty(driver="nftables"):
    return Ruleset(driver=driver, table="hanet")


def chain(text, name):
    """The rules of the first chain ``name`` in an nft script."""
    body = text.split(f"\tchain {name} {{\n", 1)[1].split("\n\t}\n", 1)[0]
    return [ln.strip() for ln in body.splitlines() if ln.strip() and " hook " not in ln]


def postrouting(text):
    return chain(text, "postrouting")


# --------------------------------------------------------------------------- rendering


def test_nft_snat_exempt_force_and_order():
    rules = postrouting(R.render(sample()))
    assert rules == [
        'ip saddr 192.168.0.10 oifname "eth0" snat to 203.0.113.50',
        "ip saddr 192.168.0.0/24 ip daddr 192.168.0.10 ct status dnat masquerade",
        'ip saddr 172.16.100.0/24 ip daddr 198.51.100.0/24 oifname "eth0" masquerade',
        'ip saddr 192.168.0.0/24 ip daddr 198.51.100.0/24 oifname "eth0" snat to 203.0.113.11',
        "ip saddr 192.168.0.0/24 ip daddr { 10.0.0.0/8, 192.168.0.0/24 } accept",
        'ip saddr 192.168.0.0/24 oifname "eth0" snat to 203.0.113.11',
    ]


@pytest.mark.skipif(
    "all_destinations" not in Snat.__dataclass_fields__, reason="Snat.all_destinations not in the model yet"
)
def test_hardware_gateway_snat_only_force():
    rs = Ruleset(
        driver="nftables",
        table="hanet",
        snat=(
            Snat(
                network="red",
                cidr="172.16.100.0/24",
                source="203.0.113.11",
                out_interface="eth0",
                exempt=("172.16.100.0/24",),
                force=("198.51.100.0/24", "198.51.100.0/25"),
                all_destinations=False,
            ),
        ),
    )
    assert postrouting(R.render(rs)) == [
        'ip saddr 172.16.100.0/24 ip daddr 198.51.100.0/24 oifname "eth0" snat to 203.0.113.11'
    ]
    ipt = R.render(dataclasses.replace(rs, driver="iptables"))
    assert (
        "-A hanet-POSTROUTING -s 172.16.100.0/24 -d 198.51.100.0/24 -o eth0 -j SNAT --to-source 203.0.113.11"
    ) in ipt
    assert "-j RETURN" not in ipt


def test_overlapping_exempt_ranges_are_collapsed():
    rs = Ruleset(
        driver="nftables",
        table="hanet",
        snat=(
            Snat(
                network="n",
                cidr="10.1.0.0/24",
                source=None,
                out_interface="eth0",
                exempt=("10.0.0.0/8", "10.1.0.0/24", "10.1.0.5/32"),
            ),
        ),
    )
    assert "ip saddr 10.1.0.0/24 ip daddr 10.0.0.0/8 accept" in R.render(rs)


def test_nft_metadata_redirect_and_dnat():
    text = R.render(sample())
    assert 'iifname { "br100" } ip daddr 169.254.169.254 tcp dport 80 redirect to :8775' in text
    assert 'iifname { "br100" } tcp dport 8775 accept' in text
    # the local service's port: from the VM bridges and the loopback only, in that order
    inp = text.split("chain input {")[1].split("\n\t}")[0]
    order = ['iifname { "br100" } tcp dport 8775 accept', 'iifname "lo" tcp dport 8775 accept', "tcp dport 8775 drop"]
    assert [inp.index(r) for r in order] == sorted(inp.index(r) for r in order)
    text = R.render(sample(metadata_host="10.0.0.5"))
    assert "tcp dport 80 dnat to 10.0.0.5:8775" in text and "redirect" not in text
    assert "drop" not in text.split("table bridge hanet {")[0]  # no local service: nothing to shut


def test_iptables_metadata_port_only_from_vm_bridges():
    text = R.render(sample(driver="iptables"))
    rules = [ln for ln in text.splitlines() if "--dport 8775" in ln]
    assert [r.split(" ", 2)[2] for r in rules] == [
        "-i br100 -p tcp -m tcp --dport 8775 -j ACCEPT",
        "-i lo -p tcp -m tcp --dport 8775 -j ACCEPT",
        "-p tcp -m tcp --dport 8775 -j DROP",
    ]


def test_nft_forward_and_service_bridges():
    text = R.render(sample())
    assert "ct state established,related accept" in text
    assert 'iifname { "br100" } accept' in text and 'oifname { "br100" } accept' in text
    assert 'iifname { "br100", "br101" } udp dport 67 accept' in text
    assert 'iifname { "br100", "br101" } meta l4proto { tcp, udp } th dport 53 accept' in text
    # hanet's ip filter chains drop nothing but the local metadata port from outside the
    # VM bridges; policy accept
    ip_table = text.split("table bridge hanet {")[0]
    drops = [ln.strip() for ln in ip_table.splitlines() if " drop" in ln]
    assert drops == ["tcp dport 8775 drop"] and "policy drop" not in text


TAP1, TAP2 = "fe:16:3e:00:00:01", "fe:16:3e:00:00:02"  # libvirt's taps of MAC1, MAC2


def elements(text, name):
    """The elements of set ``name`` in an nft script ([] when it has none)."""
    body = text.split(f"\tset {name} {{\n", 1)[1].split("\n\t}\n", 1)[0]
    if "elements = { " not in body:
        return []
    return body.split("elements = { ", 1)[1].rsplit(" }", 1)[0].split(", ")


def set_type(text, name):
    return text.split(f"\tset {name} {{\n", 1)[1].split("\n", 1)[0].strip()


def test_nft_port_guard():
    text = R.render(sample())
    assert set_type(text, "br100_pairs") == "type ifname . ether_addr . ipv4_addr"
    assert set_type(text, "br100_arp") == "type ifname . ether_addr . ether_addr . ipv4_addr"
    assert set_type(text, "br100_macs") == "type ifname . ether_addr"
    # render has no kernel view: only the pillar's ports are bound (none in sample())
    assert elements(text, "br100_pairs") == elements(text, "br100_arp") == [] == elements(text, "br100_macs")
    assert 'meta ibrname "br100" iifname != { "eth1" } jump br100_vm' in text
    assert chain(text, "br100_vm") == [
        "ether type ip udp sport 67 counter drop",
        "ether type ip ip saddr 0.0.0.0 udp sport 68 udp dport 67 iifname . ether saddr @br100_macs return",
        "ether type ip ip saddr 0.0.0.0 udp sport 68 udp dport 67 iifname . ether saddr @br100_dmacs return",
        "ether type ip iifname . ether saddr . ip saddr @br100_pairs return",
        "ether type ip iifname . ether saddr . ip saddr @br100_dpairs return",
        "ether type arp iifname . ether saddr . arp saddr ether . arp saddr ip @br100_arp return",
        "ether type arp iifname . ether saddr . arp saddr ether . arp saddr ip @br100_darp return",
        "counter drop",
    ]
    # the dynamic sets start empty: bind_ports fills them (after an apply, on a plug)
    assert elements(text, "br100_dpairs") == elements(text, "br100_darp") == [] == elements(text, "br100_dmacs")
    # dhcp isolation only for br100 (br101's guard is not isolated)
    assert 'iifname { "eth1" } ether type ip udp dport 67-68 drop' in text
    assert 'oifname { "eth1" } ether type ip udp dport 67-68 drop' in text
    assert 'vlan101" } ether type ip udp dport' not in text


def test_tap_mac_is_libvirts_rule():
    assert R.tap_mac(MAC1) == TAP1
    assert R.tap_mac("FA:16:3E:00:00:01") == TAP1
    assert R.tap_mac("fe:00:00:00:00:07") == "fa:00:00:00:00:07"  # libvirt: fe guest -> fa tap


def test_each_pair_bound_to_its_own_port():
    """The MAC rule finds each NIC's tap; a port that is no NIC's (tapx) and the uplink get
    nothing, so a VM can send only its own (MAC, IP), from its own port."""
    port_macs = {
        "br100": {"eth1": MAC1, "tap-a": TAP1, "tap-b": TAP2, "tapx": "fe:00:00:00:00:99"},
        "br101": {"vlan101": "02:00:00:00:00:01"},
    }
    for port_list in (False, True):
        got = R.dynamic_elements(sample().guards, port_macs, port_list)
        assert got["br100_dpairs"] == [f'"tap-a" . {MAC1} . 192.168.0.10', f'"tap-b" . {MAC2} . 192.168.0.11']
        assert got["br100_darp"] == [
            f'"tap-a" . {MAC1} . {MAC1} . 0.0.0.0',
            f'"tap-a" . {MAC1} . {MAC1} . 192.168.0.10',
            f'"tap-b" . {MAC2} . {MAC2} . 0.0.0.0',
            f'"tap-b" . {MAC2} . {MAC2} . 192.168.0.11',
        ]
        assert got["br100_dmacs"] == [f'"tap-a" . {MAC1}', f'"tap-b" . {MAC2}']
        assert "tapx" not in str({k: v for k, v in got.items() if not k.endswith("_ports")})  # no binding
        assert got["br101_dpairs"] == []
        # port-list mode: every VM port (tapx too: guarded, everything it sends dropped)
        assert got.get("br100_ports") == (['"tap-a"', '"tap-b"', '"tapx"'] if port_list else None)
    script = R._bind_script("hanet", R.dynamic_elements(sample().guards, port_macs, True))
    assert "flush set bridge hanet br100_dpairs\nadd element bridge hanet br100_dpairs {" in script
    assert "flush set bridge hanet br101_dpairs\nflush set bridge hanet br101_darp" not in script  # sorted
    assert "add element bridge hanet br101_dpairs" not in script  # nothing to add: flushed only


def test_pillar_port_binds_without_the_mac_rule():
    g = sample().guards[0]
    rs = dataclasses.replace(sample(), guards=(dataclasses.replace(g, ports=((MAC2, "vnet7"),)),) + sample().guards[1:])
    # render: the pillar's port is bound already (no kernel view needed) ...
    assert elements(R.render(rs), "br100_pairs") == [f'"vnet7" . {MAC2} . 192.168.0.11']
    # ... and it wins over a port that carries the MAC rule's MAC (no dynamic binding for it)
    got = R.dynamic_elements(rs.guards, {"br100": {"tap-a": TAP1, "tap-b": TAP2}}, False)
    assert got["br100_dpairs"] == [f'"tap-a" . {MAC1} . 192.168.0.10']
    assert R._from_plain(R.plan(rs, None)[0].detail["ruleset"]) == rs


def test_render_changes_with_every_pair():
    """Pairs bound by the MAC rule are not in render's sets (no kernel view), yet adding or
    changing one must change the text, or plan would see nothing to do."""
    g = sample().guards[0]
    for pairs in (
        g.pairs + (("fa:16:3e:00:00:03", "192.168.0.12"),),
        g.pairs[:1],
        ((MAC1, "192.168.0.10"), (MAC2, "192.168.0.12")),
    ):
        rs = dataclasses.replace(sample(), guards=(dataclasses.replace(g, pairs=pairs),) + sample().guards[1:])
        assert R.render(rs) != R.render(sample())
        assert R.plan(rs, R.render(sample())) != []


def test_iptables_driver_binds_ports_the_same():
    nft = R._parts(sample())["nft"]
    ipt = R._parts(sample(driver="iptables"))["nft"]
    bridge = "table bridge hanet {" + nft.split("table bridge hanet {", 1)[1]
    assert bridge in ipt and "@br100_dpairs return" in ipt  # the same bridge table


def test_port_list_mode_sends_the_port_sets_ports_to_the_guard():
    nft = R._parts(sample(), True)["nft"]
    assert "iifname @br100_ports jump br100_vm" in nft and "iifname @br101_ports jump br101_vm" in nft
    assert set_type(nft, "br100_ports") == "type ifname" and "ibrname" not in nft


def test_a_listing_without_the_dynamic_elements():
    listing = [
        "table bridge hanet {",
        "\tset br100_pairs {",
        "\t\ttype ifname . ether_addr . ipv4_addr",
        '\t\telements = { "vnet7" . fa:16:3e:00:00:02 . 192.168.0.11 }',
        "\t}",
        "\tset br100_dpairs {",
        "\t\ttype ifname . ether_addr . ipv4_addr",
        '\t\telements = { "tap-a" . fa:16:3e:00:00:01 . 192.168.0.10,',
        '\t\t\t     "tap-b" . fa:16:3e:00:00:02 . 192.168.0.11 }',
        "\t}",
        "\tset br100_ports {",
        "\t\ttype ifname",
        '\t\telements = { "tap-a" }',
        "\t}",
        "}",
    ]
    assert R._without_dynamic(listing) == [
        "table bridge hanet {",
        "\tset br100_pairs {",
        "\t\ttype ifname . ether_addr . ipv4_addr",
        '\t\telements = { "vnet7" . fa:16:3e:00:00:02 . 192.168.0.11 }',
        "\t}",
        "\tset br100_dpairs {",
        "\t\ttype ifname . ether_addr . ipv4_addr",
        "\t}",
        "\tset br100_ports {",
        "\t\ttype ifname",
        "\t}",
        "}",
    ]


def test_iptables_driver():
    text = R.render(sample(driver="iptables"))
    restore, nft = text.split("# --- nft -f\n")
    for chain, builtin in (
        ("hanet-PREROUTING", "PREROUTING"),
        ("hanet-OUTPUT", "OUTPUT"),
        ("hanet-POSTROUTING", "POSTROUTING"),
        ("hanet-FORWARD", "FORWARD"),
        ("hanet-INPUT", "INPUT"),
    ):
        assert f":{chain} - [0:0]" in restore
        assert restore.count(f"-j {chain}\n") == 1 and f"-I {builtin} 1 -j {chain}" in restore
    assert (
        "-A hanet-PREROUTING -i br100 -d 169.254.169.254/32 -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 8775"
    ) in restore
    assert "-A hanet-POSTROUTING -s 192.168.0.0/24 -d 10.0.0.0/8 -j RETURN" in restore
    assert "-A hanet-POSTROUTING -s 192.168.0.0/24 -o eth0 -j SNAT --to-source 203.0.113.11" in restore
    assert "-A hanet-PREROUTING -d 203.0.113.50/32 -j DNAT --to-destination 192.168.0.10" in restore
    assert "-A hanet-OUTPUT -d 203.0.113.50/32 -j DNAT --to-destination 192.168.0.10" in restore
    assert "-A hanet-FORWARD -i br100 -j ACCEPT" in restore
    assert "table ip " not in nft and "table bridge hanet {" in nft  # anti-spoofing stays in nft


def test_floating_ip():
    text = R.render(sample())
    pre = chain(text, "prerouting")
    out = chain(text, "output")
    assert "ip daddr 203.0.113.50 dnat to 192.168.0.10" in pre and "ip daddr 203.0.113.50 dnat to 192.168.0.10" in out
    rules = postrouting(text)
    assert rules.index('ip saddr 192.168.0.10 oifname "eth0" snat to 203.0.113.50') < rules.index(
        'ip saddr 192.168.0.0/24 oifname "eth0" snat to 203.0.113.11'
    )


def test_a_moving_snat_address_drops_what_opens_no_known_connection():
    """snat_addresses: a TCP packet to one that conntrack finds new (a flow the old owner
    SNATed, not yet known here) is dropped before the host answers it with a reset;
    both drivers."""
    rs = dataclasses.replace(sample(), snat_addresses=("203.0.113.40", "203.0.113.41"))
    assert "ip daddr { 203.0.113.40, 203.0.113.41 } meta l4proto tcp ct state new drop" in chain(R.render(rs), "input")
    ipt = R.render(dataclasses.replace(rs, driver="iptables"))
    for a in ("203.0.113.40", "203.0.113.41"):
        assert f"-A hanet-INPUT -d {a}/32 -p tcp -m conntrack --ctstate NEW -j DROP" in ipt


def test_empty_and_plan_pure():
    assert R.render(empty()) == "" and R.render(empty("iptables")) == ""
    assert R.plan(empty(), None) == []
    [ch] = R.plan(empty(), "something")
    assert (ch.facet, ch.action) == ("ruleset", "remove")
    [ch] = R.plan(sample(), None)
    assert (ch.facet, ch.action, ch.target) == ("ruleset", "replace", "hanet")
    assert R.plan(sample(), R.render(sample())) == []
    assert R.plan(sample(driver="iptables"), R.render(sample())) != []
    # the change's detail round-trips to the same model
    assert R._from_plain(ch.detail["ruleset"]) == sample()


def test_unknown_driver_rejected():
    with pytest.raises(ValueError):
        R.render(dataclasses.replace(sample(), driver="pf"))


# ---- hypothesis: any valid model renders, deterministically, independent of order

ifname = st.from_regex(r"[a-z][a-z0-9._-]{0,14}", fullmatch=True)
octet = st.integers(0, 255)


@st.composite
def rulesets(draw):
    n = draw(st.integers(0, 3))
    bridges = draw(st.lists(ifname, min_size=n, max_size=n, unique=True))
    uplinks = draw(st.lists(ifname.filter(lambda x: x not in bridges), min_size=n, max_size=n, unique=True))
    snat, guards, floating = [], [], []
    used_ips = set()
    for i, (br, up) in enumerate(zip(bridges, uplinks)):
        cidr = f"10.{i}.{draw(octet)}.0/24"
        base = cidr.rsplit(".", 1)[0]
        exempt = tuple(
            draw(st.lists(st.sampled_from([cidr, "10.0.0.0/8", "172.16.0.0/12", f"{base}.5/32"]), max_size=3))
        )
        force = tuple(draw(st.lists(st.sampled_from(["198.51.100.0/24", "198.51.0.0/16"]), max_size=2)))
        extra = {"all_destinations": draw(st.booleans())} if "all_destinations" in Snat.__dataclass_fields__ else {}
        if draw(st.booleans()):
            snat.append(
                Snat(
                    network=f"n{i}",
                    cidr=cidr,
                    source=draw(st.none() | st.just("203.0.113.11")),
                    out_interface=draw(st.sampled_from(["eth0", ""])),
                    exempt=exempt,
                    force=force,
                    **extra,
                )
            )
        hosts = draw(st.lists(st.integers(2, 254), max_size=4, unique=True))
        pairs = tuple((":".join(f"{draw(octet):02x}" for _ in range(6)), f"{base}.{h}") for h in hosts)
        named = tuple((m, f"vnet{i}{j}") for j, (m, _) in enumerate(pairs) if draw(st.booleans()))
        guards.append(
            PortGuard(
                bridge=br,
                trusted_ports=tuple(draw(st.lists(st.just(up), max_size=1))),
                pairs=pairs,
                dhcp_isolated=draw(st.booleans()),
                ports=named,
                local_only=((f"{base}.1", f"02:5a:00:00:00:{i:02x}"),) if draw(st.booleans()) else (),
                routed_from=tuple(ip for _, ip in pairs[:1]) if draw(st.booleans()) else (),
                routed_force=force if draw(st.booleans()) else (),
                routed_exempt=exempt,
                routed_metadata=draw(st.booleans()),
            )
        )
        for _, ip in pairs[:1]:
            addr = f"203.0.113.{50 + i}"
            if addr not in used_ips:
                used_ips.add(addr)
                floating.append(
                    FloatingIp(address=addr, fixed_ip=ip, instance=f"i{i}", network=f"n{i}", public_interface="eth0")
                )
    md = None
    if bridges and draw(st.booleans()):
        md = Metadata(
            bridges=tuple(bridges[: draw(st.integers(0, len(bridges)))]),
            host=draw(st.sampled_from(["127.0.0.1", "10.99.0.1"])),
            port=8775,
            local_service=True,
        )
    return Ruleset(
        driver=draw(st.sampled_from(["nftables", "iptables"])),
        table="hanet",
        snat=tuple(snat),
        metadata=md,
        forward_bridges=tuple(draw(st.lists(st.sampled_from(bridges), unique=True)) if bridges else ()),
        service_bridges=tuple(draw(st.lists(st.sampled_from(bridges), unique=True)) if bridges else ()),
        guards=tuple(guards) if draw(st.booleans()) else (),
        floating=tuple(floating) if draw(st.booleans()) else (),
        snat_addresses=tuple(draw(st.lists(st.sampled_from(["203.0.113.40", "203.0.113.41"]), unique=True))),
    )


def _shuffled(rs, seed):
    rnd = random.Random(seed)

    def sh(t):
        t = list(t)
        rnd.shuffle(t)
        return tuple(t)

    return dataclasses.replace(
        rs,
        snat=sh(rs.snat),
        floating=sh(rs.floating),
        forward_bridges=sh(rs.forward_bridges),
        service_bridges=sh(rs.service_bridges),
        guards=sh(dataclasses.replace(g, pairs=sh(g.pairs)) for g in rs.guards),
    )


@settings(max_examples=200, deadline=None)
@given(rulesets(), st.integers())
def test_render_never_crashes_and_is_deterministic(rs, seed):
    text = R.render(rs)
    assert text == R.render(rs) == R.render(_shuffled(rs, seed))
    assert (text == "") == R.is_empty(rs)
    assert R.plan(rs, text or None) == []


# --------------------------------------------------------------------------- netns

_sh, inside = kernel_ns.sh, kernel_ns.inside


needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("nft"), reason="needs root and nft (network namespaces)"
)


@pytest.fixture
def netns():
    with kernel_ns.fresh("hr") as name:
        yield name


@pytest.fixture
def env(netns, tmp_path):
    paths = Paths(root_dir=str(tmp_path))
    paths.ensure()

    def nx(*args, check=True):
        return _sh("ip", "netns", "exec", netns, *args, check=check).stdout

    with inside(netns):
        yield paths, nx


def run(rs, paths):
    changes = R.plan(rs, R.current(rs, paths))
    return changes, R.apply(changes, paths, Managed(paths))


FOREIGN = (
    "table inet other {\n\tchain c {\n\t\ttype filter hook forward priority 0; policy accept;\n"
    "\t\tip saddr 1.2.3.4 counter drop\n\t}\n}\n"
)


def test_a_shared_gateway_stays_on_its_host():
    """share_dhcp_address: the gateway every host holds is never ARPed for or answered
    across the uplink, and its MAC never leaves the host nor enters from outside; the
    guard of a bridge without it has none of these rules."""
    rs = dataclasses.replace(
        sample(),
        guards=(
            PortGuard(
                bridge="br100",
                trusted_ports=("eth1",),
                pairs=((MAC1, "192.168.0.10"),),
                dhcp_isolated=True,
                local_only=(("192.168.0.1", "02:5a:11:22:33:44"),),
            ),
            PortGuard(bridge="br101", trusted_ports=("vlan101",), pairs=(), dhcp_isolated=False),
        ),
    )
    text = R.render(rs)
    chains = {c["name"]: c["rules"] for c in R._nft_bridge_table(rs)["chains"]}
    for chain, way in (("input", "iifname"), ("forward", "iifname"), ("forward", "oifname"), ("output", "oifname")):
        for rule in ("arp saddr ip 192.168.0.1 drop", "arp daddr ip 192.168.0.1 drop"):
            assert f'{way} {{ "eth1" }} ether type arp {rule}' in chains[chain], (chain, way, rule)
    assert 'oifname { "eth1" } ether saddr 02:5a:11:22:33:44 drop' in chains["output"]
    assert 'oifname { "eth1" } ether saddr 02:5a:11:22:33:44 drop' in chains["forward"]
    assert 'iifname { "eth1" } ether daddr 02:5a:11:22:33:44 drop' in chains["input"]
    assert "vlan101" not in "".join(r for rules in chains.values() for r in rules if "arp saddr ip" in r)
    assert "02:5a:11:22:33:44" not in R.render(sample()) and "02:5a:11:22:33:44" in text


@needs_root
def test_netns_apply_idempotent_foreign_untouched_tamper_remove(env):
    paths, nx = env
    _sh("nft", "-f", "-", input=FOREIGN)
    foreign = nx("nft", "list", "table", "inet", "other")
    changes, done = run(sample(), paths)
    assert [c.action for c in changes] == ["replace"] and done
    ruleset = nx("nft", "list", "ruleset")
    assert "table ip hanet" in ruleset and "table bridge hanet" in ruleset
    assert nx("nft", "list", "table", "inet", "other") == foreign
    assert R.current(sample(), paths) == R.render(sample())
    assert R.plan(sample(), R.current(sample(), paths)) == []
    h = R.handle(paths)
    assert h["in_place"] is True and h["tables"] == ["nft:bridge:hanet", "nft:ip:hanet"] and h["digest"]

    # tamper: delete one rule of hanet's -> current differs -> plan replaces it back
    listing = nx("nft", "-a", "list", "chain", "ip", "hanet", "postrouting")
    handle = [ln.split("# handle ")[1] for ln in listing.splitlines() if "masquerade" in ln][0]
    nx("nft", "delete", "rule", "ip", "hanet", "postrouting", "handle", handle.strip())
    assert R.plan(sample(), R.current(sample(), paths)) != []
    assert R.handle(paths)["in_place"] is False
    run(sample(), paths)
    assert R.plan(sample(), R.current(sample(), paths)) == []

    # someone deletes hanet's whole table -> differs too
    nx("nft", "delete", "table", "bridge", "hanet")
    assert [c.action for c in R.plan(sample(), R.current(sample(), paths))] == ["replace"]
    run(sample(), paths)

    # remove: nothing of hanet's is left, the foreign table is as it was
    changes, _ = run(empty(), paths)
    assert [c.action for c in changes] == ["remove"]
    ruleset = nx("nft", "list", "ruleset")
    assert "hanet" not in ruleset
    assert nx("nft", "list", "table", "inet", "other") == foreign
    assert R.current(empty(), paths) is None and R.plan(empty(), None) == []
    assert not os.path.exists(paths.state("ruleset.json"))
    assert Managed(paths).get("ruleset") == set()


def ipt_jumps(nx):
    save = nx("iptables-save")
    return [
        ln for ln in save.splitlines() if ln.startswith("-A ") and "-j hanet-" in ln and not ln.startswith("-A hanet-")
    ]


@needs_root
@pytest.mark.skipif(not shutil.which("iptables-restore"), reason="needs iptables")
def test_netns_iptables_driver_no_duplicates_and_switching(env):
    paths, nx = env
    _sh("nft", "-f", "-", input=FOREIGN)
    rs = sample(driver="iptables")
    run(rs, paths)
    assert sorted(ipt_jumps(nx)) == sorted(
        f"-A {b} -j hanet-{b}" for b in ("PREROUTING", "OUTPUT", "POSTROUTING", "FORWARD", "INPUT")
    )
    assert R.plan(rs, R.current(rs, paths)) == []
    # apply again (forced), and with a changed model: still exactly one jump each
    R.apply(R.plan(rs, None), paths, Managed(paths))
    rs2 = dataclasses.replace(rs, floating=())
    run(rs2, paths)
    assert len(ipt_jumps(nx)) == 5
    assert "203.0.113.50" not in nx("iptables-save")
    assert R.plan(rs2, R.current(rs2, paths)) == []
    # tamper with a hanet chain
    nx("iptables", "-t", "nat", "-D", "hanet-POSTROUTING", "1")
    assert R.plan(rs2, R.current(rs2, paths)) != []
    run(rs2, paths)
    assert R.plan(rs2, R.current(rs2, paths)) == []

    # switch to nftables: the iptables chains and jumps are gone
    run(sample(), paths)
    assert ipt_jumps(nx) == [] and "hanet-" not in nx("iptables-save")
    assert "table ip hanet" in nx("nft", "list", "ruleset")
    assert R.plan(sample(), R.current(sample(), paths)) == []
    # and back to iptables: the nft ip table is gone, the bridge table stays
    run(rs, paths)
    ruleset = nx("nft", "list", "tables")
    assert "table ip hanet" not in ruleset and "table bridge hanet" in ruleset
    assert len(ipt_jumps(nx)) == 5
    # remove everything
    run(empty("iptables"), paths)
    assert "hanet" not in nx("iptables-save") and "hanet" not in nx("nft", "list", "ruleset")
    assert "table inet other" in nx("nft", "list", "ruleset")


@needs_root
def test_netns_table_rename_removes_old_table(env):
    paths, nx = env
    run(sample(), paths)
    renamed = sample(table="hanet2")
    run(renamed, paths)
    tables = nx("nft", "list", "tables")
    assert "hanet2" in tables and "table ip hanet\n" not in tables + "\n"
    assert R.plan(renamed, R.current(renamed, paths)) == []


@needs_root
def test_netns_port_list_mode_follows_new_ports(env, monkeypatch):
    paths, nx = env
    nx("ip", "link", "add", "br100", "type", "bridge")
    nx("ip", "link", "add", "tap0", "type", "veth", "peer", "name", "tap0p")
    nx("ip", "link", "set", "tap0", "master", "br100")
    monkeypatch.setattr(R, "bridge_meta_supported", lambda: False)
    run(sample(), paths)
    assert '"tap0"' in nx("nft", "list", "set", "bridge", "hanet", "br100_ports")
    assert R.handle(paths)["port_list_mode"] is True
    assert R.plan(sample(), R.current(sample(), paths)) == []
    nx("ip", "link", "add", "tap1", "type", "veth", "peer", "name", "tap1p")
    nx("ip", "link", "set", "tap1", "master", "br100")
    # a new port changes nothing the apply compares; bind_ports (the port watch) guards it
    assert R.plan(sample(), R.current(sample(), paths)) == []
    R.bind_ports(paths)
    listing = nx("nft", "list", "set", "bridge", "hanet", "br100_ports")
    assert '"tap0"' in listing and '"tap1"' in listing
    assert R.plan(sample(), R.current(sample(), paths)) == []


@needs_root
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(rs=rulesets())
def test_rendered_scripts_load_in_the_kernel(rs):
    """What render produces is accepted by nft / iptables-restore (checked in a netns)."""
    name = f"hr-{os.getpid()}-{random.randrange(16**6):06x}"
    _sh("ip", "netns", "add", name)
    try:
        with inside(name):
            port_macs = {g.bridge: {f"tap{j}": R.tap_mac(m) for j, (m, _) in enumerate(g.pairs)} for g in rs.guards}
            for b in port_macs:
                port_macs[b]["tapx"] = "fe:00:00:00:00:99"
            port_list = not R.bridge_meta_supported()
            parts = R._parts(rs, port_list)
            if parts["nft"]:
                _sh("nft", "-f", "-", input=parts["nft"])
                _sh("nft", "-f", "-", input=parts["nft"])  # re-apply over itself
                if rs.guards:  # and the ports bound into it
                    bridge_macs = {g.bridge: "02:00:00:00:00:01" for g in rs.guards}
                    dyn = R.dynamic_elements(rs.guards, port_macs, port_list, bridge_macs)
                    _sh("nft", "-f", "-", input=R._bind_script(rs.table, dyn))
            if parts["iptables"] and shutil.which("iptables-restore"):
                _sh("iptables-restore", "--noflush", input=parts["iptables"])
    finally:
        _sh("ip", "netns", "del", name, check=False)


@needs_root
def test_netns_binding_follows_plugged_nics(env, monkeypatch):
    """A NIC is bound to the port carrying its tap MAC by the apply and then by
    bind_ports (the port watch) when it is plugged, changes its MAC or goes; none of it
    makes the apply see a change."""
    paths, nx = env
    nx("ip", "link", "add", "br100", "type", "bridge")
    nx("ip", "link", "add", "tap-a", "address", TAP1, "type", "veth", "peer", "name", "tap-ap")
    nx("ip", "link", "set", "tap-a", "master", "br100")
    monkeypatch.setattr(R, "bridge_meta_supported", lambda: False)
    run(sample(), paths)
    listing = nx("nft", "list", "set", "bridge", "hanet", "br100_dpairs")
    assert f'"tap-a" . {MAC1} . 192.168.0.10' in listing and MAC2 not in listing
    assert R.plan(sample(), R.current(sample(), paths)) == []
    nx("ip", "link", "add", "tap-b", "address", TAP2, "type", "veth", "peer", "name", "tap-bp")
    nx("ip", "link", "set", "tap-b", "master", "br100")
    R.bind_ports(paths)
    listing = nx("nft", "list", "set", "bridge", "hanet", "br100_dpairs")
    assert f'"tap-b" . {MAC2} . 192.168.0.11' in listing
    assert R.plan(sample(), R.current(sample(), paths)) == []
    # its MAC changes (no NIC's any more): unbound; it goes: unbound
    nx("ip", "link", "set", "tap-b", "address", "fe:00:00:00:00:99")
    R.bind_ports(paths)
    assert MAC2 not in nx("nft", "list", "set", "bridge", "hanet", "br100_dpairs")
    nx("ip", "link", "del", "tap-a")
    R.bind_ports(paths)
    assert MAC1 not in nx("nft", "list", "set", "bridge", "hanet", "br100_dpairs")
    assert R.plan(sample(), R.current(sample(), paths)) == []


@needs_root
def test_netns_the_owner_s_mac_goes_into_the_via_map_alone_and_with_the_ports(env):
    """bind_owners (the owner watch) puts the owner's MAC into the _via map; bind_ports
    (every apply and port event) puts in what the watch last wrote; neither is a
    change the apply sees."""
    import json

    paths, nx = env
    nx("ip", "link", "add", "br100", "type", "bridge")
    g = dataclasses.replace(hybrid().guards[0], routed_metadata=True, routed_via="192.168.0.2")
    rs = dataclasses.replace(hybrid(), guards=(g,) + hybrid().guards[1:])
    run(rs, paths)
    assert MAC1 not in nx("nft", "list", "map", "bridge", "hanet", "br100_via")
    assert R.bind_owners(paths, {"192.168.0.2": MAC1}) == {"br100_via": [f"ip : {MAC1}"]}
    assert f"ip : {MAC1}" in nx("nft", "list", "map", "bridge", "hanet", "br100_via")
    assert R.plan(rs, R.current(rs, paths)) == []
    os.makedirs(os.path.dirname(paths.run("follow.json")), exist_ok=True)
    with open(paths.run("follow.json"), "w") as fh:
        json.dump({"192.168.0.2": MAC2}, fh)
    R.bind_ports(paths)
    listing = nx("nft", "list", "map", "bridge", "hanet", "br100_via")
    assert f"ip : {MAC2}" in listing and MAC1 not in listing
    assert R.plan(rs, R.current(rs, paths)) == []
    assert R.bind_owners(paths, {}) == {"br100_via": []}
    assert "elements" not in nx("nft", "list", "map", "bridge", "hanet", "br100_via")


def test_port_report_names_unknown_ports_and_unplugged_nics():
    guards = sample().guards
    port_macs = {
        "br100": {
            "eth1": "52:54:00:aa:bb:cc",  # the uplink: trusted
            "tap1": R.tap_mac(MAC1),  # MAC1's port by libvirt's rule
            "tap9": "fe:16:3e:00:00:99",
        },  # a VM the pillar does not know
        "br101": {},
    }
    got = R.port_report(guards, port_macs)
    assert got["unknown"] == [("br100", "tap9", "fe:16:3e:00:00:99")]
    assert got["unplugged"] == [("br100", MAC2, "192.168.0.11")]
    assert R.port_report(guards, {}) == {
        "unknown": [],
        "unplugged": [("br100", MAC1, "192.168.0.10"), ("br100", MAC2, "192.168.0.11")],
    }


# --------------------------------------------------------------------------- DHCP checksum fill


def test_checksum_fill_is_an_iptables_mangle_rule_per_served_bridge_with_either_driver():
    for driver in ("nftables", "iptables"):
        rs = dataclasses.replace(sample(driver), checksum_fill=("br101", "br100"))
        text = R.render(rs)
        assert "# --- iptables-restore --noflush (mangle: DHCP checksum fill)\n*mangle\n" in text
        for b in ("br100", "br101"):
            assert f"-A hanet-POSTROUTING -o {b} -p udp -m udp --dport 68 -j CHECKSUM --checksum-fill" in text
        assert "-I POSTROUTING 1 -j hanet-POSTROUTING" in text
        assert "iptables-mangle:hanet" in R._objects(rs)
        assert "CHECKSUM" not in R.render(sample(driver)) and "iptables-mangle:hanet" not in R._objects(sample(driver))
    # the fill alone (a host serving DHCP on a hardware-gateway network only) is not empty
    alone = Ruleset(driver="nftables", table="hanet", checksum_fill=("br300",))
    assert not R.is_empty(alone) and R.render(alone).count("CHECKSUM") == 1


def mangle_lines(nx):
    return [ln for ln in nx("iptables-save", "-t", "mangle").splitlines() if "hanet" in ln]


@needs_root
@pytest.mark.skipif(not shutil.which("iptables-restore"), reason="needs iptables")
@pytest.mark.parametrize("driver", ["nftables", "iptables"])
def test_netns_checksum_fill_applied_idempotent_repaired_removed(env, driver):
    paths, nx = env
    rs = dataclasses.replace(sample(driver), checksum_fill=("br100",))
    changes, done = run(rs, paths)
    assert [c.action for c in changes] == ["replace"] and "iptables-mangle:hanet" in done[0]
    assert mangle_lines(nx) == [
        ":hanet-POSTROUTING - [0:0]",
        "-A POSTROUTING -j hanet-POSTROUTING",
        "-A hanet-POSTROUTING -o br100 -p udp -m udp --dport 68 -j CHECKSUM --checksum-fill",
    ]
    assert R.plan(rs, R.current(rs, paths)) == []
    R.apply(R.plan(rs, None), paths, Managed(paths))  # forced again: still one jump
    assert len(mangle_lines(nx)) == 3 and R.plan(rs, R.current(rs, paths)) == []
    nx("iptables", "-t", "mangle", "-F", "hanet-POSTROUTING")  # tampered with: put back
    assert R.plan(rs, R.current(rs, paths)) != []
    run(rs, paths)
    assert len(mangle_lines(nx)) == 3
    run(sample(driver), paths)  # the fill turned off: its chain and jump go, the rest stays
    assert mangle_lines(nx) == [] and R.plan(sample(driver), R.current(sample(driver), paths)) == []
    run(rs, paths)
    run(empty(driver), paths)  # hanet removed: nothing of it in the mangle table
    assert mangle_lines(nx) == []


@needs_root
@pytest.mark.skipif(not shutil.which("iptables-restore"), reason="needs iptables")
def test_netns_a_dhcp_reply_through_a_filled_bridge_carries_a_valid_checksum(env):
    """What a guest that checks checksums on a raw socket sees: a UDP packet to port 68
    sent by the host over its bridge into a veth arrives with the checksum left to
    offload (invalid on the wire) until the fill is applied."""
    paths, nx = env
    nx("ip", "link", "add", "br100", "type", "bridge")
    nx("ip", "link", "add", "tap0", "type", "veth", "peer", "name", "guest0")
    nx("ip", "link", "set", "tap0", "master", "br100")
    for link in ("br100", "tap0", "guest0"):
        nx("ip", "link", "set", link, "up")
    nx("ip", "addr", "add", "10.5.0.1/24", "dev", "br100")
    mac = nx("cat", "/sys/class/net/guest0/address").strip()
    nx("ip", "neigh", "add", "10.5.0.2", "lladdr", mac, "dev", "br100")

    def reply_checksum_valid():
        import select
        import socket

        from hanet_lab.wire import udp_checksum_valid, udp_ports

        rx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
        rx.bind(("guest0", 0x0800))
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            tx.bind(("10.5.0.1", 0))
            tx.sendto(b"dhcp" * 75, ("10.5.0.2", 68))
            while select.select([rx], [], [], 2)[0]:
                ip = rx.recv(2048)[14:]
                if (udp_ports(ip) or (0, 0))[1] == 68:
                    return udp_checksum_valid(ip)
            raise AssertionError("the UDP packet never reached the guest's side")
        finally:
            rx.close()
            tx.close()

    assert not reply_checksum_valid()  # offloaded: what such a guest drops
    run(Ruleset(driver="nftables", table="hanet", checksum_fill=("br100",)), paths)
    assert reply_checksum_valid()


@needs_root
def test_netns_checksum_fill_where_iptables_is_missing_fails_and_changes_nothing(env, monkeypatch):
    paths, nx = env
    which = shutil.which
    monkeypatch.setattr(R.shutil, "which", lambda name: None if name.startswith("iptables") else which(name))
    rs = dataclasses.replace(sample(), checksum_fill=("br100",))
    with pytest.raises(RuntimeError, match="dhcp_checksum_fill needs iptables"):
        run(rs, paths)
    assert "hanet" not in nx("nft", "list", "ruleset")


# --------------------------------------------------------------------------- hybrid


def hybrid(port_list=False):
    g = dataclasses.replace(
        sample().guards[0],
        routed_from=("192.168.0.10",),
        routed_force=("198.51.100.0/24",),
        routed_exempt=("192.168.0.0/24", "10.0.0.0/8"),
    )
    return dataclasses.replace(sample(), guards=(g,) + sample().guards[1:])


def test_hybrid_hands_what_leaves_the_network_to_the_host_after_the_guard():
    """nova's ebtables redirect, in hanet's bridge table: frames from a VM port (that
    passed the guard) from the fixed IP with a floating IP here, or to force_snat_range,
    and not to the network or dmz_cidr, are addressed to the bridge and go up to the
    host's IP stack; other bridges and other VMs are left alone."""
    rs = hybrid()
    pre = {c["name"]: c["rules"] for c in R._nft_bridge_table(rs)["chains"]}["prerouting"]
    to_host = "ether daddr set iifname map @br100_brmac meta pkttype set host"
    vm = 'meta ibrname "br100" iifname != { "eth1" }'
    assert pre[0] == f"{vm} jump br100_vm"  # the guard first
    assert f"{vm} ether type ip ip saddr 192.168.0.10 ip daddr != {{ 10.0.0.0/8, 192.168.0.0/24 }} {to_host}" in pre
    assert f"{vm} ether type ip ip daddr 198.51.100.0/24 ip daddr != {{ 10.0.0.0/8, 192.168.0.0/24 }} {to_host}" in pre
    assert "br101_brmac" not in R.render(rs) and "pkttype" not in R.render(sample())
    assert "\tmap br100_brmac {\n\t\ttype ifname : ether_addr\n\t}" in R.render(rs)
    pre_list = {c["name"]: c["rules"] for c in R._nft_bridge_table(rs, port_list=True)["chains"]}["prerouting"]
    assert (
        f"iifname @br100_ports ether type ip ip saddr 192.168.0.10 ip daddr != {{ 10.0.0.0/8, 192.168.0.0/24 }} {to_host}"
        in pre_list
    )


def test_hybrid_map_names_each_vm_port_s_bridge_mac():
    port_macs = {"br100": {"eth1": MAC1, "tap-a": TAP1, "tapx": "fe:00:00:00:00:99"}, "br101": {}}
    got = R.dynamic_elements(hybrid().guards, port_macs, False, {"br100": "02:00:00:00:01:00"})
    assert got["br100_brmac"] == ['"tap-a" : 02:00:00:00:01:00', '"tapx" : 02:00:00:00:01:00']
    assert "br101_brmac" not in got
    assert R.dynamic_elements(hybrid().guards, port_macs, False)["br100_brmac"] == []  # no bridge yet
    script = R._bind_script("hanet", got)
    assert "flush map bridge hanet br100_brmac\nadd element bridge hanet br100_brmac {" in script
    # a listing without what bind_ports filled: the map's elements too
    listing = [
        "table bridge hanet {",
        "\tmap br100_brmac {",
        "\t\ttype ifname : ether_addr",
        '\t\telements = { "tap-a" : 02:00:00:00:01:00 }',
        "\t}",
        "}",
    ]
    assert R._without_dynamic(listing) == [ln for ln in listing if "elements" not in ln]


def test_hybrid_hands_the_metadata_requests_to_the_host():
    g = dataclasses.replace(sample().guards[0], routed_metadata=True)
    rs = dataclasses.replace(sample(), guards=(g,))
    pre = {c["name"]: c["rules"] for c in R._nft_bridge_table(rs)["chains"]}["prerouting"]
    assert pre[-1] == (
        'meta ibrname "br100" iifname != { "eth1" } ether type ip ip daddr 169.254.169.254 tcp dport 80'
        " ether daddr set iifname map @br100_brmac meta pkttype set host"
    )


def test_what_a_hardware_bridge_hands_up_leaves_only_by_the_public_link():
    rs = dataclasses.replace(hybrid(), routed=(("br100", "eth0"),))
    fwd = {c["name"]: c["rules"] for c in R._nft_ip_table(rs)["chains"]}["forward"]
    drop = 'iifname "br100" oifname != { "br100", "eth0" } drop'  # bridged frames pass (br_netfilter)
    assert drop in fwd and fwd.index(drop) > fwd.index("ct status dnat accept")
    ipt = R.render(dataclasses.replace(rs, driver="iptables"))
    assert "-A hanet-FORWARD -i br100 -o br100 -j ACCEPT\n-A hanet-FORWARD -i br100 ! -o eth0 -j DROP" in ipt
    assert "drop" not in str({c["name"]: c["rules"] for c in R._nft_ip_table(sample())["chains"]}["forward"])


def test_with_network_hosts_the_frames_go_to_the_owner_s_mac_not_up_to_this_host():
    """routed_via (a hardware network served by network hosts): the same frames are
    readdressed to the MAC the owner answers with (the one element of the _via map,
    keyed by ethertype; the owner watch learns it): they stay frames; no MAC known yet,
    no element, and the rule matches nothing. Where this host is the owner (the MAC is
    the bridge's own, the _self set) they go up to its IP stack."""
    g = dataclasses.replace(hybrid().guards[0], routed_metadata=True, routed_via="192.168.0.2")
    rs = dataclasses.replace(hybrid(), guards=(g,) + hybrid().guards[1:])
    text = R.render(rs)
    pre = {c["name"]: c["rules"] for c in R._nft_bridge_table(rs)["chains"]}["prerouting"]
    to_owner = "ether daddr set meta protocol map @br100_via"
    assert sum(rule.endswith(to_owner) for rule in pre) == 3 and "brmac" not in text
    self_rule = 'meta ibrname "br100" iifname != { "eth1" } ether type ip ether daddr @br100_self meta pkttype set host'
    assert pre.index(self_rule) == max(i for i, rule in enumerate(pre) if rule.endswith(to_owner)) + 1
    assert "\tmap br100_via {\n\t\ttype ether_type : ether_addr\n\t}" in text
    port_macs = {"br100": {"eth1": MAC1, "tap-a": TAP1}}
    own = "02:00:00:00:01:00"
    got = R.dynamic_elements(rs.guards, port_macs, False, {"br100": own}, {"192.168.0.2": MAC1})
    assert (got["br100_via"], got["br100_self"]) == ([f"ip : {MAC1}"], [own]) and "br100_brmac" not in got
    assert R.dynamic_elements(rs.guards, port_macs, False)["br100_via"] == []
    script = R._bind_script("hanet", got)
    assert "flush map bridge hanet br100_via\nadd element bridge hanet br100_via { ip : " in script
    assert "flush set bridge hanet br100_self\n" in script
    # nothing routed on the bridge: no map is rendered, and bind_ports flushes none
    bare = dataclasses.replace(sample().guards[0], routed_via="192.168.0.2")
    assert "br100_via" not in R.dynamic_elements((bare,), port_macs, False, {}, {"192.168.0.2": MAC1})
