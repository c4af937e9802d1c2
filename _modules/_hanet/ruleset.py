"""The NAT/filter ruleset applier: ``desired.Ruleset`` -> nftables or iptables.

One driver-independent model, rendered by jinja2 (``ruleset_templates``) for one of two
drivers:

nftables (default)
    hanet owns ``table ip <table>`` (NAT and filter) and ``table bridge <table>`` (VM port
    anti-spoofing) and nothing else. One ``nft -f`` script creates each table if missing,
    deletes it and defines it again: one transaction, so the ruleset is replaced
    atomically and never half-applied. hanet's ip-family filter chains hold only
    ``accept`` rules and end in ``policy accept``: they document and count what hanet
    forwards and accepts but never drop anybody else's traffic. (In nftables an accept
    in one table does not override a drop in another: if another table drops forwarded
    traffic, the operator must allow hanet's bridges there.) The only drops hanet makes
    are in its bridge table, and only for frames entering hanet's bridges through VM
    ports (plus DHCP crossing the trusted ports when ``dhcp_isolated``).

iptables
    Chains ``<table>-PREROUTING``/``-OUTPUT``/``-POSTROUTING`` (nat) and
    ``<table>-FORWARD``/``-INPUT`` (filter), applied with ``iptables-restore --noflush``:
    the chains are flushed and refilled, and exactly one jump at the top of each builtin
    chain is kept (existing jumps are deleted in the same transaction). ACCEPT in
    ``<table>-FORWARD``/``-INPUT`` is final here (iptables semantics), as nova-network's
    was. Exempt destinations RETURN from ``<table>-POSTROUTING`` (hanet does not SNAT
    them and does not decide for other rules).
    Anti-spoofing stays in the nftables ``table bridge <table>`` with this driver too:
    ebtables cannot match (MAC, IP) pairs in one set lookup, has no atomic replacement of
    just hanet's rules, and on Debian 12 ``ebtables`` is ebtables-nft anyway (rules in
    nftables' shared ``bridge filter`` table). The bridge table is hanet's own, so it
    coexists with any ebtables rules.

Bridge port scoping: the guard applies to frames entering a hanet bridge through any port
that is not trusted, matched with ``meta ibrname`` (kernel CONFIG_NFT_BRIDGE_META). On a
kernel without it the applier falls back to naming the bridge's current VM ports
(``iifname { ... }``); ``current`` then reports a difference as soon as a bridge's ports
change, so the next apply guards a newly plugged port (it is unguarded until then).

Port binding: each (MAC, IP) pair is allowed only from its own port, one set lookup keyed
``ifname . ether_addr . ipv4_addr`` per bridge (the same for ARP and DHCP), so the cost per
frame does not grow with the number of instances. A NIC's port is the pillar's ``port``
where given, else the bridge port whose MAC is the guest MAC with the first octet ``fe``
(``fa`` when the guest's is ``fe``): libvirt's rule for the tap of a guest NIC. The applier
reads the bridges' ports and their MACs at apply time (pyroute2) and records them;
``current`` reports a difference when they change, so the next apply binds a newly plugged
NIC (until then its frames are dropped, like those of any port that is no NIC's).

``render`` gives the canonical form: ``meta ibrname`` scoping, the bindings the pillar
names, and (as comments) the pairs to bind by the MAC rule, so any change of the model
changes the text.

State: after an apply, the normalized kernel listing of hanet's objects (``nft -s list
table``, hanet's lines of ``iptables-save``) is stored in ``<state_dir>/ruleset.json`` with
the rendered text. ``current`` lists the kernel again and returns the stored text only when
the listing is identical, so a deleted table or a tampered rule shows up as a difference.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import json
import os
import re
import shutil

from . import desired as D
from . import ruleset_templates as T
from .common import Change, FileLock, Paths, run, write_atomic

FACET = "ruleset"
METADATA_IP = "169.254.169.254"
STATE_FILE = "ruleset.json"
NAT_CHAINS = ("PREROUTING", "OUTPUT", "POSTROUTING")
FILTER_CHAINS = ("FORWARD", "INPUT")
MANGLE_CHAINS = ("POSTROUTING",)  # the DHCP checksum fill


# --------------------------------------------------------------------------- helpers

_TEMPLATES: dict = {}


def _template(source):
    """The compiled jinja2 template of ``source``, compiled once per process."""
    tpl = _TEMPLATES.get(source)
    if tpl is None:
        import jinja2

        env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
        tpl = _TEMPLATES[source] = env.from_string(source)
    return tpl


def _q(name):
    """An interface name as an nft string literal."""
    return '"%s"' % name


def _names(names):
    """An nft anonymous set of interface names (sorted, deduplicated)."""
    return "{ %s }" % ", ".join(_q(n) for n in sorted(set(names)))


def _nets(cidrs):
    """Sorted, collapsed IPv4 networks (so overlapping ranges never make nft fail)."""
    nets = [ipaddress.ip_network(str(c), strict=False) for c in cidrs]
    return [str(n) for n in ipaddress.collapse_addresses(nets)]


def _nft_set(items):
    items = list(items)
    return items[0] if len(items) == 1 else "{ %s }" % ", ".join(items)


def _mac(mac):
    return str(mac).lower()


def tap_mac(mac):
    """The MAC libvirt gives the host-side tap of a guest NIC with MAC ``mac``."""
    mac = _mac(mac)
    return ("fa" if mac[:2] == "fe" else "fe") + mac[2:]


def _bindings(g, port_macs=None):
    """Sorted (port, mac, ip) of guard ``g``: the pillar's ports, and (``port_macs``:
    {port: MAC} of the bridge's ports now) the ports found by libvirt's MAC rule."""
    named = {_mac(m): p for m, p in g.ports}
    by_mac = {}
    for port, pmac in (port_macs or {}).items():
        if port not in g.trusted_ports and pmac:
            by_mac.setdefault(_mac(pmac), []).append(port)
    out = set()
    for m, ip in g.pairs:
        m = _mac(m)
        if m in named:
            out.add((named[m], m, str(ip)))
        else:
            out.update((p, m, str(ip)) for p in by_mac.get(tap_mac(m), ()))
    return sorted(out)


def _ident(name, used):
    base = re.sub(r"[^A-Za-z0-9_]", "_", name)
    if not base or not base[0].isalpha():
        base = "b_" + base
    ident, i = base, 1
    while ident in used:
        i += 1
        ident = f"{base}_{i}"
    used.add(ident)
    return ident


def _all_destinations(snat):
    return snat.all_destinations


def is_empty(ruleset: D.Ruleset) -> bool:
    """True when the ruleset holds nothing: hanet's tables/chains must not exist."""
    return not (_has_ip_part(ruleset) or ruleset.guards or ruleset.checksum_fill)


