"""links: the pure planner (unit + property tests against a model of the kernel), the
exact VLAN netlink request, and end-to-end runs in throw-away network namespaces."""

import errno
import ipaddress
import itertools
import os
import secrets

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _hanet import links
from _hanet.common import Change, Managed, Paths
from _hanet.desired import Bridge, Segment
from _hanet.links import Observed, Snapshot, plan

# --------------------------------------------------------------------------- helpers


def flat(name="br100", uplink="eth1", addresses=("192.168.0.3/24",), mtu=1500):
    return Bridge(name=name, network="private", uplink=uplink, mtu=mtu, addresses=tuple(addresses))


def vxlan(vni=5102, parent="eth2", group=None, remotes=(), port=4789, mtu=1500):
    return Segment(
        kind="vxlan", name=f"vx{vni}", parent=parent, vni=vni, group=group, remotes=tuple(remotes), port=port, mtu=mtu
    )


def vlan(vid=101, parent="eth2", mtu=1500):
    return Segment(kind="vlan", name=f"vlan{vid}", parent=parent, vlan_id=vid, mtu=mtu)


def segmented(seg, name="br103", addresses=("172.16.102.4/24",), mtu=1500):
    return Bridge(name=name, network="blue", uplink=seg.name, segment=seg, mtu=mtu, addresses=tuple(addresses))


def steps(changes):
    return [str(c) for c in changes]


# --------------------------------------------------------------------------- plan: unit


def test_fresh_flat_bridge_plan_in_order():
    d = flat(addresses=("192.168.0.3/24", "192.168.0.1/24"))
    changes = plan((d,), (), set())
    assert steps(changes) == [
        "create br100",
        "enslave eth1",
        "set eth1",
        "set br100",
        "add br100 192.168.0.3/24",
        "add br100 192.168.0.1/24",
    ]
    assert changes[0].detail == {"kind": "bridge", "mtu": 1500}
    assert changes[1].detail == {"master": "br100"}
    assert changes[2].detail == {"mtu_min": 1500, "state": "up"}
    assert changes[3].detail == {"mtu": 1500, "address_of": "eth1", "state": "up"}
    assert all(c.facet == "links" for c in changes)


def test_a_shared_gateway_mac_is_pinned_on_the_bridge_and_kept():
    """share_dhcp_address: the bridge carries the network's shared MAC, not the uplink's;
    pinned when the bridge is made and again when it drifted, not otherwise."""
    d = Bridge(name="br100", network="private", uplink="eth1", addresses=("192.168.0.1/24",), shared_mac=SHARED)
    changes = plan((d,), (), set())
    sets = [c for c in changes if c.action == "set" and c.target == "br100"]
    assert sets[0].detail == {"mtu": 1500, "address": SHARED, "state": "up"}
    kept = Observed(**{**_as_dict(d), "mac": SHARED, "uplink_mac": "52:54:00:00:00:01"})
    assert plan((d,), Snapshot((kept,), {"br100", "eth1"}), set()) == []
    drifted = Observed(**{**_as_dict(d), "shared_mac": "52:54:00:00:00:01", "mac": "52:54:00:00:00:01"})
    again = plan((d,), Snapshot((drifted,), {"br100", "eth1"}), set())
    assert [(c.target, c.detail) for c in again] == [("br100", {"address": SHARED})]
    # without it, the bridge goes back to the uplink's MAC
    plain = flat(addresses=("192.168.0.1/24",))
    was_shared = Observed(**{**_as_dict(plain), "mac": SHARED, "uplink_mac": "52:54:00:00:00:01"})
    back = plan((plain,), Snapshot((was_shared,), {"br100", "eth1"}), set())
    assert [(c.target, c.detail) for c in back] == [("br100", {"address_of": "eth1"})]


SHARED = "02:5a:11:22:33:44"


def _as_dict(bridge):
    import dataclasses

    return {f.name: getattr(bridge, f.name) for f in dataclasses.fields(Bridge)}


def test_converged_plan_is_empty():
    d = (
        flat(),
        segmented(vxlan(remotes=("10.0.0.2", "10.0.0.3")), name="br103"),
        segmented(vlan(), name="br101", addresses=()),
    )
    managed = {"br100", "br103", "vx5102", "br101", "vlan101"}
    assert plan(d, d, managed) == []
    assert plan(d, d, set()) == []


def test_observed_compares_as_bridge():
    d = flat()
    o = Observed(
        **{f: getattr(d, f) for f in ("name", "network", "uplink", "segment", "mtu", "addresses")},
        mac="aa:bb:cc:dd:ee:ff",
        uplink_mac="aa:bb:cc:dd:ee:ff",
    )
    assert o == d and d == o and hash(o) == hash(d)
    assert o.as_bridge() == d and type(o.as_bridge()) is Bridge
    assert plan((d,), (o,), {"br100"}) == []


def test_observed_drift_is_fixed():
    d = flat()
    o = Observed(
        name="br100",
        network="private",
        uplink="eth1",
        mtu=1500,
        addresses=d.addresses,
        up=False,
        stp_state=1,
        forward_delay=1500,
        mac="02:00:00:00:00:01",
        uplink_mac="02:00:00:00:00:02",
        uplink_mtu=1400,
        uplink_up=False,
    )
    changes = plan((d,), (o,), {"br100"})
    assert steps(changes) == ["set eth1", "set br100"]
    assert changes[0].detail == {"mtu_min": 1500, "state": "up"}
    assert changes[1].detail == {"stp_state": 0, "forward_delay": 0, "mtu": 1500, "address_of": "eth1", "state": "up"}


def test_mtu_change_only_sets_mtu():
    cur = flat()
    changes = plan((flat(mtu=9000),), (cur,), {"br100"})
    assert steps(changes) == ["set br100"] and changes[0].detail == {"mtu": 9000}
    obs = Observed(name="br100", network="private", uplink="eth1", mtu=1500, addresses=cur.addresses, uplink_mtu=1500)
    changes = plan((flat(mtu=9000),), (obs,), {"br100"})
    assert steps(changes) == ["set eth1", "set br100"]
    assert changes[0].detail == {"mtu_min": 9000}


def test_address_change_is_only_that_change():
    cur = flat(addresses=("192.168.0.3/24", "192.168.0.1/24"))
    new = flat(addresses=("192.168.0.3/24", "192.168.0.2/24"))
    changes = plan((new,), (cur,), {"br100"})
    assert steps(changes) == ["remove br100 192.168.0.1/24", "add br100 192.168.0.2/24"]
    assert changes[1].detail == {"link": "br100", "address": "192.168.0.2/24"}


