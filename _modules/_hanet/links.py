"""The kernel applier for bridges, segment links (VLAN/VXLAN) and their addresses.

Three steps, like every hanet applier:

- ``current(bridges_of_interest, managed_names)`` reads this network namespace (netlink
  only, via pyroute2) into the ``desired.Bridge`` / ``desired.Segment`` shapes;
- ``plan(desired, current, managed)`` is pure: it compares and returns ``Change``s
  (facet ``links``);
- ``apply(changes, managed)`` executes them with pyroute2's ``IPRoute`` and keeps the
  ``Managed`` record (facet ``links``: the names of the links hanet created) up to date.

The Change vocabulary (``action target`` -- ``detail``):

====================  ==================================  ==============================
action                target                              detail
====================  ==================================  ==============================
create                bridge name                         kind=bridge, mtu
create                segment link (vlan101, vx5102)      kind=vlan|vxlan, the Segment's
                                                          fields (name, parent, vlan_id,
                                                          vni, group, port, mtu, ...)
delete                link name (a bridge or a segment)   kind (None: look it up)
forget                a recorded link that is gone        (none): only the record changes
enslave               port (uplink or segment link)       master (the port's own IPv4
                                                          addresses and routes move onto
                                                          the bridge: ``carry``)
release               port                                master (only if still there;
                                                          what was carried moves back)
set                   link                                any of mtu, mtu_min (raise
                                                          only), state ("up"),
                                                          stp_state, forward_delay,
                                                          address_of (pin the MAC to
                                                          that link's MAC)
add / remove          "<link> <ip>/<prefixlen>"           link, address
add / remove          "<link> remote <ip>"                link, remote (VXLAN head-end
                                                          replication FDB entry
                                                          00:00:00:00:00:00 dst <ip>)
====================  ==================================  ==============================

``current`` returns ``Observed`` bridges: a ``Bridge`` that compares equal to the plain
desired ``Bridge`` with the same fields, and additionally carries what the shapes do not
hold (link state, STP, forward delay, MACs, the uplink's and the segment parent's MTU).
``plan`` given plain ``Bridge`` objects as current assumes those settings are right.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

from .common import Change
from .desired import Bridge, Segment

FACET = "links"
CARRIED = "carried"  # Managed facet: "<bridge> <port> <address>" a bridge took from its uplink
ZERO_MAC = "00:00:00:00:00:00"
SEGMENT_KINDS = ("vlan", "vxlan")
#: link kinds hanet creates, and so the only kinds it will ever delete
OWN_KINDS = ("bridge",) + SEGMENT_KINDS
VXLAN_LEARNING = True
_BRIDGE_FIELDS = tuple(f.name for f in dataclasses.fields(Bridge))


# --------------------------------------------------------------------------- shapes


@dataclass(frozen=True, eq=False)
class Observed(Bridge):
    """A bridge as read from the kernel: the ``Bridge`` fields, plus the settings hanet
    pins that the ``Bridge`` shape does not hold. Compares (and hashes) as a ``Bridge``."""

    up: bool = True
    stp_state: int = 0
    forward_delay: int = 0
    mac: Optional[str] = None
    uplink_mac: Optional[str] = None  # MAC of the desired uplink (else the enslaved one)
    uplink_mtu: Optional[int] = None
    uplink_up: bool = True
    uplink_holds_v4: bool = False  # the enslaved uplink still holds IPv4 addresses (a move to redo)
    segment_up: bool = True
    parent_mtu: Optional[int] = None  # MTU of the desired segment's parent
    ports: tuple = ()

    def as_bridge(self):
        return Bridge(**{name: getattr(self, name) for name in _BRIDGE_FIELDS})

    def __eq__(self, other):
        if isinstance(other, Bridge):
            return _fields(self) == _fields(other)
        return NotImplemented

    def __hash__(self):
        return hash(_fields(self))


def _fields(bridge):
    return tuple(getattr(bridge, name) for name in _BRIDGE_FIELDS)


class Snapshot(tuple):
    """The tuple of bridges ``current`` returns; ``present`` holds the names of the
    links of interest (bridges, uplinks, segments, managed names) that exist."""

    present: frozenset = frozenset()

    def __new__(cls, bridges=(), present=()):
        self = super().__new__(cls, bridges)
        self.present = frozenset(present)
        return self


# --------------------------------------------------------------------------- plan


def _segment_identity(seg):
    """What cannot change on a live link: a difference means delete and create."""
    return (seg.kind, seg.name, seg.parent, seg.vlan_id, seg.vni, seg.group, seg.port)


def _overhead(seg):
    if seg.kind != "vxlan":
        return 0
    for addr in (seg.group,) + tuple(seg.remotes):
        if addr and ipaddress.ip_address(addr).version == 6:
            return 70
    return 50


def parent_mtu_needed(seg):
    """The MTU the segment's parent needs: VLAN payload, or VXLAN payload + encapsulation."""
    return seg.mtu + _overhead(seg)