def _has_ip_part(rs):
    return bool(
        rs.snat
        or rs.floating
        or rs.forward_bridges
        or rs.service_bridges
        or rs.routed
        or (rs.metadata and rs.metadata.bridges)
    )


def _sorted_snat(rs):
    return sorted(rs.snat, key=lambda s: (str(s.cidr), s.network, s.out_interface))


def _sorted_floating(rs):
    return sorted(rs.floating, key=lambda f: (str(f.address), str(f.fixed_ip)))


def _hairpin_sources(rs, fip):
    """Who may reach a floating IP on the same bridge as its instance: its network."""
    return _nets([c for c in (fip.cidr, f"{fip.fixed_ip}/32") if c])


# --------------------------------------------------------------------------- nftables


def _nft_ip_table(rs):
    pre, out, post, fwd, inp = [], [], [], [], []
    for f in _sorted_floating(rs):
        pre.append(f"ip daddr {f.address} dnat to {f.fixed_ip}")
        out.append(f"ip daddr {f.address} dnat to {f.fixed_ip}")
    md = rs.metadata
    if md and md.bridges:
        match = f"iifname {_names(md.bridges)} ip daddr {METADATA_IP} tcp dport 80"
        if md.host == "127.0.0.1":
            pre.append(f"{match} redirect to :{md.port}")
        else:
            pre.append(f"{match} dnat to {md.host}:{md.port}")
    for f in _sorted_floating(rs):
        oif = f"oifname {_q(f.public_interface)} " if f.public_interface else ""
        post.append(f"ip saddr {f.fixed_ip} {oif}snat to {f.address}")
    for f in _sorted_floating(rs):
        src = _nft_set(_hairpin_sources(rs, f))
        post.append(f"ip saddr {src} ip daddr {f.fixed_ip} ct status dnat masquerade")
    for s in _sorted_snat(rs):
        oif = f"oifname {_q(s.out_interface)} " if s.out_interface else ""
        to = f"snat to {s.source}" if s.source else "masquerade"
        if s.force:
            post.append(f"ip saddr {s.cidr} ip daddr {_nft_set(_nets(s.force))} {oif}{to}")
        if _all_destinations(s):
            if s.exempt:
                post.append(f"ip saddr {s.cidr} ip daddr {_nft_set(_nets(s.exempt))} accept")
            post.append(f"ip saddr {s.cidr} {oif}{to}")
    if rs.forward_bridges or rs.floating:
        fwd.append("ct state established,related accept")
    if rs.floating:
        fwd.append("ct status dnat accept")
    for bridge, public in sorted(set(rs.routed)):
        # what the bridge hands up from a hardware-gateway network is routed out to the
        # public side only: never to another network behind the hardware router's back.
        # Not the bridge itself: with br_netfilter loaded, bridged frames pass this hook
        # too, as iif and oif the bridge
        fwd.append(f"iifname {_q(bridge)} oifname != {_names((bridge, public))} drop")
    if rs.forward_bridges:
        fwd.append(f"iifname {_names(rs.forward_bridges)} accept")
        fwd.append(f"oifname {_names(rs.forward_bridges)} accept")
    if rs.service_bridges:
        sb = _names(rs.service_bridges)
        inp.append(f"iifname {sb} udp dport 67 accept")
        inp.append(f"iifname {sb} meta l4proto {{ tcp, udp }} th dport 53 accept")
    if md and md.bridges:
        inp.append(f"iifname {_names(md.bridges)} tcp dport {md.port} accept")
        if md.local_service:  # the local service answers only where VMs (or their router) reach it
            inp.append(f'iifname "lo" tcp dport {md.port} accept')
            inp.append(f"tcp dport {md.port} drop")
    if rs.snat_addresses:  # a moved flow's packet before the host knows it: dropped, not reset
        inp.append(f"ip daddr {_nft_set(sorted(rs.snat_addresses))} meta l4proto tcp ct state new drop")
    chains = [
        dict(name="prerouting", type="nat", hook="prerouting", priority=-100, rules=pre),
        dict(name="output", type="nat", hook="output", priority=-100, rules=out),
        dict(name="postrouting", type="nat", hook="postrouting", priority=100, rules=post),
        dict(name="forward", type="filter", hook="forward", priority=0, rules=fwd),
        dict(name="input", type="filter", hook="input", priority=0, rules=inp),
    ]
    return dict(
        family="ip",
        name=rs.table,
        sets=[],
        comment="hanet: NAT and filter; replaced as a whole by hanet",
        chains=[c for c in chains if c["rules"]],
    )


def _binding_elements(bound):
    """The (pairs, arp, macs) elements of the bindings ``bound`` [(port, mac, ip)]."""
    macs = sorted({(p, m) for p, m, _ in bound})
    arp = sorted(
        {f"{_q(p)} . {m} . {m} . {ip}" for p, m, ip in bound} | {f"{_q(p)} . {m} . {m} . 0.0.0.0" for p, m in macs}
    )
    return sorted(f"{_q(p)} . {m} . {ip}" for p, m, ip in bound), arp, [f"{_q(p)} . {m}" for p, m in macs]


DYNAMIC = ("_dpairs", "_darp", "_dmacs", "_ports", "_brmac", "_via", "_self")  # what bind_ports fills
MAPS = ("_brmac", "_via")


def _idents(guards):
    """{bridge: the identifier its sets and chain are named with}."""
    used: set = set()
    return {g.bridge: _ident(g.bridge, used) for g in sorted(guards, key=lambda g: g.bridge)}