def test_extra_addresses_are_removed():
    cur = flat(addresses=("192.168.0.3/24", "10.9.9.9/8", "192.168.0.1/24"))
    assert steps(plan((flat(),), (cur,), set())) == ["remove br100 192.168.0.1/24", "remove br100 10.9.9.9/8"]


def test_wrong_primary_is_fixed():
    cur = flat(addresses=("192.168.0.1/24", "192.168.0.3/24"))
    new = flat(addresses=("192.168.0.3/24", "192.168.0.1/24"))
    assert steps(plan((new,), (cur,), {"br100"})) == [
        "remove br100 192.168.0.3/24",
        "remove br100 192.168.0.1/24",
        "add br100 192.168.0.3/24",
        "add br100 192.168.0.1/24",
    ]


def test_removing_a_primary_re_adds_its_kept_secondaries():
    cur = flat(addresses=("10.0.0.1/24", "10.1.0.1/16", "10.1.0.2/16"))
    new = flat(addresses=("10.0.0.1/24", "10.1.0.2/16"))
    assert steps(plan((new,), (cur,), set())) == ["remove br100 10.1.0.1/16", "add br100 10.1.0.2/16"]


def test_delete_what_hanet_made_and_only_that():
    ours = segmented(vxlan(group="239.1.1.102"), name="br103")
    theirs = flat(name="br0", uplink="eth0")
    changes = plan((), (ours, theirs), {"br103", "vx5102"})
    assert steps(changes) == ["delete br103", "delete vx5102"]
    assert changes[0].detail["kind"] == "bridge" and changes[1].detail["kind"] == "vxlan"


def test_never_deletes_a_desired_uplink_or_parent():
    d = segmented(vlan(parent="eth2"), name="br101")
    changes = plan((d, flat()), (d, flat()), {"eth1", "eth2", "br101", "vlan101", "br100"})
    assert steps(changes) == ["forget eth1", "forget eth2"]  # only the record is fixed


def test_managed_name_already_gone_is_not_planned_when_presence_known():
    snap = Snapshot((), present=())
    assert steps(plan((), snap, {"vx5102"})) == ["forget vx5102"]
    assert steps(plan((), (), {"vx5102"})) == ["delete vx5102"]


def test_fresh_vxlan_with_remotes():
    seg = vxlan(remotes=("10.0.0.2", "10.0.0.3"), port=4790)
    changes = plan((segmented(seg),), (), set())
    assert steps(changes) == [
        "set eth2",
        "create vx5102",
        "add vx5102 remote 10.0.0.2",
        "add vx5102 remote 10.0.0.3",
        "create br103",
        "enslave vx5102",
        "set br103",
        "add br103 172.16.102.4/24",
    ]
    assert changes[0].detail == {"mtu_min": 1550}
    create = changes[1].detail
    assert (
        create["kind"],
        create["vni"],
        create["parent"],
        create["port"],
        create["mtu"],
        create["group"],
        create["remotes"],
    ) == ("vxlan", 5102, "eth2", 4790, 1500, None, ["10.0.0.2", "10.0.0.3"])
    assert changes[2].detail == {"link": "vx5102", "remote": "10.0.0.2"}
    assert changes[6].detail == {"mtu": 1500, "address_of": "vx5102", "state": "up"}


def test_vxlan_remotes_change_only_touches_fdb():
    cur = segmented(vxlan(remotes=("10.0.0.2", "10.0.0.3")))
    new = segmented(vxlan(remotes=("10.0.0.3", "10.0.0.4")))
    assert steps(plan((new,), (cur,), {"br103", "vx5102"})) == [
        "add vx5102 remote 10.0.0.4",
        "remove vx5102 remote 10.0.0.2",
    ]


def test_vxlan_group_change_recreates_the_link():
    cur = segmented(vxlan(group="239.1.1.1"))
    new = segmented(vxlan(group="239.1.1.2"))
    assert steps(plan((new,), (cur,), {"br103", "vx5102"})) == [
        "set eth2",
        "delete vx5102",
        "create vx5102",
        "enslave vx5102",
        "set br103",
    ]


def test_vxlan_ipv6_underlay_overhead():
    assert links.parent_mtu_needed(vxlan(remotes=("fd00::2",))) == 1570
    assert links.parent_mtu_needed(vlan(mtu=1500)) == 1500


def test_fresh_vlan():
    changes = plan((segmented(vlan(), name="br101"),), (), set())
    assert steps(changes) == [
        "set eth2",
        "create vlan101",
        "create br101",
        "enslave vlan101",
        "set br101",
        "add br101 172.16.102.4/24",
    ]
    assert changes[1].detail["vlan_id"] == 101 and changes[1].detail["kind"] == "vlan"


def test_segment_renamed_deletes_old_managed_segment_first():
    cur = segmented(vxlan(vni=5102), name="br103")
    new = segmented(vxlan(vni=5103), name="br103")
    changes = plan((new,), (cur,), {"br103", "vx5102"})
    assert steps(changes)[0] == "delete vx5102"
    assert "create vx5103" in steps(changes) and "enslave vx5103" in steps(changes)
    assert not any(c.action == "release" for c in changes)


def test_uplink_change_releases_the_old_one():
    changes = plan((flat(uplink="eth3"),), (flat(uplink="eth1"),), {"br100"})
    assert steps(changes)[:2] == ["release eth1", "enslave eth3"]
    # ...unless another desired bridge takes it
    changes = plan((flat(uplink="eth3"), flat(name="br200", uplink="eth1")), (flat(uplink="eth1"),), {"br100"})
    assert "release eth1" not in steps(changes)


def test_host_only_bridge():
    d = Bridge(name="br9", network="x", uplink=None, addresses=("10.0.0.1/24",))
    assert steps(plan((d,), (), set())) == ["create br9", "set br9", "add br9 10.0.0.1/24"]
    assert plan((d,), (d,), {"br9"}) == []


# --------------------------------------------------------------------------- plan: property