def _subnet(address):
    try:
        return ipaddress.ip_interface(address).network
    except ValueError:
        return address


def _address_changes(name, cur, des):
    cur, des = list(cur), list(des)
    removes, adds = [], []
    if des and cur and cur[0] != des[0]:
        # wrong primary: take everything off (secondaries first) and add in order
        removes = list(reversed(cur))
        adds = des
    else:
        gone = [a for a in cur if a not in des]
        removes = list(reversed(gone))
        adds = [a for a in des if a not in cur]
        # removing the primary of a subnet drops that subnet's secondaries unless
        # promote_secondaries is set: add the kept ones again (a no-op if they survived)
        for i, kept in enumerate(cur):
            if kept in des and any(_subnet(g) == _subnet(kept) and cur.index(g) < i for g in gone):
                if kept not in adds:
                    adds.append(kept)
        adds.sort(key=des.index)
    out = [Change(FACET, "remove", f"{name} {a}", {"link": name, "address": a}) for a in removes]
    out += [Change(FACET, "add", f"{name} {a}", {"link": name, "address": a}) for a in adds]
    return out


def _remote_change(action, link, remote):
    return Change(FACET, action, f"{link} remote {remote}", {"link": link, "remote": remote})


def _segment_detail(seg):
    detail = dataclasses.asdict(seg)
    detail["remotes"] = list(seg.remotes)
    detail["learning"] = VXLAN_LEARNING
    return detail


def plan(desired, current, managed):
    """The Changes that turn ``current`` into ``desired`` (pure: no netlink).

    ``managed`` is the set of link names hanet created (Managed facet ``links``): only
    those are ever deleted. A bridge that exists but hanet did not create is configured
    while desired and left alone afterwards.
    """
    present = getattr(current, "present", None)
    desired = tuple(desired)
    current = tuple(current)
    managed = set(managed or ())
    cur_by_name = {b.name: b for b in current}
    desired_links = set()
    desired_uplinks = set()
    protected = set()  # desired uplinks and segment parents: never deleted
    for b in desired:
        desired_links.add(b.name)
        if b.segment:
            desired_links.add(b.segment.name)
            protected.add(b.segment.parent)
        if b.uplink:
            desired_uplinks.add(b.uplink)
            protected.add(b.uplink)

    changes = []

    # 1. what hanet made and no longer wants: bridges first (that releases their
    #    ports), then the segment links; never anything hanet did not create
    doomed_bridges = sorted(n for n in managed if n in cur_by_name and n not in desired_links)
    for name in doomed_bridges:
        changes.append(Change(FACET, "delete", name, {"kind": "bridge"}))
    for name in sorted(managed - desired_links - protected - set(doomed_bridges)):
        if present is not None and name not in present:
            # recorded but already gone: only the record needs to change
            changes.append(Change(FACET, "forget", name))
            continue
        kind = None
        for b in current:
            if b.segment and b.segment.name == name:
                kind = b.segment.kind
        changes.append(Change(FACET, "delete", name, {"kind": kind}))
    # a physical link in the record (hanet never creates one): drop it from the record
    for name in sorted((managed & protected) - desired_links):
        changes.append(Change(FACET, "forget", name))
    deleted = {c.target for c in changes if c.action == "delete" and c.detail.get("kind")}

    # 2. segment parents first: a port's MTU change re-adjusts a bridge MTU that was not
    #    set explicitly, so raise them all before any bridge MTU is set
    raise_to = {}
    for d in desired:
        if d.segment is None:
            continue
        c = cur_by_name.get(d.name)
        obs = c if isinstance(c, Observed) else None
        need = parent_mtu_needed(d.segment)
        known = obs.parent_mtu if obs is not None else None
        if known is not None and known >= need:
            continue
        if known is not None or not _segment_same(d, c):
            raise_to[d.segment.parent] = max(need, raise_to.get(d.segment.parent, 0))
    for parent, need in raise_to.items():
        changes.append(Change(FACET, "set", parent, {"mtu_min": need}))

    # 3. every desired bridge, in order
    for d in desired:
        changes += _plan_bridge(d, cur_by_name.get(d.name), desired_uplinks, deleted, set(raise_to))
    return changes


def _segment_same(d, c):
    cseg = c.segment if c is not None else None
    return cseg is not None and d.segment is not None and _segment_identity(cseg) == _segment_identity(d.segment)