def _nft_bridge_table(rs, port_list=False):
    """The anti-spoofing table. Each NIC's (MAC, IP) is bound to its port: the pillar's
    ports (``port:``) in the static sets (``_pairs``, ``_arp``, ``_macs``), the ports
    found by libvirt's MAC rule in the dynamic ones (``_dpairs``, ``_darp``, ``_dmacs``),
    which ``bind_ports`` fills when a port appears, changes or goes (the beacon's port
    watch, and every apply). ``port_list``: the kernel has no ``meta ibrname``; the VM
    ports of a bridge are then the elements of its ``_ports`` set (bind_ports too)."""
    sets, chains, pre, fwd, inp, out, notes = [], [], [], [], [], [], []
    idents = _idents(rs.guards)
    for g in sorted(rs.guards, key=lambda g: g.bridge):
        ident = idents[g.bridge]
        bound = _bindings(g, None)  # the pillar's ports: known without a kernel view
        named = {_mac(m) for m, _ in g.ports}
        notes += sorted(
            f"{g.bridge}: {_mac(m)} . {ip} from the port with MAC {tap_mac(m)}"
            for m, ip in g.pairs
            if _mac(m) not in named
        )
        pairs, arp, macs = _binding_elements(bound)
        sets += [
            dict(name=f"{ident}_pairs", type="ifname . ether_addr . ipv4_addr", elements=pairs),
            dict(name=f"{ident}_arp", type="ifname . ether_addr . ether_addr . ipv4_addr", elements=arp),
            dict(name=f"{ident}_macs", type="ifname . ether_addr", elements=macs),
            dict(name=f"{ident}_dpairs", type="ifname . ether_addr . ipv4_addr", elements=[]),
            dict(name=f"{ident}_darp", type="ifname . ether_addr . ether_addr . ipv4_addr", elements=[]),
            dict(name=f"{ident}_dmacs", type="ifname . ether_addr", elements=[]),
        ]
        if port_list:
            sets.append(dict(name=f"{ident}_ports", type="ifname", elements=[]))
        vm = f"{ident}_vm"
        if not port_list:
            trusted = f" iifname != {_names(g.trusted_ports)}" if g.trusted_ports else ""
            from_vm = f"meta ibrname {_q(g.bridge)}{trusted}"
        else:
            from_vm = f"iifname @{ident}_ports"
        pre.append(f"{from_vm} jump {vm}")
        if g.routed:
            # nova's ebtables redirect: what passed the guard and leaves the network is
            # handed to this host's IP stack (its floating IP's SNAT), not to the hardware
            # router. The frame is addressed to the bridge's own MAC (the map, which
            # bind_ports fills per VM port); a port not in it yet is left alone
            if g.routed_via:
                # to the network's owner (network hosts): its MAC, the one element of the
                # map (the beacon's owner watch, ``_hanet.follow``, keeps it; keyed by the
                # frame's ethertype so that any kernel can look it up); none known yet: the
                # frame goes on to the hardware router
                sets.append(dict(name=f"{ident}_via", kind="map", type="ether_type : ether_addr", elements=[]))
                sets.append(dict(name=f"{ident}_self", type="ether_addr", elements=[]))
                to_host = f"ether daddr set meta protocol map @{ident}_via"
            else:
                sets.append(dict(name=f"{ident}_brmac", kind="map", type="ifname : ether_addr", elements=[]))
                to_host = f"ether daddr set iifname map @{ident}_brmac meta pkttype set host"
            not_to = f" ip daddr != {_nft_set(_nets(g.routed_exempt))}" if g.routed_exempt else ""
            if g.routed_from:
                pre.append(f"{from_vm} ether type ip ip saddr {_nft_set(sorted(g.routed_from))}{not_to} {to_host}")
            if g.routed_force:
                pre.append(f"{from_vm} ether type ip ip daddr {_nft_set(_nets(g.routed_force))}{not_to} {to_host}")
            if g.routed_metadata:
                pre.append(f"{from_vm} ether type ip ip daddr {METADATA_IP} tcp dport 80 {to_host}")
            if g.routed_via:
                # this host is the owner (the map holds the bridge's own MAC, ``_self``):
                # readdressed frames go up to its IP stack, as the bridge would send a
                # frame that came addressed to it
                pre.append(f"{from_vm} ether type ip ether daddr @{ident}_self meta pkttype set host")
        chains.append(
            dict(
                name=vm,
                hook=None,
                rules=[
                    "ether type ip udp sport 67 counter drop",
                    "ether type ip ip saddr 0.0.0.0 udp sport 68 udp dport 67"
                    f" iifname . ether saddr @{ident}_macs return",
                    "ether type ip ip saddr 0.0.0.0 udp sport 68 udp dport 67"
                    f" iifname . ether saddr @{ident}_dmacs return",
                    f"ether type ip iifname . ether saddr . ip saddr @{ident}_pairs return",
                    f"ether type ip iifname . ether saddr . ip saddr @{ident}_dpairs return",
                    f"ether type arp iifname . ether saddr . arp saddr ether . arp saddr ip @{ident}_arp return",
                    f"ether type arp iifname . ether saddr . arp saddr ether . arp saddr ip @{ident}_darp return",
                    "counter drop",
                ],
            )
        )
        if g.dhcp_isolated and g.trusted_ports:
            t = _names(g.trusted_ports)
            fwd.append(f"iifname {t} ether type ip udp dport 67-68 drop")
            fwd.append(f"oifname {t} ether type ip udp dport 67-68 drop")
            inp.append(f"iifname {t} ether type ip udp dport 67-68 drop")
            out.append(f"oifname {t} ether type ip udp dport 67-68 drop")
        for ip, mac in g.local_only if g.trusted_ports else ():
            # share_dhcp_address: every host holds this ip with this mac; neither is seen
            # beyond the host (no ARP for the ip, no frame from or to the mac)
            t = _names(g.trusted_ports)
            arp = [f"ether type arp arp saddr ip {ip} drop", f"ether type arp arp daddr ip {ip} drop"]
            for chain in (fwd, inp):
                chain += [f"iifname {t} {r}" for r in arp] + [f"iifname {t} ether daddr {mac} drop"]
            for chain in (fwd, out):
                chain += [f"oifname {t} {r}" for r in arp] + [f"oifname {t} ether saddr {mac} drop"]
    base = [
        dict(name="prerouting", type="filter", hook="prerouting", priority=-200, rules=pre),
        dict(name="forward", type="filter", hook="forward", priority=-200, rules=fwd),
        dict(name="input", type="filter", hook="input", priority=-200, rules=inp),
        dict(name="output", type="filter", hook="output", priority=-200, rules=out),
    ]
    return dict(
        family="bridge",
        name=rs.table,
        sets=sets,
        notes=notes,
        comment="hanet: VM port anti-spoofing; replaced as a whole by hanet",
        chains=[c for c in base if c["rules"]] + chains,
    )