class KernelModel:
    """Just enough of the kernel's behaviour to check plans: bridge MTU auto-adjust,
    VXLAN MTU clamp, VLAN MTU limit, primary/secondary addresses, FDB remotes."""

    _macs = itertools.count(1)

    def __init__(self, physical):
        self.links = {}
        for name in physical:
            self._new(name, None, 1500)

    def _new(self, name, kind, mtu, mac=None, **extra):
        link = dict(
            kind=kind,
            master=None,
            mtu=mtu,
            up=False,
            mtu_user=False,
            stp=0,
            fd=0,
            mac=mac or "02:00:00:00:%02x:%02x" % divmod(next(self._macs) % 65536, 256),
            addrs=[],
            seg=None,
            remotes=[],
        )
        link.update(extra)
        self.links[name] = link
        return link

    def _delete(self, name):
        for other in self.links.values():
            if other["master"] == name:
                other["master"] = None
        del self.links[name]

    def _auto_mtu(self, bridge):
        br = self.links[bridge]
        ports = [l["mtu"] for l in self.links.values() if l["master"] == bridge]
        if not br["mtu_user"]:
            br["mtu"] = min(ports) if ports else 1500

    def _max_mtu(self, link):
        seg = link["seg"]
        if seg is None:
            return 65535
        parent = self.links[seg["parent"]]["mtu"]
        return parent - 50 if seg["kind"] == "vxlan" else parent

    def apply(self, changes, made):
        for change in changes:
            self.do(change, made)

    def do(self, ch, made):
        d, t = ch.detail, ch.target
        if ch.action == "create":
            if t in self.links:
                assert self.links[t]["kind"] == d["kind"], "create over a different link kind"
                if d["kind"] == "bridge":
                    return
                self._delete(t)
            if d["kind"] == "bridge":
                self._new(t, "bridge", d["mtu"])
            else:
                parent = self.links[d["parent"]]
                seg = {k: d[k] for k in ("kind", "parent", "vlan_id", "vni", "group", "port")}
                if d["kind"] == "vlan":
                    assert d["mtu"] <= parent["mtu"], "EINVAL: vlan mtu above its parent's"
                    self._new(t, "vlan", d["mtu"], mac=parent["mac"], seg=seg, up=True)
                else:
                    self._new(t, "vxlan", min(d["mtu"], parent["mtu"] - 50), seg=seg, up=True)
            made.add(t)
        elif ch.action == "forget":
            made.discard(t)
        elif ch.action == "delete":
            made.discard(t)
            if t in self.links and self.links[t]["kind"] in links.OWN_KINDS:
                self._delete(t)
        elif ch.action == "enslave":
            assert self.links[d["master"]]["kind"] == "bridge"
            self.links[t]["master"] = d["master"]
            self._auto_mtu(d["master"])
        elif ch.action == "release":
            if t in self.links and self.links[t]["master"] == d["master"]:
                self.links[t]["master"] = None
                self._auto_mtu(d["master"])
        elif ch.action == "set":
            link = self.links[t]
            mtu = None
            if "mtu_min" in d and link["mtu"] < d["mtu_min"]:
                mtu = d["mtu_min"]
            if "mtu" in d and link["mtu"] != d["mtu"]:
                mtu = d["mtu"]
            if mtu is not None:
                assert mtu <= self._max_mtu(link), f"EINVAL: mtu {mtu} on {t}"
                link["mtu"] = mtu
                if link["kind"] == "bridge":
                    link["mtu_user"] = True
                elif link["master"]:
                    self._auto_mtu(link["master"])
            if "stp_state" in d:
                link["stp"], link["fd"] = d["stp_state"], d["forward_delay"]
            if d.get("address_of"):
                link["mac"] = self.links[d["address_of"]]["mac"]
            if d.get("address"):
                link["mac"] = d["address"]
            if d.get("state") == "up":
                link["up"] = True
        elif "address" in d:
            addrs = self.links[d["link"]]["addrs"] if d["link"] in self.links else None
            if addrs is None:
                assert ch.action == "remove"
                return
            net = ipaddress.ip_interface(d["address"]).network
            same = [a for a, _ in addrs if ipaddress.ip_interface(a).network == net]
            if ch.action == "add":
                if d["address"] in [a for a, _ in addrs]:
                    return
                if same:
                    addrs.append((d["address"], True))
                else:
                    last = max([i for i, (_, sec) in enumerate(addrs) if not sec], default=-1)
                    addrs.insert(last + 1, (d["address"], False))
            else:
                entry = [e for e in addrs if e[0] == d["address"]]
                if not entry:
                    return
                addrs.remove(entry[0])
                if not entry[0][1]:  # a primary takes its secondaries with it
                    addrs[:] = [e for e in addrs if not (e[1] and ipaddress.ip_interface(e[0]).network == net)]
        elif "remote" in d:
            remotes = self.links[d["link"]]["remotes"]
            if ch.action == "add" and d["remote"] not in remotes:
                remotes.append(d["remote"])
            elif ch.action == "remove" and d["remote"] in remotes:
                remotes.remove(d["remote"])
        else:
            raise AssertionError(f"unknown change {ch}")

    def read(self, desired, managed):
        dmap = {b.name: b for b in desired}
        names = list(dmap) + sorted(set(managed) - set(dmap))
        interest = set(names)
        for b in desired:
            interest.update(n for n in (b.uplink, b.segment and b.segment.name, b.segment and b.segment.parent) if n)
        out = []
        for name in names:
            br = self.links.get(name)
            if br is None or br["kind"] != "bridge":
                continue
            d = dmap.get(name)
            ports = [n for n, l in self.links.items() if l["master"] == name]
            if d is not None and d.uplink in ports:
                uplink = d.uplink
            else:
                uplink = next(
                    itertools.chain(
                        (p for p in ports if self.links[p]["kind"] in links.SEGMENT_KINDS),
                        (p for p in ports if self.links[p]["mac"] == br["mac"]),
                        (p for p in ports if p in interest),
                        (p for p in ports if self.links[p]["kind"] is None),
                        [None],
                    )
                )
            segment = None
            if uplink and self.links[uplink]["seg"]:
                u = self.links[uplink]
                s = u["seg"]
                order = list(d.segment.remotes) if d is not None and d.segment else []
                remotes = sorted(u["remotes"], key=lambda r: (order.index(r) if r in order else 99, r))
                segment = Segment(
                    kind=s["kind"],
                    name=uplink,
                    parent=s["parent"],
                    vlan_id=s["vlan_id"],
                    vni=s["vni"],
                    group=s["group"],
                    remotes=tuple(remotes),
                    port=s["port"],
                    mtu=u["mtu"],
                )
            up = self.links.get(d.uplink if d is not None and d.uplink else uplink)
            parent = self.links.get(d.segment.parent) if d is not None and d.segment else None
            out.append(
                Observed(
                    name=name,
                    network=d.network if d else "",
                    uplink=uplink,
                    segment=segment,
                    mtu=br["mtu"],
                    addresses=tuple(a for a, _ in br["addrs"]),
                    up=br["up"],
                    stp_state=br["stp"],
                    forward_delay=br["fd"],
                    mac=br["mac"],
                    shared_mac=br["mac"] if d is not None and d.shared_mac else None,
                    uplink_mac=up["mac"] if up else None,
                    uplink_mtu=up["mtu"] if up else None,
                    uplink_up=up["up"] if up else True,
                    segment_up=self.links[uplink]["up"] if segment else True,
                    parent_mtu=parent["mtu"] if parent else None,
                    ports=tuple(ports),
                )
            )
        present = {n for n in interest | set(managed) if n in self.links}
        return Snapshot(out, present)

    def converge(self, desired, made):
        changes = plan(desired, self.read(desired, made), made)
        self.apply(changes, made)
        return changes