def _plan_bridge(d, c, desired_uplinks, deleted, mtu_touched):
    out = []
    # ports whose MTU changes during this plan: an MTU the kernel auto-adjusted (not set
    # explicitly) follows them, so the bridge MTU is set again afterwards
    ports = set(c.ports if isinstance(c, Observed) else (c.uplink,)) if c is not None else set()
    port_mtu_moves = bool(ports & mtu_touched)
    obs = c if isinstance(c, Observed) else None
    seg = d.segment
    cseg = c.segment if c is not None else None
    fresh_seg = False

    if seg is not None:
        if not _segment_same(d, c):
            if cseg is not None and cseg.name == seg.name:
                out.append(Change(FACET, "delete", seg.name, {"kind": cseg.kind}))
            out.append(Change(FACET, "create", seg.name, _segment_detail(seg)))
            fresh_seg = True
            for remote in seg.remotes:
                out.append(_remote_change("add", seg.name, remote))
        else:
            want = {}
            if cseg.mtu != seg.mtu:
                want["mtu"] = seg.mtu
                port_mtu_moves = True
            if obs is not None and not obs.segment_up:
                want["state"] = "up"
            if want:
                out.append(Change(FACET, "set", seg.name, want))
            have, wanted = set(cseg.remotes), set(seg.remotes)
            for remote in seg.remotes:
                if remote not in have:
                    out.append(_remote_change("add", seg.name, remote))
            for remote in sorted(have - wanted):
                out.append(_remote_change("remove", seg.name, remote))

    fresh = c is None
    if fresh:
        out.append(Change(FACET, "create", d.name, {"kind": "bridge", "mtu": d.mtu}))

    enslaving = False
    cur_uplink = c.uplink if c is not None else None
    if d.uplink and (d.uplink != cur_uplink or fresh_seg):
        if cur_uplink and cur_uplink != d.uplink and cur_uplink not in desired_uplinks and cur_uplink not in deleted:
            out.append(Change(FACET, "release", cur_uplink, {"master": d.name}))
        port_mtu_moves = port_mtu_moves or bool(cur_uplink and cur_uplink != d.uplink)
        out.append(Change(FACET, "enslave", d.uplink, {"master": d.name}))
        enslaving = True
    elif d.uplink and obs is not None and obs.uplink_holds_v4:
        # an earlier move of the host's addresses onto the bridge failed half way: again
        out.append(Change(FACET, "enslave", d.uplink, {"master": d.name}))
    elif not d.uplink and cur_uplink and cur_uplink not in desired_uplinks and cur_uplink not in deleted:
        out.append(Change(FACET, "release", cur_uplink, {"master": d.name}))
        port_mtu_moves = True

    # the flat uplink: up, and at least the bridge's MTU (a segment link is set above)
    if d.uplink and seg is None:
        want = {}
        if enslaving or (obs is not None and obs.uplink_mtu is not None and obs.uplink_mtu < d.mtu):
            want["mtu_min"] = d.mtu
            port_mtu_moves = True
        if enslaving or (obs is not None and not obs.uplink_up):
            want["state"] = "up"
        if want:
            out.append(Change(FACET, "set", d.uplink, want))

    want = {}
    if obs is not None and (obs.stp_state != 0 or obs.forward_delay != 0):
        want.update(stp_state=0, forward_delay=0)
    if fresh or enslaving or port_mtu_moves or c.mtu != d.mtu:
        want["mtu"] = d.mtu  # after enslaving: an explicit MTU is not auto-adjusted
    if d.shared_mac:
        if fresh or (obs is not None and obs.mac != d.shared_mac):
            want["address"] = d.shared_mac
    elif d.uplink and (
        fresh or enslaving or fresh_seg or (obs is not None and obs.uplink_mac and obs.mac != obs.uplink_mac)
    ):
        want["address_of"] = d.uplink
    if fresh or (obs is not None and not obs.up):
        want["state"] = "up"
    if want:
        out.append(Change(FACET, "set", d.name, want))

    out += _address_changes(d.name, c.addresses if c is not None else (), d.addresses)
    return out


# --------------------------------------------------------------------------- netlink


@contextmanager
def _ipr(ipr=None):
    if ipr is not None:
        yield ipr
        return
    from pyroute2 import IPRoute

    with IPRoute() as own:
        yield own


def _kind(msg):
    info = msg.get_attr("IFLA_LINKINFO")
    return info.get_attr("IFLA_INFO_KIND") if info is not None else None


def _info_data(msg):
    info = msg.get_attr("IFLA_LINKINFO")
    return info.get_attr("IFLA_INFO_DATA") if info is not None else None


def _up(msg):
    return bool(msg["flags"] & 1)  # IFF_UP


def _links(ipr):
    return {msg["index"]: msg for msg in ipr.get_links()}