def _nft_script(tables):
    return _template(T.NFT).render(tables=tables).strip("\n") + "\n"


# --------------------------------------------------------------------------- iptables


def _ipt_chain(rs, name):
    return f"{rs.table}-{name}"


def _ipt_tables(rs):
    pre, out, post, fwd, inp = [], [], [], [], []

    def host(a):
        return f"{a}/32"

    for f in _sorted_floating(rs):
        pre.append(f"-d {host(f.address)} -j DNAT --to-destination {f.fixed_ip}")
        out.append(f"-d {host(f.address)} -j DNAT --to-destination {f.fixed_ip}")
    md = rs.metadata
    if md and md.bridges:
        for b in sorted(set(md.bridges)):
            m = f"-i {b} -d {METADATA_IP}/32 -p tcp -m tcp --dport 80"
            if md.host == "127.0.0.1":
                pre.append(f"{m} -j REDIRECT --to-ports {md.port}")
            else:
                pre.append(f"{m} -j DNAT --to-destination {md.host}:{md.port}")
    for f in _sorted_floating(rs):
        oif = f" -o {f.public_interface}" if f.public_interface else ""
        post.append(f"-s {host(f.fixed_ip)}{oif} -j SNAT --to-source {f.address}")
    for f in _sorted_floating(rs):
        for src in _hairpin_sources(rs, f):
            post.append(f"-s {src} -d {host(f.fixed_ip)} -m conntrack --ctstate DNAT -j MASQUERADE")
    for s in _sorted_snat(rs):
        oif = f" -o {s.out_interface}" if s.out_interface else ""
        to = f"-j SNAT --to-source {s.source}" if s.source else "-j MASQUERADE"
        for d in _nets(s.force):
            post.append(f"-s {s.cidr} -d {d}{oif} {to}")
        if _all_destinations(s):
            for d in _nets(s.exempt):
                post.append(f"-s {s.cidr} -d {d} -j RETURN")
            post.append(f"-s {s.cidr}{oif} {to}")
    if rs.forward_bridges or rs.floating:
        fwd.append("-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT")
    if rs.floating:
        fwd.append("-m conntrack --ctstate DNAT -j ACCEPT")
    for bridge, public in sorted(set(rs.routed)):
        fwd.append(f"-i {bridge} -o {bridge} -j ACCEPT")  # bridged (br_netfilter)
        fwd.append(f"-i {bridge} ! -o {public} -j DROP")
    for b in sorted(set(rs.forward_bridges)):
        fwd.append(f"-i {b} -j ACCEPT")
        fwd.append(f"-o {b} -j ACCEPT")
    for b in sorted(set(rs.service_bridges)):
        inp.append(f"-i {b} -p udp -m udp --dport 67 -j ACCEPT")
        inp.append(f"-i {b} -p udp -m udp --dport 53 -j ACCEPT")
        inp.append(f"-i {b} -p tcp -m tcp --dport 53 -j ACCEPT")
    if md and md.bridges:
        for b in sorted(set(md.bridges)):
            inp.append(f"-i {b} -p tcp -m tcp --dport {md.port} -j ACCEPT")
        if md.local_service:  # as in nftables: not from the public or management side
            inp.append(f"-i lo -p tcp -m tcp --dport {md.port} -j ACCEPT")
            inp.append(f"-p tcp -m tcp --dport {md.port} -j DROP")
    for a in sorted(rs.snat_addresses):  # as in nftables
        inp.append(f"-d {a}/32 -p tcp -m conntrack --ctstate NEW -j DROP")

    def chain(builtin, rules):
        return dict(name=_ipt_chain(rs, builtin), builtin=builtin, rules=rules)

    return [
        dict(name="nat", chains=[chain("PREROUTING", pre), chain("OUTPUT", out), chain("POSTROUTING", post)]),
        dict(name="filter", chains=[chain("FORWARD", fwd), chain("INPUT", inp)]),
    ]


def _ipt_script(rs):
    return _template(T.IPTABLES).render(tables=_ipt_tables(rs)).strip("\n") + "\n"


def _mangle_script(rs):
    """The DHCP checksum fill (``dhcp_checksum_fill``, nova's mangle rule): DHCP replies
    leaving through a served bridge get their UDP checksum computed in software. A reply
    from the host's own dnsmasq leaves with the checksum left to the NIC (offload), which
    a VM's virtual NIC (veth, vhost-net) never fills in; a guest that reads DHCP on a raw
    socket and checks the checksum (an old dhclient) drops it. nftables has no such
    statement, so this is an iptables rule (object ``iptables-mangle:<table>``: the chain
    ``<table>-POSTROUTING`` of the mangle table) with either driver."""
    rules = [f"-o {b} -p udp -m udp --dport 68 -j CHECKSUM --checksum-fill" for b in sorted(set(rs.checksum_fill))]
    chain = dict(name=_ipt_chain(rs, "POSTROUTING"), builtin="POSTROUTING", rules=rules)
    return _template(T.IPTABLES).render(tables=[dict(name="mangle", chains=[chain])]).strip("\n") + "\n"


# --------------------------------------------------------------------------- render