PHYS = ("eth1", "eth2", "eth3")
ADDRS = ("10.0.0.1/24", "10.0.0.2/24", "10.1.0.1/16", "10.1.0.2/16", "192.168.5.5/24")


@st.composite
def desired_states(draw):
    names = draw(st.lists(st.sampled_from(("br1", "br2", "br3")), unique=True, max_size=3))
    used, out = set(), []
    for name in names:
        mtu = draw(st.sampled_from((1400, 1500, 9000)))
        kind = draw(st.sampled_from(("none", "flat", "vlan", "vxlan")))
        uplink, seg = None, None
        if kind == "flat":
            free = [p for p in PHYS if p not in used]
            if free:
                uplink = draw(st.sampled_from(free))
        elif kind == "vlan":
            vid = draw(st.sampled_from((10, 11)))
            seg = vlan(vid, draw(st.sampled_from(PHYS)), mtu)
        elif kind == "vxlan":
            vni = draw(st.sampled_from((100, 101)))
            group = draw(st.sampled_from((None, "239.1.1.1", "239.1.1.2")))
            remotes = (
                ()
                if group
                else tuple(
                    draw(st.lists(st.sampled_from(("10.9.0.2", "10.9.0.3", "10.9.0.4")), unique=True, max_size=3))
                )
            )
            seg = vxlan(vni, draw(st.sampled_from(PHYS)), group, remotes, draw(st.sampled_from((4789, 4790))), mtu)
        if seg is not None:
            if seg.name in used:
                seg = None
            else:
                uplink = seg.name
        if uplink:
            used.add(uplink)
        addrs = draw(st.lists(st.sampled_from(ADDRS), unique=True, max_size=3))
        shared = draw(st.sampled_from((None, None, f"02:5a:00:00:00:{names.index(name):02x}")))
        out.append(
            Bridge(
                name=name,
                network=name,
                uplink=uplink,
                segment=seg,
                mtu=mtu,
                addresses=tuple(addrs),
                shared_mac=shared,
            )
        )
    return tuple(out)


perturbation = st.tuples(
    st.sampled_from(
        (
            "addr",
            "down",
            "stp",
            "mtu",
            "release",
            "remote",
            "uplink_mtu",
            "mac",
            "foreign_bridge",
            "bogus_managed",
            "drop_remote",
        )
    ),
    st.sampled_from(("br1", "br2", "br3")),
    st.sampled_from(ADDRS + ("10.9.0.7",)),
)


def perturb(model, made, kind, bridge, value):
    br = model.links.get(bridge)
    if kind == "foreign_bridge":
        if "br9" not in model.links:
            model._new("br9", "bridge", 1500, addrs=[("172.31.0.1/24", False)])
        return
    if kind == "bogus_managed":
        made.add(value.split(".")[0] == "10" and "eth3" or "nonexistent")
        return
    if br is None or br["kind"] != "bridge":
        return
    ports = [n for n, l in model.links.items() if l["master"] == bridge]
    if kind == "addr":
        model.do(Change("links", "add", "x", {"link": bridge, "address": value}), made)
    elif kind == "down":
        br["up"] = False
    elif kind == "stp":
        br["stp"], br["fd"] = 1, 1500
    elif kind == "mtu":
        br["mtu"] = 1280
    elif kind == "mac":
        br["mac"] = "02:ff:ff:ff:ff:ff"
    elif ports:
        port = model.links[ports[0]]
        if kind == "release":
            port["master"] = None
        elif kind == "uplink_mtu" and port["kind"] is None:
            port["mtu"] = 1280
        elif kind == "remote" and port["kind"] == "vxlan":
            remote = value.split("/")[0]
            if remote not in port["remotes"]:  # an FDB holds an entry once
                port["remotes"].append(remote)
        elif kind == "drop_remote" and port["remotes"]:
            port["remotes"].pop()


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(before=desired_states(), after=desired_states(), noise=st.lists(perturbation, max_size=4))
def test_property_plan_converges_on_the_kernel_model(before, after, noise):
    model = KernelModel(PHYS)
    made = set()
    model.converge(before, made)
    assert plan(before, model.read(before, made), made) == []
    for item in noise:
        perturb(model, made, *item)
    foreign = {n for n, l in model.links.items() if l["kind"] == "bridge" and n not in made}

    model.converge(after, made)

    # every physical link survives; foreign bridges not desired survive
    assert all(p in model.links for p in PHYS)
    assert all(n in model.links for n in foreign if n not in {b.name for b in after})
    # what hanet made and does not want is gone, and the record says so
    wanted = {b.name for b in after} | {b.segment.name for b in after if b.segment}
    assert made <= wanted
    for name, link in model.links.items():
        if link["kind"] in links.SEGMENT_KINDS:
            assert name in wanted
    got = {b.name: b for b in model.read(after, made)}
    for d in after:
        b = got[d.name]
        assert b.uplink == d.uplink and b.segment == d.segment and b.mtu == d.mtu
        assert set(b.addresses) == set(d.addresses)
        if d.addresses:
            assert b.addresses[0] == d.addresses[0]
        assert b.up and b.stp_state == 0 and b.forward_delay == 0
        if d.shared_mac:
            assert b.mac == d.shared_mac
        elif d.uplink:
            assert b.mac == model.links[d.uplink]["mac"]
        if d.uplink:
            assert model.links[d.uplink]["up"] and model.links[d.uplink]["mtu"] >= d.mtu
    # and a second plan has nothing to do
    assert plan(after, model.read(after, made), made) == []