def _index(ipr, name):
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def _addresses(ipr, index, dump=None):
    """``index``'s addresses; ``dump``: the result of ``ipr.get_addr()`` when the caller
    already has it (one dump per ``current``, not one per bridge)."""
    v4, v6 = [], []
    for msg in ipr.get_addr() if dump is None else dump:
        if msg["index"] != index:
            continue
        addr = msg.get_attr("IFA_ADDRESS")
        if msg["family"] == socket.AF_INET:
            addr = msg.get_attr("IFA_LOCAL") or addr
            v4.append(f"{addr}/{msg['prefixlen']}")
        elif msg["family"] == socket.AF_INET6 and msg["scope"] == 0:
            flags = msg.get_attr("IFA_FLAGS") or msg["flags"]
            if flags & 0x80:  # IFA_F_PERMANENT: configured, not from SLAAC
                v6.append(f"{addr}/{msg['prefixlen']}")
    return v4 + v6


def _remotes(ipr, index, group=None, dump=None):
    out = []
    for msg in ipr.fdb("dump") if dump is None else dump():
        if msg["ifindex"] != index or msg.get_attr("NDA_LLADDR") != ZERO_MAC:
            continue
        dst = msg.get_attr("NDA_DST")
        if dst and dst != group and dst not in out:
            out.append(dst)
    return out


def _read_segment(ipr, msg, links, desired_seg=None, fdb=None):
    kind = _kind(msg)
    data = _info_data(msg)
    name = msg.get_attr("IFLA_IFNAME")
    mtu = msg.get_attr("IFLA_MTU")

    def name_of(index):
        parent = links.get(index)
        return parent.get_attr("IFLA_IFNAME") if parent is not None else None

    if kind == "vlan":
        return Segment(
            kind="vlan",
            name=name,
            parent=name_of(msg.get_attr("IFLA_LINK")),
            vlan_id=data.get_attr("IFLA_VLAN_ID") if data else None,
            mtu=mtu,
        )
    if kind == "vxlan":
        group = (data.get_attr("IFLA_VXLAN_GROUP") or data.get_attr("IFLA_VXLAN_GROUP6")) if data else None
        remotes = _remotes(ipr, msg["index"], group, fdb)
        if desired_seg is not None:  # report them in the desired order when they match
            order = list(desired_seg.remotes)
            remotes.sort(key=lambda r: (order.index(r) if r in order else len(order), r))
        return Segment(
            kind="vxlan",
            name=name,
            parent=name_of(data.get_attr("IFLA_VXLAN_LINK")) if data else None,
            vni=data.get_attr("IFLA_VXLAN_ID") if data else None,
            group=group or None,
            remotes=tuple(remotes),
            port=(data.get_attr("IFLA_VXLAN_PORT") if data else None) or 4789,
            mtu=mtu,
        )
    return None