def _objects(rs):
    """The kernel objects the ruleset consists of: 'nft:<family>:<table>', 'iptables:<prefix>'."""
    objs = []
    if _has_ip_part(rs):
        objs.append(f"iptables:{rs.table}" if rs.driver == "iptables" else f"nft:ip:{rs.table}")
    if rs.guards:
        objs.append(f"nft:bridge:{rs.table}")
    if rs.checksum_fill:
        objs.append(f"iptables-mangle:{rs.table}")
    return sorted(objs)


def _parts(rs, port_list=False):
    """{'iptables': restore input or '', 'nft': nft script or ''} for the ruleset
    (``port_list``: see :func:`_nft_bridge_table`)."""
    if rs.driver not in ("nftables", "iptables"):
        raise ValueError(f"unknown firewall_driver {rs.driver!r} (nftables | iptables)")
    if is_empty(rs):
        return {"iptables": "", "nft": "", "mangle": ""}
    tables = []
    ipt = ""
    if _has_ip_part(rs):
        if rs.driver == "iptables":
            ipt = _ipt_script(rs)
        else:
            tables.append(_nft_ip_table(rs))
    if rs.guards:
        tables.append(_nft_bridge_table(rs, port_list))
    return {
        "iptables": ipt,
        "nft": _nft_script(tables) if tables else "",
        "mangle": _mangle_script(rs) if rs.checksum_fill else "",
    }


def render(ruleset: D.Ruleset) -> str:
    """The full ruleset as text: an nft script, or (iptables driver) the iptables-restore
    input followed by the nft script of the bridge table. Pure and deterministic; ``""``
    for an empty ruleset."""
    parts = _parts(ruleset)
    if not (parts["iptables"] or parts["nft"] or parts["mangle"]):
        return ""
    head = f"# hanet ruleset: driver {ruleset.driver}, table {ruleset.table}\n"
    if ruleset.driver == "iptables":
        text = head + "# --- iptables-restore --noflush\n" + parts["iptables"]
        if parts["nft"]:
            text += "# --- nft -f\n" + parts["nft"]
    else:
        text = head + parts["nft"]
    if parts["mangle"]:
        text += "# --- iptables-restore --noflush (mangle: DHCP checksum fill)\n" + parts["mangle"]
    return text


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- plan


def plan(desired: D.Ruleset, current) -> list:
    """[] when ``current`` (from :func:`current`) already is ``desired``; else one
    ``replace`` (or ``remove`` when the desired ruleset is empty)."""
    text = render(desired)
    if not text:
        if current is None:
            return []
        return [Change(FACET, "remove", desired.table, {"driver": desired.driver, "table": desired.table})]
    if current == text:
        return []
    return [
        Change(
            FACET,
            "replace",
            desired.table,
            {
                "driver": desired.driver,
                "table": desired.table,
                "digest": digest(text),
                "objects": _objects(desired),
                "ruleset": _plain(desired),
            },
        )
    ]


def _plain(rs):
    return json.loads(json.dumps(dataclasses.asdict(rs)))


def _from_plain(d):
    md = d.get("metadata")
    return D.Ruleset(
        driver=d["driver"],
        table=d["table"],
        snat=tuple(
            D.Snat(**{k: tuple(v) if isinstance(v, list) else v for k, v in s.items()}) for s in d.get("snat", ())
        ),
        metadata=D.Metadata(**{**md, "bridges": tuple(md["bridges"])}) if md else None,
        forward_bridges=tuple(d.get("forward_bridges", ())),
        service_bridges=tuple(d.get("service_bridges", ())),
        guards=tuple(
            D.PortGuard(
                bridge=g["bridge"],
                trusted_ports=tuple(g["trusted_ports"]),
                pairs=tuple(tuple(p) for p in g["pairs"]),
                dhcp_isolated=g["dhcp_isolated"],
                ports=tuple(tuple(p) for p in g.get("ports", ())),
                local_only=tuple(tuple(p) for p in g.get("local_only", ())),
                routed_from=tuple(g.get("routed_from", ())),
                routed_force=tuple(g.get("routed_force", ())),
                routed_exempt=tuple(g.get("routed_exempt", ())),
                routed_metadata=bool(g.get("routed_metadata", False)),
                routed_via=g.get("routed_via"),
            )
            for g in d.get("guards", ())
        ),
        floating=tuple(D.FloatingIp(**f) for f in d.get("floating", ())),
        checksum_fill=tuple(d.get("checksum_fill", ())),
        routed=tuple(tuple(r) for r in d.get("routed", ())),
    )


# --------------------------------------------------------------------------- kernel