@settings(max_examples=300, deadline=None)
@given(
    desired=desired_states(),
    current=desired_states(),
    managed=st.sets(st.sampled_from(("br1", "br2", "br3", "vlan10", "vx100", "eth1", "x"))),
)
def test_property_plan_never_crashes(desired, current, managed):
    changes = plan(desired, current, managed)
    assert all(isinstance(c, Change) and c.facet == "links" for c in changes)
    # a desired uplink or parent is never planned for deletion (the applier also refuses
    # to delete any link of a kind hanet does not create, see the model test)
    uplinks = {b.uplink for b in desired} | {b.segment.parent for b in desired if b.segment}
    assert not [c for c in changes if c.action == "delete" and c.target in uplinks & set(PHYS)]
    if desired == current:
        ours = {b.name for b in desired} | {b.segment.name for b in desired if b.segment}
        assert plan(desired, current, managed & ours) == []


# --------------------------------------------------------------------------- VLAN request


def _encode_link_add(kwargs):
    """Build and encode the RTM_NEWLINK message pyroute2 would send for these kwargs,
    then decode it back: the bytes on the wire, as the kernel would read them."""
    from pyroute2.iproute.linux import get_arguments_processor
    from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST
    from pyroute2.netlink.rtnl import RTM_NEWLINK
    from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

    proc = get_arguments_processor("link", "add", dict(kwargs))
    msg = ifinfmsg()
    for field in msg.fields:
        msg[field[0]] = proc.get_value(field[0], default=0, mode="field")
    for key, value in proc.items():
        nla = ifinfmsg.name2nla(key)
        if msg.valid_nla(nla) and value is not None:
            msg["attrs"].append([nla, value])
    msg["header"]["type"] = RTM_NEWLINK
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
    msg.encode()
    decoded = ifinfmsg(bytes(msg.data))
    decoded.decode()
    return decoded


def test_vlan_netlink_request():
    create = [
        c
        for c in plan((segmented(vlan(101, "eth2", 1500), name="br101"),), (), set())
        if c.action == "create" and c.target == "vlan101"
    ][0]
    req = links.link_request(create, {"eth2": 7}.__getitem__)
    assert req == dict(ifname="vlan101", kind="vlan", vlan_id=101, link=7, mtu=1500)
    msg = _encode_link_add(req)
    assert msg.get_attr("IFLA_IFNAME") == "vlan101"
    assert msg.get_attr("IFLA_LINK") == 7
    assert msg.get_attr("IFLA_MTU") == 1500
    info = msg.get_attr("IFLA_LINKINFO")
    assert info.get_attr("IFLA_INFO_KIND") == "vlan"
    assert info.get_attr("IFLA_INFO_DATA").get_attr("IFLA_VLAN_ID") == 101


def test_vxlan_netlink_request():
    seg = vxlan(5102, "eth2", group="239.1.1.102", port=4790, mtu=1450)
    create = [c for c in plan((segmented(seg),), (), set()) if c.target == "vx5102"][0]
    req = links.link_request(create, {"eth2": 3}.__getitem__)
    data = _encode_link_add(req).get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_DATA")
    assert (
        data.get_attr("IFLA_VXLAN_ID"),
        data.get_attr("IFLA_VXLAN_GROUP"),
        data.get_attr("IFLA_VXLAN_LINK"),
        data.get_attr("IFLA_VXLAN_PORT"),
        data.get_attr("IFLA_VXLAN_LEARNING"),
    ) == (5102, "239.1.1.102", 3, 4790, 1)


class _Msg(dict):
    def __init__(self, index, attrs, flags=0):
        super().__init__(index=index, flags=flags)
        self.attrs = attrs

    def get_attr(self, name):
        value = self.attrs.get(name)
        return _Msg(0, value) if isinstance(value, dict) else value


class RecordingIPRoute:
    """A fake IPRoute that records every request (for kinds this kernel lacks)."""

    def __init__(self, links_):
        self.calls = []
        self.table = {}
        for name, (kind, mtu) in links_.items():
            self._add(name, kind, mtu)

    def _add(self, name, kind, mtu):
        index = len(self.table) + 2
        self.table[name] = _Msg(
            index,
            {
                "IFLA_IFNAME": name,
                "IFLA_MTU": mtu,
                "IFLA_ADDRESS": "02:00:00:00:00:%02x" % index,
                "IFLA_LINKINFO": {"IFLA_INFO_KIND": kind} if kind else None,
            },
        )

    def _by_index(self, index):
        return [m for m in self.table.values() if m["index"] == index]

    def link_lookup(self, ifname):
        return [self.table[ifname]["index"]] if ifname in self.table else []

    def get_links(self, index):
        return self._by_index(index)

    def get_addr(self, **kw):
        return []  # no link carries an address: nothing to move onto a bridge

    def link(self, command, **kw):
        self.calls.append(("link", command, kw))
        if command == "add":
            self._add(kw["ifname"], kw["kind"], kw.get("mtu", 1500))
        elif command == "set":
            msg = self._by_index(kw["index"])[0]
            if "master" in kw:
                msg.attrs["IFLA_MASTER"] = kw["master"]
            if "mtu" in kw:
                msg.attrs["IFLA_MTU"] = kw["mtu"]
            if "address" in kw:
                msg.attrs["IFLA_ADDRESS"] = kw["address"]
            if kw.get("state") == "up":
                msg["flags"] |= 1

    def addr(self, command, **kw):
        self.calls.append(("addr", command, kw))

    def fdb(self, command, **kw):
        self.calls.append(("fdb", command, kw))