def current(bridges_of_interest=(), managed_names=(), ipr=None, carried=(), floating=()):
    """The bridges of interest as they are now in this network namespace.

    ``bridges_of_interest``: the desired ``Bridge``s (or bare bridge names);
    ``managed_names``: the link names hanet created (Managed facet ``links``). Returns a
    ``Snapshot`` (a tuple) of ``Observed`` bridges, desired ones first, for those that
    exist as bridges. ``carried``: the Managed facet ``carried`` (the addresses a bridge
    took over from its uplink, ``carry``): they are the host's, not the bridge's, and are
    left out of its addresses; so are the ``floating`` IPs (their /32s are the floating
    facet's, bound on a bridge that carries the host's public address).
    """
    fips = {f"{ip}/32" for ip in floating or ()}
    kept = {}
    for entry in carried or ():
        bridge, _port, address = entry.split(" ")
        kept.setdefault(bridge, set()).add(address)
    desired = {}
    names = []
    for b in bridges_of_interest:
        name = b.name if isinstance(b, Bridge) else b
        if isinstance(b, Bridge):
            desired[name] = b
        if name not in names:
            names.append(name)
    for name in sorted(managed_names or ()):
        if name not in names:
            names.append(name)

    with _ipr(ipr) as ipr:
        links = _links(ipr)
        by_name = {m.get_attr("IFLA_IFNAME"): m for m in links.values()}
        # one address dump and (when a VXLAN is read) one FDB dump for all bridges: the
        # FDB holds every learned MAC, so a dump per bridge grows as bridges x VMs
        addr_dump = list(ipr.get_addr())
        fdb_dump = []

        def fdb():
            if not fdb_dump:
                fdb_dump.append(list(ipr.fdb("dump")))
            return fdb_dump[0]

        interest = set(names)
        for d in desired.values():
            interest.update(n for n in (d.uplink, d.segment and d.segment.name, d.segment and d.segment.parent) if n)
        result = []
        for name in names:
            msg = by_name.get(name)
            if msg is None or _kind(msg) != "bridge":
                continue
            d = desired.get(name)
            ports = [m for m in links.values() if m.get_attr("IFLA_MASTER") == msg["index"]]
            port_names = [p.get_attr("IFLA_IFNAME") for p in ports]
            uplink = None
            if d is not None and d.uplink in port_names:
                uplink = d.uplink
            else:
                # the bridge MAC is pinned to its uplink's: that finds a previous uplink
                # among VM ports, whatever its kind
                mac = msg.get_attr("IFLA_ADDRESS")
                for rule in (
                    lambda p: _kind(p) in SEGMENT_KINDS,
                    lambda p, mac=mac: p.get_attr("IFLA_ADDRESS") == mac,
                    lambda p: p.get_attr("IFLA_IFNAME") in interest,
                    lambda p: _kind(p) is None,
                ):
                    match = [p for p in ports if rule(p)]
                    if match:
                        uplink = match[0].get_attr("IFLA_IFNAME")
                        break
            interest.update(port_names if uplink is None else [uplink])
            up_msg = by_name.get(d.uplink if d is not None and d.uplink else uplink)
            segment = None
            if uplink is not None and _kind(by_name[uplink]) in SEGMENT_KINDS:
                segment = _read_segment(ipr, by_name[uplink], links, d.segment if d else None, fdb)
            parent_mtu = None
            if d is not None and d.segment is not None and d.segment.parent in by_name:
                parent_mtu = by_name[d.segment.parent].get_attr("IFLA_MTU")
            data = _info_data(msg)
            result.append(
                Observed(
                    name=name,
                    network=d.network if d is not None else "",
                    uplink=uplink,
                    segment=segment,
                    mtu=msg.get_attr("IFLA_MTU"),
                    addresses=tuple(
                        a
                        for a in _addresses(ipr, msg["index"], addr_dump)
                        if a not in kept.get(name, ()) and a not in fips
                    ),
                    up=_up(msg),
                    stp_state=data.get_attr("IFLA_BR_STP_STATE") if data else 0,
                    forward_delay=data.get_attr("IFLA_BR_FORWARD_DELAY") if data else 0,
                    mac=msg.get_attr("IFLA_ADDRESS"),
                    # the desired shape holds a MAC only where one is pinned (shared gateway)
                    shared_mac=msg.get_attr("IFLA_ADDRESS") if d is not None and d.shared_mac else None,
                    uplink_mac=up_msg.get_attr("IFLA_ADDRESS") if up_msg is not None else None,
                    uplink_mtu=up_msg.get_attr("IFLA_MTU") if up_msg is not None else None,
                    uplink_up=_up(up_msg) if up_msg is not None else True,
                    uplink_holds_v4=bool(
                        up_msg is not None
                        and up_msg.get_attr("IFLA_MASTER") == msg["index"]
                        and any(
                            a["index"] == up_msg["index"] and a["family"] == socket.AF_INET and a["scope"] == 0
                            for a in addr_dump
                        )
                    ),
                    segment_up=_up(by_name[uplink]) if segment is not None else True,
                    parent_mtu=parent_mtu,
                    ports=tuple(port_names),
                )
            )
        present = {n for n in interest if n in by_name}
    return Snapshot(result, present)


def local_addresses(ipr=None):
    """This host's own IPv4 addresses (every link of this network namespace)."""
    with _ipr(ipr) as ipr:
        return {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(family=socket.AF_INET)}


def addresses_by_link(ipr=None):
    """{ifname: ["ip/prefixlen", ...]}: every IPv4 address of this host, by link."""
    with _ipr(ipr) as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        out = {}
        for a in ipr.get_addr(family=socket.AF_INET):
            out.setdefault(names.get(a["index"]), []).append(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}")
        return out


def link_names(ipr=None):
    """The names of this host's links (this network namespace), sorted."""
    with _ipr(ipr) as ipr:
        return sorted(link.get_attr("IFLA_IFNAME") for link in ipr.get_links())


def drop_local_remotes(bridges, local):
    """``bridges`` with every VXLAN segment's ``remotes`` minus ``local`` (this host's own
    addresses). A pillar lists every VTEP of a segment, this host included; a head-end
    replication entry pointing at the host itself loops its own floods back into its
    bridge, which then learns its local VMs' MACs on the VXLAN port and stops
    delivering to them. Pure."""
    local = set(local)
    out = []
    for br in bridges:
        seg = br.segment
        if seg is not None and seg.kind == "vxlan" and local & set(seg.remotes):
            seg = dataclasses.replace(seg, remotes=tuple(r for r in seg.remotes if r not in local))
            br = dataclasses.replace(br, segment=seg)
        out.append(br)
    return tuple(out)