def _run(args, stdin=None):
    # common.run: the beacon's port watch binds ports from a thread of the minion's process
    proc = run(args, input=stdin, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def _nft(*args, stdin=None):
    return _run(["nft", *args], stdin)


def _netns_id():
    try:
        return os.stat(f"/proc/self/task/{_gettid()}/ns/net").st_ino
    except OSError:
        return None


def _gettid():
    try:
        return os.gettid()
    except AttributeError:  # pragma: no cover
        return os.getpid()


_BRIDGE_META: dict = {}


def bridge_meta_supported():
    """Whether the kernel can match ``meta ibrname`` (nft_meta_bridge); probed with a
    check-only transaction (``nft -c``) that changes nothing, cached per network namespace."""
    key = _netns_id()
    if key not in _BRIDGE_META:
        probe = 'table bridge hanet_probe {\n\tchain c {\n\t\tmeta ibrname "lo" accept\n\t}\n}\n'
        proc = run(["nft", "-c", "-f", "-"], input=probe, capture_output=True, text=True)
        _BRIDGE_META[key] = proc.returncode == 0
    return _BRIDGE_META[key]


def _bridge_port_macs(bridges):
    """{bridge: {port: MAC}} for ``bridges`` (empty for one that does not exist), read
    with one link dump (pyroute2, this netns)."""
    return _bridge_links(bridges)[0]


def _bridge_links(bridges):
    """(``_bridge_port_macs``, {bridge: its own MAC}) from one link dump."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        links = ipr.get_links()
    names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in links}
    ports = {b: {} for b in bridges}
    own = {}
    for link in links:
        name = link.get_attr("IFLA_IFNAME")
        if name in ports:
            own[name] = _mac(link.get_attr("IFLA_ADDRESS") or "")
        master = names.get(link.get_attr("IFLA_MASTER"))
        if master in ports:
            ports[master][name] = _mac(link.get_attr("IFLA_ADDRESS") or "")
    return {b: dict(sorted(p.items())) for b, p in ports.items()}, own


def port_report(guards, port_macs):
    """Which VM ports are bound (pure): ``{"unknown": [(bridge, port, mac)], "unplugged":
    [(bridge, mac, ip)]}``. ``unknown``: a port on a guarded bridge that belongs to no
    instance NIC of this host (not trusted, not named, no NIC's MAC by libvirt's rule):
    it may send nothing, which is right for a stray port and wrong for a VM the pillar
    does not know (or knows with another MAC). ``unplugged``: a NIC of this host whose
    port is not on its bridge (the VM is not running, or its port cannot be found)."""
    unknown, unplugged = [], []
    for g in sorted(guards, key=lambda g: g.bridge):
        present = port_macs.get(g.bridge) or {}
        bound = _bindings(g, present)
        ports, macs = {p for p, _, _ in bound}, {m for _, m, _ in bound}
        unknown += [(g.bridge, p, m) for p, m in sorted(present.items()) if p not in g.trusted_ports and p not in ports]
        unplugged += sorted((g.bridge, _mac(m), str(ip)) for m, ip in g.pairs if _mac(m) not in macs)
    return {"unknown": unknown, "unplugged": unplugged}


def ports_now(guards):
    """``port_report`` for this host's ``guards`` and the ports on their bridges now."""
    return port_report(guards, _bridge_port_macs(sorted({g.bridge for g in guards})))


def _bridge_ports(bridges):
    """{bridge: sorted port names} for the bridges that exist (pyroute2, this netns)."""
    return {b: sorted(p) for b, p in _bridge_port_macs(bridges).items()}


def _nft_tables():
    out = _nft("list", "tables")
    return {tuple(line.split()[1:3]) for line in out.splitlines() if line.startswith("table ")}


def _ipt_save(table):
    if not shutil.which("iptables-save"):
        return ""
    proc = run(["iptables-save", "-t", table], capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else ""


def _ipt_lines(prefix, table, save=None):
    """hanet's lines in ``iptables-save -t table``: its chains, their rules, the jumps."""
    names = {"nat": NAT_CHAINS, "mangle": MANGLE_CHAINS}.get(table, FILTER_CHAINS)
    mine = {f"{prefix}-{n}" for n in names}
    save = _ipt_save(table) if save is None else save
    lines = []
    for line in save.splitlines():
        words = line.split()
        if not words:
            continue
        if words[0].startswith(":") and words[0][1:] in mine:
            lines.append(words[0])
        elif (
            words[0] == "-A"
            and len(words) > 1
            and (
                words[1] in mine
                or ("-j" in words and words[words.index("-j") + 1 :][:1] and words[words.index("-j") + 1] in mine)
            )
        ):
            lines.append(line.strip())
    return lines


def _snapshot(objects):
    """The normalized kernel listing of hanet's objects (empty: none of them exists)."""
    out = []
    tables = None
    for obj in sorted(set(objects)):
        kind, _, rest = obj.partition(":")
        if kind == "nft":
            if tables is None:
                tables = _nft_tables()
            family, name = rest.split(":", 1)
            if (family, name) in tables:
                text = _nft("-s", "list", "table", family, name)
                out.append(f"## {obj}\n" + "\n".join(_without_dynamic(text.splitlines())))
        elif kind == "iptables":
            lines = _ipt_lines(rest, "nat") + _ipt_lines(rest, "filter")
            if lines:
                out.append(f"## {obj}\n" + "\n".join(lines))
        elif kind == "iptables-mangle":
            lines = _ipt_lines(rest, "mangle")
            if lines:
                out.append(f"## {obj}\n" + "\n".join(lines))
    return "\n".join(out)


def _without_dynamic(lines):
    """An ``nft list`` listing without the elements of the sets ``bind_ports`` fills (the
    ports plugged now are not part of what an apply compares)."""
    out, in_dynamic, skipping = [], False, False
    for line in lines:
        line = line.rstrip()
        words = line.split()
        if len(words) >= 3 and words[0] in ("set", "map") and words[2] == "{":
            in_dynamic = words[1].endswith(DYNAMIC)
        elif line.strip() == "}":
            in_dynamic = in_dynamic and skipping
        if skipping:
            skipping = not line.endswith("}")
            continue
        if in_dynamic and line.strip().startswith("elements = {"):
            skipping = not line.endswith("}")
            continue
        out.append(line)
    return out


def dynamic_elements(guards, port_macs, port_list, bridge_macs=None, owner_macs=None):
    """{set name: sorted elements} for the sets ``bind_ports`` fills (pure): each NIC's
    (MAC, IP) bound to the port carrying its tap MAC (libvirt's rule; the pillar's
    ``port:`` bindings are static), and with ``port_list`` every port of the bridge that is
    not trusted (the VM ports the prerouting rule sends to the guard chain); where frames
    are routed by the host (``routed_from``), the map of every VM port to its bridge's
    MAC (``bridge_macs``: {bridge: MAC}); where they go to a network host (``routed_via``),
    the MAC its owner answers with (``owner_macs``: {ip: MAC}, the beacon's owner watch)."""
    out = _via_elements(guards, owner_macs or {})
    idents = _idents(guards)
    for g in guards:
        ident = idents[g.bridge]
        present = port_macs.get(g.bridge) or {}
        dynamic = sorted(set(_bindings(g, present)) - set(_bindings(g, None)))
        pairs, arp, macs = _binding_elements(dynamic)
        out.update({f"{ident}_dpairs": pairs, f"{ident}_darp": arp, f"{ident}_dmacs": macs})
        if port_list:
            out[f"{ident}_ports"] = sorted(_q(p) for p in present if p not in g.trusted_ports)
        if not g.routed:
            continue  # nothing routed: no map (``_nft_bridge_table``)
        if g.routed_via:
            own = (bridge_macs or {}).get(g.bridge)
            out[f"{ident}_self"] = [own] if own else []
        else:
            mac = (bridge_macs or {}).get(g.bridge)
            vm_ports = [p for p in present if p not in g.trusted_ports] if mac else []
            out[f"{ident}_brmac"] = sorted(f"{_q(p)} : {mac}" for p in vm_ports)
    return out


def _bind_script(table, elements):
    lines = []
    for name, els in sorted(elements.items()):
        kind = "map" if name.endswith(MAPS) else "set"  # (_self is a set)
        lines.append(f"flush {kind} bridge {table} {name}")
        if els:
            lines.append(f"add element bridge {table} {name} {{ {', '.join(els)} }}")
    return "\n".join(lines) + "\n"


def _lock(paths):
    return FileLock(paths.state("ruleset.lock"))


def bind_ports(paths, locked=False):
    """Bind the VM ports on hanet's guarded bridges now (``dynamic_elements``), in one nft
    transaction (the sets are flushed and filled at once: a port is never unbound in
    between). Called after every apply and by the beacon's port watch when a port
    appears, changes its MAC or goes. Returns {set: elements}, or None when hanet guards
    no bridge here."""
    if not locked:
        with _lock(paths):
            return bind_ports(paths, locked=True)
    state = _load_state(paths)
    guards = _applied_guards(state)
    if not guards:
        return None
    port_macs, bridge_macs = _bridge_links(sorted({g.bridge for g in guards}))
    from . import follow

    owners = follow.learnt(paths) if any(g.routed_via for g in guards) else {}
    elements = dynamic_elements(guards, port_macs, bool(state.get("port_list")), bridge_macs, owners)
    _nft("-f", "-", stdin=_bind_script(state["table"], elements))
    return elements


def bind_owners(paths, owners, locked=False):
    """Put the owners' MACs (``owners``: {ip: MAC}, the beacon's owner watch) into the
    ``_via`` maps alone, in one nft transaction: the owner watch's path after a failover,
    which must not wait for a dump of every link (``bind_ports`` does the rest). Returns
    {map: elements}, or None when no guarded bridge here sends frames to an owner."""
    if not locked:
        with _lock(paths):
            return bind_owners(paths, owners, locked=True)
    state = _load_state(paths)
    guards = _applied_guards(state)
    elements = _via_elements(guards, owners)
    if not elements:
        return None
    _nft("-f", "-", stdin=_bind_script(state["table"], elements))
    return elements


def _applied_guards(state):
    """The guards of the ruleset hanet applied last (``state``), if its bridge table is
    in place; else ()."""
    if not state.get("ruleset") or "nft:bridge:" + str(state.get("table")) not in state.get("objects", ()):
        return ()
    return _from_plain(state["ruleset"]).guards


def _via_elements(guards, owners):
    """{<bridge>_via: [the owner's MAC as the one element, or none]} of the guards whose
    frames go to a network host's owner (``owners``: {dhcp_server: MAC})."""
    idents = _idents(guards)
    return {
        f"{idents[g.bridge]}_via": [f"ip : {owners[g.routed_via]}"] if owners.get(g.routed_via) else []
        for g in guards
        if g.routed_via and g.routed
    }


def _load_state(paths):
    try:
        with open(paths.state(STATE_FILE), encoding="utf-8") as fh:
            return json.load(fh)
    except (FileNotFoundError, ValueError):
        return {}


def _candidates(desired, state):
    objs = set(state.get("objects", ()))
    if desired is not None:
        objs |= set(_objects(desired))
        objs |= {f"nft:ip:{desired.table}", f"nft:bridge:{desired.table}"}
        if desired.driver == "iptables" or state.get("driver") == "iptables":
            objs.add(f"iptables:{desired.table}")
    return objs


def current(ruleset_desired: D.Ruleset, paths: Paths):
    """What the kernel holds now for hanet: None when none of hanet's tables/chains
    exists; the text hanet last applied when the kernel still holds exactly what that
    apply left (the same normalized listing: the ports bound since, by ``bind_ports``,
    are not part of it); otherwise a text describing the live state (never equal to a
    rendered ruleset)."""
    state = _load_state(paths)
    snap = _snapshot(_candidates(ruleset_desired, state))
    if not snap:
        return None
    if state and snap == state.get("snapshot"):
        return state.get("text")
    return "# hanet: the kernel differs from what hanet applied last\n" + snap + "\n"


# --------------------------------------------------------------------------- apply


def _nft_remove_script(objects):
    lines = []
    for obj in sorted(objects):
        kind, _, rest = obj.partition(":")
        if kind == "nft":
            family, name = rest.split(":", 1)
            lines += [f"table {family} {name}", f"delete table {family} {name}"]
    return "\n".join(lines) + "\n" if lines else ""


def _ipt_remove_script(prefix, tables=(("nat", NAT_CHAINS), ("filter", FILTER_CHAINS))):
    blocks = []
    for table, names in tables:
        save = _ipt_save(table)
        mine = [f"{prefix}-{n}" for n in names]
        lines = _ipt_lines(prefix, table, save)
        jumps = [ln for ln in lines if ln.startswith("-A ") and ln.split()[1] not in mine]
        chains = [ln[1:] for ln in lines if ln.startswith(":")]
        if not (jumps or chains):
            continue
        body = ["-D " + ln[3:] for ln in jumps]
        body += [f"-F {c}" for c in chains] + [f"-X {c}" for c in chains]
        blocks.append(f"*{table}\n" + "\n".join(body) + "\nCOMMIT\n")
    return "".join(blocks)


def _ipt_apply_script(rs, text):
    """The rendered restore input with the deletion of every existing jump to hanet's
    chains added before the new ones: one transaction, exactly one jump afterwards."""
    out, table = [], None
    pending = []
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:]
            pending = [
                "-D " + ln[3:]
                for ln in _ipt_lines(rs.table, table)
                if ln.startswith("-A ") and ln.split()[1] in (NAT_CHAINS + FILTER_CHAINS + MANGLE_CHAINS)
            ]
        elif pending and (line.startswith("-A ") or line.startswith("-I ") or line == "COMMIT"):
            out += pending
            pending = []
        out.append(line)
    return "\n".join(out) + "\n"


def _apply_mangle(rs, text):
    if not shutil.which("iptables-restore"):
        raise RuntimeError("dhcp_checksum_fill needs iptables (iptables-restore), which this host does not have")
    try:
        _run(["iptables-restore", "-w", "5", "--noflush"], _ipt_apply_script(rs, text))
    except RuntimeError as err:
        raise RuntimeError(
            f"dhcp_checksum_fill: the mangle rule was refused ({err}); it needs iptables' CHECKSUM target "
            "(kernel module xt_CHECKSUM)"
        ) from err


def _remove(objects):
    done = []
    script = _nft_remove_script(objects)
    if script:
        _nft("-f", "-", stdin=script)
        done += [o for o in sorted(objects) if o.startswith("nft:")]
    for obj in sorted(objects):
        kind, _, prefix = obj.partition(":")
        if kind in ("iptables", "iptables-mangle") and shutil.which("iptables-restore"):
            if kind == "iptables-mangle":
                script = _ipt_remove_script(prefix, (("mangle", MANGLE_CHAINS),))
            else:
                script = _ipt_remove_script(prefix)
            if script:
                _run(["iptables-restore", "--noflush"], script)
                done.append(obj)
    return done


def _present(objects):
    """Which of ``objects`` exist: one ``nft list tables`` for the nft ones (a full
    listing of a table with 1,000 set elements is not needed to know it is there)."""
    out = set()
    tables = None
    for obj in set(objects):
        kind, _, rest = obj.partition(":")
        if kind == "nft":
            if tables is None:
                tables = _nft_tables()
            if tuple(rest.split(":", 1)) in tables:
                out.add(obj)
        elif kind == "iptables" and (_ipt_lines(rest, "nat") or _ipt_lines(rest, "filter")):
            out.add(obj)
        elif kind == "iptables-mangle" and _ipt_lines(rest, "mangle"):
            out.add(obj)
    return out


def apply(changes, paths: Paths, managed):
    """Carry out ``plan``'s changes; returns one line per thing done."""
    done = []
    for change in changes:
        if change.facet != FACET:
            continue
        state = _load_state(paths)
        recorded = managed.get(FACET) | set(state.get("objects", ()))
        if change.action == "remove":
            table = change.detail.get("table", change.target)
            objs = recorded | {f"nft:ip:{table}", f"nft:bridge:{table}", f"iptables:{table}"}
            removed = _remove(_present(objs))
            managed.set(FACET, [])
            try:
                os.unlink(paths.state(STATE_FILE))
            except FileNotFoundError:
                pass
            done.append(f"ruleset: removed {', '.join(removed) or 'nothing'}")
        elif change.action == "replace":
            rs = _from_plain(change.detail["ruleset"])
            text = render(rs)
            new = set(_objects(rs))
            port_list = bool(rs.guards) and not bridge_meta_supported()
            parts = _parts(rs, port_list)
            lock = _lock(paths)
            lock.__enter__()  # the port watch does not bind between the table and its ports
            try:
                if parts["mangle"]:  # first: where the kernel cannot, nothing else changes
                    _apply_mangle(rs, parts["mangle"])
                if parts["iptables"]:
                    _run(["iptables-restore", "--noflush"], _ipt_apply_script(rs, parts["iptables"]))
                if parts["nft"]:
                    _nft("-f", "-", stdin=parts["nft"])
                applied_state = {
                    "driver": rs.driver,
                    "table": rs.table,
                    "objects": sorted(new),
                    "ruleset": change.detail["ruleset"],
                    "port_list": port_list,
                }
                write_atomic(paths.state(STATE_FILE), json.dumps(applied_state) + "\n", mode=0o600)
                bound = bind_ports(paths, locked=True) if rs.guards else None
            finally:
                lock.__exit__(None, None, None)
            # Stale objects: a renamed table, the other driver's rules, a part no longer needed.
            stale = _present(_candidates(rs, state) | recorded) - new
            removed = _remove(stale)
            paths.ensure()
            if state.get("digest") == digest(text):
                # the same ruleset again: someone changed the kernel's (drift, put back)
                from . import metrics

                metrics.host_store(paths).add("hanet_ruleset_drift_repaired_total")
            snap = _snapshot(new)
            write_atomic(
                paths.state(STATE_FILE),
                json.dumps(
                    {
                        "driver": rs.driver,
                        "table": rs.table,
                        "digest": digest(text),
                        "objects": sorted(new),
                        "ruleset": change.detail["ruleset"],
                        "port_list": port_list,
                        "snapshot": snap,
                        "text": text,
                    },
                    indent=1,
                    sort_keys=True,
                )
                + "\n",
                mode=0o600,
            )
            managed.set(FACET, new)
            msg = f"ruleset: applied {', '.join(sorted(new))} ({rs.driver}, digest {digest(text)})"
            if removed:
                msg += f"; removed {', '.join(removed)}"
            if bound is not None:
                n = sum(len(v) for k, v in bound.items() if k.endswith("_dpairs"))
                msg += f"; {n} NIC(s) bound to their ports" + (" (port set: no meta ibrname)" if port_list else "")
            done.append(msg)
        else:
            raise ValueError(f"ruleset: unknown action {change.action!r}")
    return done


def handle(paths: Paths):
    """The ruleset's handle for ``hanet.status``: what hanet applied (driver, table names,
    digest) and whether the kernel still holds exactly that."""
    state = _load_state(paths)
    if not state:
        return {"driver": None, "tables": [], "digest": None, "in_place": None}
    try:
        in_place = _snapshot(state.get("objects", ())) == state.get("snapshot")
    except (OSError, RuntimeError):
        in_place = None
    return {
        "driver": state.get("driver"),
        "tables": state.get("objects", []),
        "digest": state.get("digest"),
        "in_place": in_place,
        "port_list_mode": bool(state.get("port_list")),
    }