def test_vlan_apply_sends_the_right_requests(tmp_path):
    fake = RecordingIPRoute({"eth2": (None, 1500)})
    managed = Managed(Paths(str(tmp_path)))
    d = segmented(vlan(101, "eth2", 1500), name="br101", addresses=("172.16.100.3/24",))
    done = links.apply(plan((d,), (), managed.get("links")), managed, ipr=fake)
    adds = [kw for op, cmd, kw in fake.calls if op == "link" and cmd == "add"]
    assert adds[0] == dict(ifname="vlan101", kind="vlan", vlan_id=101, link=2, mtu=1500)
    assert adds[1]["ifname"] == "br101" and adds[1]["kind"] == "bridge"
    assert adds[1]["br_stp_state"] == 0 and adds[1]["br_forward_delay"] == 0
    assert fake.table["vlan101"].get_attr("IFLA_MASTER") == fake.table["br101"]["index"]
    assert fake.table["br101"].get_attr("IFLA_ADDRESS") == fake.table["vlan101"].get_attr("IFLA_ADDRESS")
    assert (
        "addr",
        "add",
        dict(index=fake.table["br101"]["index"], address="172.16.100.3", prefixlen=24, broadcast="172.16.100.255"),
    ) in fake.calls
    assert managed.get("links") == {"vlan101", "br101"}
    assert Managed(Paths(str(tmp_path))).get("links") == {"vlan101", "br101"}
    assert "created vlan101 (VLAN 101 on eth2)" in done and "created bridge br101" in done


# --------------------------------------------------------------------------- real kernel


def _root_links():
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return sorted(
            (m["index"], m.get_attr("IFLA_IFNAME"), m.get_attr("IFLA_MASTER"), m.get_attr("IFLA_MTU"))
            for m in ipr.get_links()
        )


@pytest.fixture
def netns():
    """Run the test inside a fresh network namespace (unique per run), removed after."""
    from pyroute2 import netns as nsapi

    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    root_before = _root_links()
    name = f"hu-{os.getpid()}-{secrets.token_hex(3)}"
    nsapi.create(name)
    try:
        nsapi.pushns(name)
        try:
            yield name
        finally:
            nsapi.popns()
    finally:
        nsapi.remove(name)
    assert name not in nsapi.listnetns()
    assert _root_links() == root_before, "the root namespace's links changed"


@pytest.fixture
def ipr(netns):
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        yield ipr


@pytest.fixture
def managed(tmp_path):
    return Managed(Paths(str(tmp_path)))


def veth(ipr, name, mtu=1500, address=None):
    ipr.link("add", ifname=name, kind="veth", peer={"ifname": name + "p"})
    index = ipr.link_lookup(ifname=name)[0]
    ipr.link("set", index=index, mtu=mtu, state="up")
    ipr.link("set", index=ipr.link_lookup(ifname=name + "p")[0], mtu=mtu, state="up")
    if address:
        iface = ipaddress.ip_interface(address)
        ipr.addr("add", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen)
    return index


def link(ipr, name):
    found = ipr.link_lookup(ifname=name)
    return ipr.get_links(found[0])[0] if found else None


def info(msg):
    return msg.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_DATA")


def converge(desired, managed):
    changes = plan(desired, links.current(desired, managed.get("links")), managed.get("links"))
    done = links.apply(changes, managed)
    return changes, done


def replan(desired, managed):
    return plan(desired, links.current(desired, managed.get("links")), managed.get("links"))


def test_e2e_flat_bridge_lifecycle(ipr, managed):
    veth(ipr, "eth1")
    d = flat(addresses=("192.168.0.3/24", "192.168.0.1/24"))
    changes, done = converge((d,), managed)
    assert "created bridge br100" in done and "enslaved eth1 to br100" in done

    br, up = link(ipr, "br100"), link(ipr, "eth1")
    assert br.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_KIND") == "bridge"
    assert info(br).get_attr("IFLA_BR_STP_STATE") == 0
    assert info(br).get_attr("IFLA_BR_FORWARD_DELAY") == 0
    assert br.get_attr("IFLA_ADDRESS") == up.get_attr("IFLA_ADDRESS")
    assert up.get_attr("IFLA_MASTER") == br["index"]
    assert br.get_attr("IFLA_MTU") == 1500 and br["flags"] & 1 and up["flags"] & 1
    assert links.addresses("br100") == ["192.168.0.3/24", "192.168.0.1/24"]
    assert links.link_exists("br100") and not links.link_exists("br999")
    assert managed.get("links") == {"br100"}
    cur = links.current((d,), managed.get("links"))
    assert cur == (d,) and isinstance(cur[0], Observed)
    assert replan((d,), managed) == []
    assert links.apply([], managed) == []

    # change the gateway address: only that
    d2 = flat(addresses=("192.168.0.3/24", "192.168.0.2/24"))
    assert steps(replan((d2,), managed)) == ["remove br100 192.168.0.1/24", "add br100 192.168.0.2/24"]
    converge((d2,), managed)
    assert links.addresses("br100") == ["192.168.0.3/24", "192.168.0.2/24"]
    assert replan((d2,), managed) == []

    # drift made by someone else is put right
    ipr.link("set", index=br["index"], kind="bridge", br_stp_state=1, br_forward_delay=1500)
    ipr.link("set", index=br["index"], state="down")
    assert steps(replan((d2,), managed)) == ["set br100"]
    converge((d2,), managed)
    assert replan((d2,), managed) == []
    assert info(link(ipr, "br100")).get_attr("IFLA_BR_STP_STATE") == 0

    # gone from the pillar: the bridge goes, the uplink stays, no longer enslaved
    assert steps(replan((), managed)) == ["delete br100"]
    converge((), managed)
    assert link(ipr, "br100") is None
    up = link(ipr, "eth1")
    assert up is not None and not up.get_attr("IFLA_MASTER")
    assert managed.get("links") == set()
    assert replan((), managed) == []


def test_e2e_mtu_and_wrong_primary(ipr, managed):
    veth(ipr, "eth1")
    converge((flat(addresses=("192.168.0.1/24", "192.168.0.3/24")),), managed)
    assert links.addresses("br100") == ["192.168.0.1/24", "192.168.0.3/24"]
    d = flat(addresses=("192.168.0.3/24", "192.168.0.1/24"), mtu=9000)
    converge((d,), managed)
    assert links.addresses("br100") == ["192.168.0.3/24", "192.168.0.1/24"]
    assert link(ipr, "br100").get_attr("IFLA_MTU") == 9000
    assert link(ipr, "eth1").get_attr("IFLA_MTU") == 9000
    assert replan((d,), managed) == []


def test_e2e_existing_bridge_is_configured_but_not_deleted(ipr, managed):
    veth(ipr, "eth1")
    ipr.link("add", ifname="br100", kind="bridge")
    index = ipr.link_lookup(ifname="br100")[0]
    ipr.addr("add", index=index, address="10.99.0.1", prefixlen=24)
    d = flat()
    converge((d,), managed)
    assert links.addresses("br100") == ["192.168.0.3/24"]  # not desired: removed
    assert managed.get("links") == set()
    assert replan((d,), managed) == []
    converge((), managed)
    assert link(ipr, "br100") is not None