def link_exists(name, ipr=None):
    """True if a link called ``name`` exists in this network namespace."""
    with _ipr(ipr) as ipr:
        return _index(ipr, name) is not None


def addresses(name, ipr=None):
    """The addresses of link ``name`` as "ip/prefixlen", primary first ([] if no such link)."""
    with _ipr(ipr) as ipr:
        index = _index(ipr, name)
        return [] if index is None else _addresses(ipr, index)


# --------------------------------------------------------------------------- apply


class LinkError(RuntimeError):
    pass


def _errno(exc):
    return getattr(exc, "code", None)


def _need(ipr, name):
    index = _index(ipr, name)
    if index is None:
        raise LinkError(f"no link {name}")
    return index


def link_request(change, index_of):
    """The keyword arguments of ``IPRoute.link("add", ...)`` for a ``create`` Change.

    ``index_of(name)`` returns an interface index (the VLAN parent / VXLAN underlay).
    Kept separate so that the exact request for kinds this kernel may lack (802.1Q) is
    unit-testable.
    """
    d = change.detail
    kind = d["kind"]
    if kind == "bridge":
        return dict(ifname=change.target, kind="bridge", br_stp_state=0, br_forward_delay=0, mtu=d.get("mtu", 1500))
    if kind == "vlan":
        return dict(
            ifname=change.target, kind="vlan", vlan_id=int(d["vlan_id"]), link=index_of(d["parent"]), mtu=int(d["mtu"])
        )
    if kind == "vxlan":
        req = dict(
            ifname=change.target,
            kind="vxlan",
            vxlan_id=int(d["vni"]),
            vxlan_link=index_of(d["parent"]),
            vxlan_port=int(d.get("port") or 4789),
            vxlan_learning=1 if d.get("learning", VXLAN_LEARNING) else 0,
            mtu=int(d["mtu"]),
        )
        if d.get("group"):
            if ipaddress.ip_address(d["group"]).version == 6:
                req["vxlan_group6"] = d["group"]
            else:
                req["vxlan_group"] = d["group"]
        return req
    raise LinkError(f"hanet does not create links of kind {kind!r}")


def broadcast_of(address):
    """The broadcast address a bound ``address`` ("ip/prefixlen") gets, or None (/31, /32)."""
    return _broadcast(address)


def _broadcast(address):
    iface = ipaddress.ip_interface(address)
    if iface.version == 4 and iface.network.prefixlen < 31:
        return str(iface.network.broadcast_address)
    return None


RTPROT_KERNEL = 2  # routes the kernel makes for an address (its prefix): they follow it
RTNH_F_ONLINK = 4


def _v4_addresses(ipr, index):
    """(address/prefixlen, broadcast) of the IPv4 addresses of global scope on ``index``,
    primary first."""
    out = []
    for msg in ipr.get_addr(family=socket.AF_INET, index=index):
        if msg["index"] == index and msg["scope"] == 0:
            addr = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            out.append((f"{addr}/{msg['prefixlen']}", msg.get_attr("IFA_BROADCAST")))
    return out


def _routes_via(ipr, index):
    """The IPv4 routes out of ``index`` that are not the kernel's own prefix routes (the
    host's default route, its static routes), in every table, as ``route`` arguments."""
    out = []
    for msg in ipr.get_routes(family=socket.AF_INET):  # every table
        if msg.get_attr("RTA_OIF") != index or msg["proto"] == RTPROT_KERNEL or msg.get_attr("RTA_MULTIPATH"):
            continue
        table = msg.get_attr("RTA_TABLE") or msg["table"]
        if table == 255:  # local: the kernel's
            continue
        args = dict(
            dst=f"{msg.get_attr('RTA_DST') or '0.0.0.0'}/{msg['dst_len']}",
            table=table,
            proto=msg["proto"],
            scope=msg["scope"],
            type=msg["type"],
            tos=msg["tos"],
            flags=msg["flags"] & RTNH_F_ONLINK,  # "onlink": a gateway outside every prefix
        )
        for attr, key in (("RTA_GATEWAY", "gateway"), ("RTA_PRIORITY", "priority"), ("RTA_PREFSRC", "prefsrc")):
            if msg.get_attr(attr) is not None:
                args[key] = msg.get_attr(attr)
        out.append(args)
    return out