def test_e2e_uplink_moves_and_physical_links_are_never_deleted(ipr, managed):
    veth(ipr, "eth1")
    veth(ipr, "eth3")
    converge((flat(),), managed)
    converge((flat(uplink="eth3"),), managed)
    assert not link(ipr, "eth1").get_attr("IFLA_MASTER")
    assert link(ipr, "eth3").get_attr("IFLA_MASTER") == link(ipr, "br100")["index"]
    assert link(ipr, "br100").get_attr("IFLA_ADDRESS") == link(ipr, "eth3").get_attr("IFLA_ADDRESS")
    assert replan((flat(uplink="eth3"),), managed) == []
    # a corrupt record naming a physical link: it is dropped, the link is not deleted
    managed.set("links", managed.get("links") | {"eth1"})
    converge((flat(uplink="eth3"),), managed)
    assert link(ipr, "eth1") is not None and managed.get("links") == {"br100"}


def _fdb_remotes(ipr, name):
    index = ipr.link_lookup(ifname=name)[0]
    return sorted(
        m.get_attr("NDA_DST")
        for m in ipr.fdb("dump")
        if m["ifindex"] == index and m.get_attr("NDA_LLADDR") == links.ZERO_MAC
    )


def test_e2e_vxlan_multicast_group(ipr, managed):
    veth(ipr, "eth2", address="10.9.0.1/24")
    seg = vxlan(5102, "eth2", group="239.1.1.102")
    d = segmented(seg, name="br103")
    changes, done = converge((d,), managed)
    vx, br = link(ipr, "vx5102"), link(ipr, "br103")
    data = info(vx)
    assert vx.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_KIND") == "vxlan"
    assert data.get_attr("IFLA_VXLAN_ID") == 5102
    assert data.get_attr("IFLA_VXLAN_GROUP") == "239.1.1.102"
    assert data.get_attr("IFLA_VXLAN_LINK") == link(ipr, "eth2")["index"]
    assert data.get_attr("IFLA_VXLAN_PORT") == 4789
    assert vx.get_attr("IFLA_MTU") == 1500 and link(ipr, "eth2").get_attr("IFLA_MTU") == 1550
    assert vx.get_attr("IFLA_MASTER") == br["index"] and vx["flags"] & 1
    assert br.get_attr("IFLA_ADDRESS") == vx.get_attr("IFLA_ADDRESS")
    assert links.addresses("br103") == ["172.16.102.4/24"]
    assert managed.get("links") == {"br103", "vx5102"}
    assert links.current((d,), managed.get("links")) == (d,)
    assert replan((d,), managed) == []

    assert steps(replan((), managed)) == ["delete br103", "delete vx5102"]
    converge((), managed)
    assert link(ipr, "br103") is None and link(ipr, "vx5102") is None
    assert link(ipr, "eth2") is not None and managed.get("links") == set()


def test_e2e_vxlan_unicast_remotes(ipr, managed):
    veth(ipr, "eth2", address="10.9.0.1/24")
    d = segmented(vxlan(5103, "eth2", remotes=("10.9.0.2", "10.9.0.3"), port=4790), name="br104")
    converge((d,), managed)
    assert _fdb_remotes(ipr, "vx5103") == ["10.9.0.2", "10.9.0.3"]
    assert info(link(ipr, "vx5103")).get_attr("IFLA_VXLAN_PORT") == 4790
    assert links.current((d,), managed.get("links")) == (d,)
    assert replan((d,), managed) == []

    d2 = segmented(vxlan(5103, "eth2", remotes=("10.9.0.3", "10.9.0.4"), port=4790), name="br104")
    assert steps(replan((d2,), managed)) == ["add vx5103 remote 10.9.0.4", "remove vx5103 remote 10.9.0.2"]
    converge((d2,), managed)
    assert _fdb_remotes(ipr, "vx5103") == ["10.9.0.3", "10.9.0.4"]
    assert replan((d2,), managed) == []

    # a different group/port means a new link: it is rebuilt and enslaved again
    d3 = segmented(vxlan(5103, "eth2", group="239.1.1.103"), name="br104")
    converge((d3,), managed)
    assert info(link(ipr, "vx5103")).get_attr("IFLA_VXLAN_GROUP") == "239.1.1.103"
    assert _fdb_remotes(ipr, "vx5103") == ["239.1.1.103"]  # the kernel's group entry only
    assert link(ipr, "vx5103").get_attr("IFLA_MASTER") == link(ipr, "br104")["index"]
    assert link(ipr, "br104").get_attr("IFLA_ADDRESS") == link(ipr, "vx5103").get_attr("IFLA_ADDRESS")
    assert replan((d3,), managed) == []
    converge((), managed)
    assert link(ipr, "vx5103") is None and link(ipr, "br104") is None


def test_e2e_segment_link_replaced_by_another(ipr, managed):
    veth(ipr, "eth2", address="10.9.0.1/24")
    converge((segmented(vxlan(5102, "eth2", group="239.1.1.102")),), managed)
    d = segmented(vxlan(5104, "eth2", remotes=("10.9.0.2",)))
    converge((d,), managed)
    assert link(ipr, "vx5102") is None
    assert link(ipr, "vx5104").get_attr("IFLA_MASTER") == link(ipr, "br103")["index"]
    assert managed.get("links") == {"br103", "vx5104"}
    assert replan((d,), managed) == []


def _vlan_supported(ipr):
    from pyroute2.netlink.exceptions import NetlinkError

    veth(ipr, "probe0")
    try:
        ipr.link("add", ifname="probe0.9", kind="vlan", vlan_id=9, link=ipr.link_lookup(ifname="probe0")[0])
    except NetlinkError as exc:
        if exc.code in (errno.EOPNOTSUPP, errno.ENOENT, errno.EINVAL):
            return False
        raise
    finally:
        ipr.link("del", index=ipr.link_lookup(ifname="probe0")[0])
    return True