def carry(ipr, src, dst, carried, back=False):
    """Move the host's own IPv4 addresses and routes from link ``src`` to link ``dst``, as
    nova-network did when it enslaved an uplink that carried them (a host with one NIC
    for management, public traffic and the VMs' bridge). ``back``: from the bridge
    ``src`` to its former uplink ``dst``, the addresses recorded in ``carried`` only.

    The order never leaves the host without its routes: the addresses are added to
    ``dst`` first, then each route is replaced by the same route out of ``dst`` (one
    netlink request each, atomic in the kernel), then the addresses leave ``src``.
    ``carried`` (the Managed facet ``carried``) records "<bridge> <port> <address>".
    Returns the addresses moved."""
    from pyroute2.netlink.exceptions import NetlinkError

    s, d = _need(ipr, src), _need(ipr, dst)
    bridge, port = (src, dst) if back else (dst, src)
    mine = {e.split(" ")[2] for e in carried if e.split(" ")[:2] == [bridge, port]}
    addrs = [(a, brd) for a, brd in _v4_addresses(ipr, s) if (a in mine) == back]
    if not addrs:
        return []
    routes = _routes_via(ipr, s)
    if not _up(ipr.get_links(d)[0]):
        ipr.link("set", index=d, state="up")  # a route out of a link that is down is dead
    added, replaced = [], []
    try:
        for addr, brd in addrs:
            iface = ipaddress.ip_interface(addr)
            kwargs = dict(index=d, address=str(iface.ip), prefixlen=iface.network.prefixlen)
            if brd:
                kwargs["broadcast"] = brd
            try:
                ipr.addr("add", **kwargs)
                added.append(kwargs)
            except NetlinkError as exc:
                if _errno(exc) != errno.EEXIST:
                    raise
        for route in routes:
            ipr.route("replace", oif=d, **route)
            replaced.append(route)
    except Exception:
        # put back what was moved: the host keeps its addresses and routes where they were
        for route in replaced:
            try:
                ipr.route("replace", oif=s, **route)
            except NetlinkError:
                pass
        for kwargs in added:
            try:
                ipr.addr("del", **{k: v for k, v in kwargs.items() if k != "broadcast"})
            except NetlinkError:
                pass
        raise
    for addr, _brd in addrs:
        iface = ipaddress.ip_interface(addr)
        try:
            ipr.addr("del", index=s, address=str(iface.ip), prefixlen=iface.network.prefixlen)
        except NetlinkError as exc:
            if _errno(exc) not in (errno.EADDRNOTAVAIL, errno.ENOENT):
                raise
        entry = f"{bridge} {port} {addr}"
        if back:
            carried.discard(entry)
        else:
            carried.add(entry)
    return [a for a, _ in addrs]


def _do(ipr, change, made, carried):
    """Execute one change; return its description (None: nothing to do)."""
    from pyroute2.netlink.exceptions import NetlinkError

    d = change.detail
    action, target = change.action, change.target
    if action == "create":
        index = _index(ipr, target)
        if index is not None:
            existing = _kind(ipr.get_links(index)[0])
            if existing != d["kind"]:
                raise LinkError(f"{target} exists as a {existing or 'physical'} link, not a {d['kind']}")
            if d["kind"] == "bridge":
                return None  # already there (and not ours: leave it out of the record)
            ipr.link("del", index=index)  # a stale segment link: build it afresh
        ipr.link("add", **link_request(change, lambda n: _need(ipr, n)))
        made.add(target)
        index = _need(ipr, target)
        if d["kind"] != "bridge":
            ipr.link("set", index=index, state="up")
        what = {
            "bridge": "bridge",
            "vlan": f"VLAN {d.get('vlan_id')} on {d.get('parent')}",
            "vxlan": f"VXLAN {d.get('vni')} on {d.get('parent')}",
        }[d["kind"]]
        return f"created {what} {target}" if d["kind"] == "bridge" else f"created {target} ({what})"
    if action == "forget":
        made.discard(target)
        return None
    if action == "delete":
        index = _index(ipr, target)
        made.discard(target)
        if index is None:
            return None
        kind = _kind(ipr.get_links(index)[0])
        if kind not in OWN_KINDS:
            return None  # not a kind hanet creates (a physical uplink): never deleted
        for entry in sorted(carried):  # the host's own addresses go back to its uplink first
            bridge, port, _address = entry.split(" ")
            if bridge == target and _index(ipr, port) is not None:
                carry(ipr, target, port, carried, back=True)
        try:
            ipr.link("del", index=index)
        except NetlinkError as exc:
            if _errno(exc) != errno.ENODEV:
                raise
        return f"deleted {kind} {target}"
    if action == "enslave":
        port, master = _need(ipr, target), _need(ipr, d["master"])
        if ipr.get_links(port)[0].get_attr("IFLA_MASTER") == master:
            moved = carry(ipr, target, d["master"], carried)  # what an earlier move left
            return f"moved {', '.join(moved)} from {target} onto {d['master']}" if moved else None
        ipr.link("set", index=port, master=master)
        moved = carry(ipr, target, d["master"], carried)
        return f"enslaved {target} to {d['master']}" + (f" (moved onto it: {', '.join(moved)})" if moved else "")
    if action == "release":
        port, master = _index(ipr, target), _index(ipr, d["master"])
        if port is None or master is None or ipr.get_links(port)[0].get_attr("IFLA_MASTER") != master:
            return None
        moved = carry(ipr, d["master"], target, carried, back=True)
        ipr.link("set", index=port, master=0)
        return f"released {target} from {d['master']}" + (f" (moved back: {', '.join(moved)})" if moved else "")
    if action == "set":
        index = _need(ipr, target)
        msg = ipr.get_links(index)[0]
        done = []
        kwargs = {}
        if "mtu_min" in d and msg.get_attr("IFLA_MTU") < d["mtu_min"]:
            kwargs["mtu"] = d["mtu_min"]
        if "mtu" in d and msg.get_attr("IFLA_MTU") != d["mtu"]:
            kwargs["mtu"] = d["mtu"]
        if kwargs:
            ipr.link("set", index=index, **kwargs)
            done.append(f"mtu {kwargs['mtu']}")
        if "stp_state" in d or "forward_delay" in d:
            # STP first: with STP on, the kernel refuses a forward delay below 2s (ERANGE)
            ipr.link("set", index=index, kind="bridge", br_stp_state=d.get("stp_state", 0))
            ipr.link("set", index=index, kind="bridge", br_forward_delay=d.get("forward_delay", 0))
            done.append(f"stp {d.get('stp_state', 0)}, forward delay {d.get('forward_delay', 0)}")
        if d.get("address_of"):
            mac = ipr.get_links(_need(ipr, d["address_of"]))[0].get_attr("IFLA_ADDRESS")
            # set it even when it is equal already: an explicitly set bridge MAC is
            # what keeps the kernel from changing it when a lower-MAC port joins
            ipr.link("set", index=index, address=mac)
            done.append(f"MAC {mac} (of {d['address_of']}) pinned")
        if d.get("address"):
            ipr.link("set", index=index, address=d["address"])
            done.append(f"MAC {d['address']} (the shared gateway's) pinned")
        if d.get("state") == "up" and not _up(msg):
            ipr.link("set", index=index, state="up")
            done.append("up")
        return f"set {target}: " + ", ".join(done) if done else None
    if action in ("add", "remove") and "address" in d:
        index = _need(ipr, d["link"]) if action == "add" else _index(ipr, d["link"])
        if index is None:
            return None
        iface = ipaddress.ip_interface(d["address"])
        kwargs = dict(index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen)
        try:
            if action == "add":
                brd = _broadcast(d["address"])
                ipr.addr("add", broadcast=brd, **kwargs) if brd else ipr.addr("add", **kwargs)
                return f"added {d['address']} to {d['link']}"
            ipr.addr("del", **kwargs)
            return f"removed {d['address']} from {d['link']}"
        except NetlinkError as exc:
            if _errno(exc) in (errno.EEXIST, errno.EADDRNOTAVAIL, errno.ENOENT):
                return None
            raise
    if action in ("add", "remove") and "remote" in d:
        index = _need(ipr, d["link"]) if action == "add" else _index(ipr, d["link"])
        if index is None:
            return None
        try:
            if action == "add":
                ipr.fdb("append", ifindex=index, lladdr=ZERO_MAC, dst=d["remote"])
                return f"added VXLAN remote {d['remote']} to {d['link']}"
            ipr.fdb("del", ifindex=index, lladdr=ZERO_MAC, dst=d["remote"])
            return f"removed VXLAN remote {d['remote']} from {d['link']}"
        except NetlinkError as exc:
            if _errno(exc) in (errno.EEXIST, errno.ENOENT):
                return None
            raise
    raise LinkError(f"unknown links change: {change}")


def apply(changes, managed=None, ipr=None):
    """Execute ``changes`` (from ``plan``) in this network namespace, in order.

    Records the links created / deleted in ``managed`` (a ``common.Managed``; facet
    ``links``), also when a step fails half way. Returns human-readable descriptions of
    what was actually done (steps that found the host already right are left out).
    """
    made = managed.get(FACET) if managed is not None else set()
    carried = managed.get(CARRIED) if managed is not None else set()
    before, carried_before = set(made), set(carried)
    done = []
    try:
        with _ipr(ipr) as ipr:
            for change in changes:
                if change.facet != FACET:
                    continue
                try:
                    text = _do(ipr, change, made, carried)
                except LinkError:
                    raise
                except Exception as exc:  # NetlinkError, OSError: say which step failed
                    raise LinkError(f"{change}: {exc}") from exc
                if text:
                    done.append(text)
    finally:
        if managed is not None and made != before:
            managed.set(FACET, made)
        if managed is not None and carried != carried_before:
            managed.set(CARRIED, carried)
    return done