@pytest.mark.vlan
def test_e2e_vlan(ipr, managed):
    if not _vlan_supported(ipr):
        pytest.skip(
            "this kernel cannot create 802.1Q VLAN links (no 8021q): "
            "the request is checked by test_vlan_netlink_request instead"
        )
    veth(ipr, "eth2")
    d = segmented(vlan(101, "eth2", 1500), name="br101", addresses=("172.16.100.3/24",))
    converge((d,), managed)
    vl = link(ipr, "vlan101")
    assert info(vl).get_attr("IFLA_VLAN_ID") == 101
    assert vl.get_attr("IFLA_LINK") == link(ipr, "eth2")["index"]
    assert vl.get_attr("IFLA_MASTER") == link(ipr, "br101")["index"]
    assert links.current((d,), managed.get("links")) == (d,)
    assert replan((d,), managed) == []
    converge((), managed)
    assert link(ipr, "vlan101") is None and link(ipr, "eth2") is not None


def test_drop_local_remotes_skips_this_hosts_own_vtep():
    from _hanet.desired import Bridge, Segment
    from _hanet.links import drop_local_remotes

    seg = Segment(
        kind="vxlan",
        name="vx5100",
        parent="eth2",
        vni=5100,
        remotes=("198.51.100.11", "198.51.100.12", "198.51.100.31"),
    )
    br = Bridge(name="br101", network="red", uplink="vx5100", segment=seg)
    flat = Bridge(name="br100", network="private", uplink="eth1")
    got = drop_local_remotes((br, flat), {"198.51.100.11", "203.0.113.11"})
    assert got[0].segment.remotes == ("198.51.100.12", "198.51.100.31")
    assert got[1] == flat
    assert drop_local_remotes((br,), {"10.0.0.1"}) == (br,)


# --------------------------------------------------------------------------- one-NIC hosts


def carry_converge(desired, managed):
    cur = links.current(desired, managed.get("links"), carried=managed.get(links.CARRIED))
    changes = plan(desired, cur, managed.get("links"))
    return changes, links.apply(changes, managed)


def v4_routes(ipr):
    out = []
    for r in ipr.get_routes(family=2):
        if r.get_attr("RTA_TABLE") == 255 or r["proto"] == links.RTPROT_KERNEL:
            continue
        oif = ipr.get_links(r.get_attr("RTA_OIF"))[0].get_attr("IFLA_IFNAME")
        dst = f"{r.get_attr('RTA_DST') or '0.0.0.0'}/{r['dst_len']}"
        out.append((r.get_attr("RTA_TABLE"), dst, r.get_attr("RTA_GATEWAY"), oif))
    return sorted(out)


def test_e2e_a_one_nic_host_s_addresses_and_routes_follow_its_uplink_into_the_bridge(ipr, managed):
    """nova's one-NIC FlatDHCP host: the uplink carries the host's addresses (management,
    public) and routes (the default one, a static one, one in another table). Enslaving
    it moves them onto the bridge, never without a default route on the way; the next
    plan has nothing to do; removing hanet moves them back, again without a gap."""
    import threading

    from pyroute2 import IPRoute

    veth(ipr, "eth0", address="203.0.113.11/24")
    eth0 = ipr.link_lookup(ifname="eth0")[0]
    ipr.addr("add", index=eth0, address="192.0.2.11", prefixlen=24)
    ipr.route("add", dst="0.0.0.0/0", gateway="203.0.113.1", oif=eth0)
    ipr.route("add", dst="198.18.99.0/24", gateway="192.0.2.1", oif=eth0, priority=20)
    ipr.route("add", dst="0.0.0.0/0", gateway="192.0.2.1", oif=eth0, table=100)
    before = v4_routes(ipr)
    gaps, stop = [], threading.Event()

    def watch():  # every route lookup of the host's traffic, all the time
        with IPRoute() as own:
            while not stop.is_set():
                try:
                    own.route("get", dst="8.8.8.8")
                except Exception as exc:  # pylint: disable=broad-except
                    gaps.append(str(exc))

    t = threading.Thread(target=watch)
    t.start()
    try:
        d = flat(name="br100", uplink="eth0", addresses=("192.168.0.3/24",))
        _, done = carry_converge((d,), managed)
        assert any("moved onto it: 203.0.113.11/24, 192.0.2.11/24" in x for x in done), done
        assert links.addresses("br100") == ["203.0.113.11/24", "192.0.2.11/24", "192.168.0.3/24"]
        assert links.addresses("eth0") == []
        assert v4_routes(ipr) == sorted((t_, dst, gw, "br100") for t_, dst, gw, _ in before)
        assert carry_converge((d,), managed)[0] == []  # the host's addresses are not the bridge's
        _, done = carry_converge((), managed)
    finally:
        stop.set()
        t.join(5)
    assert gaps == []
    assert links.addresses("eth0") == ["203.0.113.11/24", "192.0.2.11/24"]
    assert v4_routes(ipr) == before
    assert link(ipr, "br100") is None and managed.get(links.CARRIED) == set()


def test_e2e_an_onlink_route_moves_and_a_half_done_move_is_finished_by_the_next_apply(ipr, managed):
    """A /32 host address with its default route 'onlink' (a gateway outside every
    prefix, common at cloud providers) moves with its flag; an uplink left enslaved with
    its addresses (a move that failed half way, or a bridge someone made) is taken care of
    by the next plan."""
    veth(ipr, "eth0", address="203.0.113.11/32")
    eth0 = ipr.link_lookup(ifname="eth0")[0]
    ipr.route("add", dst="0.0.0.0/0", gateway="172.31.1.1", oif=eth0, flags=links.RTNH_F_ONLINK)
    d = flat(name="br100", uplink="eth0", addresses=("192.168.0.3/24",))
    carry_converge((d,), managed)
    assert links.addresses("br100")[0] == "203.0.113.11/32" and links.addresses("eth0") == []
    default = [r for r in ipr.get_routes(family=2) if r["dst_len"] == 0 and r.get_attr("RTA_TABLE") == 254]
    assert len(default) == 1 and default[0]["flags"] & links.RTNH_F_ONLINK
    assert ipr.get_links(default[0].get_attr("RTA_OIF"))[0].get_attr("IFLA_IFNAME") == "br100"
    carry_converge((), managed)
    assert links.addresses("eth0") == ["203.0.113.11/32"]

    # half done: eth0 in br100 with its address still on it
    ipr.link("add", ifname="br100", kind="bridge")
    ipr.link("set", index=eth0, master=ipr.link_lookup(ifname="br100")[0])
    managed.set("links", {"br100"})
    changes, done = carry_converge((d,), managed)
    assert "enslave eth0" in steps(changes) and any("moved 203.0.113.11/32 from eth0 onto br100" in x for x in done)
    assert links.addresses("eth0") == [] and carry_converge((d,), managed)[0] == []
