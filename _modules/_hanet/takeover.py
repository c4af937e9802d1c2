"""Taking a network-host network over, and giving it up (the minion's half of a failover).

``run`` is the takeover sequence; ``hanet.takeover`` (the execution module) only hands
it this host's context. The order reaches a network host twice: the liveness beacon
hears it on the master's publish channel and calls ``run(..., warm=True)`` in the
minion's running process (bind and announce only: nothing to fork or load), and the
``hanet.takeover`` job Salt forks for the same order calls ``run`` again, finds the
addresses bound, and does the rest (dnsmasq, metadata, the ``complete`` event). A
per-network slot (a lock and a small record of what the last run did) keeps the two
from working against each other.

The sequence: check the order (this host is a network host of the network, the epoch
is not older than one it knows), duplicate address detection of the gateway (skipped
for a planned move, whose old owner still answers until the new one has announced),
record the new owner, bind the gateway and the network's floating IPs, announce every
moved address with gratuitous ARP, then the full facets.
"""

from __future__ import annotations

import json
import os
import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional

from . import arp, conntrackd, desired, failover, floating, host, links, metrics
from .fence import guard_s as fence_guard_s
from .common import Change, FileLock, Managed, Paths, write_atomic

PRECHECK_FRESH_S = 1.0  # how old the beacon's clear probe of a gateway may be
log = logging.getLogger(__name__)
GARP_MIN = 3  # a takeover announces every moved address at least this often
HANDOVER_WAIT_S = 3.0  # how long a handover's takeover waits for the old owner to let go


@dataclass
class Context:
    """What a takeover needs of this host: its id, the validated model, its paths,
    the failover record as it knows it (``owners()``: {network: {owner, epoch}}), and
    how to fire an event to the master (``fire(tag, data)``)."""

    me: str
    cfg: object
    paths: Paths
    owners: Callable[[], dict]
    fire: Callable[[str, dict], None]
    # desired states computed for this cfg, by owner map: kept by the caller across
    # calls (the minion's running process), so that a takeover finds the state it
    # binds computed already (``prepare``)
    memo: Optional[dict] = None

    def owner_map(self):
        return owner_map(self.owners(), self.paths)

    def desired(self, owners=None):
        owners = self.owner_map() if owners is None else owners
        if self.memo is None:
            return desired.compute(self.cfg, self.me, owners)
        if self.memo.get("cfg") is not self.cfg:  # a new pillar: nothing of the old one
            self.memo.clear()
            self.memo["cfg"] = self.cfg
        key = tuple(sorted(owners.items()))
        got = self.memo.get(key)
        if got is None:
            if len(self.memo) > MEMO_MAX:
                for k in [k for k in list(self.memo) if k != "cfg"][: len(self.memo) // 2]:
                    del self.memo[k]
            got = self.memo[key] = desired.compute(self.cfg, self.me, owners)
        return got


MEMO_MAX = 16  # desired states a Context's memo keeps (a host's standby networks, and now)


def prepare(ctx):
    """Compute ahead what a takeover order would need on this host: the desired state
    now, and for each network-host network it stands by for, the state with this host
    as its owner (``ctx.memo`` keeps them). The liveness beacon calls it on every poll
    (``hanet.prepare``); it costs nothing while the pillar and the record stay as they
    are. Returns the networks prepared."""
    now = ctx.owner_map()
    ctx.desired(now)
    ready = []
    for label, net in sorted(ctx.cfg.networks.items()):
        if net.multi_host or ctx.me not in net.network_hosts or now.get(label) == ctx.me:
            continue
        ctx.desired(dict(now, **{label: ctx.me}))
        ready.append(label)
    return ready


# --------------------------------------------------------------------------- the host's record


def local_record_path(paths):
    return paths.state("owners.json")


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (FileNotFoundError, ValueError):
        return None


def local_owners(paths):
    """This host's own copy of the record (what its takeovers and relinquishes saw)."""
    got = _read_json(local_record_path(paths))
    return got if isinstance(got, dict) else {}


def write_local_owner(paths, network, owner, epoch):
    """Record ``owner`` at ``epoch`` for ``network`` in this host's copy, under a lock
    (a host standing by for several networks may take them over at once). An epoch
    older than the one recorded changes nothing; returns whether it was recorded."""
    with FileLock(paths.state("owners.lock")):
        rec = local_owners(paths)
        if failover.epoch_of(rec, network) > int(epoch):
            return False
        rec[network] = {"owner": owner, "epoch": int(epoch)}
        write_atomic(local_record_path(paths), json.dumps(rec, sort_keys=True) + "\n")
        return True


# --------------------------------------------------------------------------- fencing

FENCED = "(fenced)"  # the owner a fenced network has in this host's eyes: not this host


def fenced(paths):
    """{network: epoch} this host fenced itself off (run/hanet/fenced.json)."""
    got = _read_json(paths.run("fenced.json"))
    return got if isinstance(got, dict) else {}


def _set_fenced(paths, change):
    with FileLock(paths.run("fenced.lock")):
        rec = fenced(paths)
        change(rec)
        if rec:
            write_atomic(paths.run("fenced.json"), json.dumps(rec, sort_keys=True) + "\n")
        else:
            try:
                os.unlink(paths.run("fenced.json"))
            except FileNotFoundError:
                pass


def owner_map(records, paths):
    """{network: owner} from the failover record as this host knows it, with the networks
    it fenced itself off held by nobody here (so no apply binds them again until the
    master orders it)."""
    out = {net: r["owner"] for net, r in records.items()}
    for net in fenced(paths):
        out[net] = FENCED
    return out


def fence(ctx):
    """Rule 2 (``_hanet.fence``): stop answering for every network-host network this host
    serves: unbind its gateway and floating IPs and stop its dnsmasq, as a standby would
    be; its configuration stays. Only a takeover order from the master brings them back.
    Returns {"fenced": [network, ...], "changes": {facet: [what was done]}}, or {} when
    this host serves no such network."""
    owners = ctx.owners()
    mine = {
        label: failover.epoch_of(owners, label)
        for label, net in sorted(ctx.cfg.networks.items())
        if not net.multi_host and ctx.me in net.network_hosts and failover.owner_of(ctx.cfg, owners, label) == ctx.me
    }
    if not mine:
        return {}
    serving = ctx.desired()
    _set_fenced(ctx.paths, lambda rec: rec.update(mine))
    managed = Managed(ctx.paths)
    done = {}
    for label in mine:  # only what moves: nothing else on a cut-off host is touched
        _merge(done, unbind_moved(ctx.cfg.networks[label], serving, managed))
    _merge(done, host.apply_now(("dnsmasq",), ctx.desired(), ctx.paths, managed))
    metrics.host_store(ctx.paths).add("hanet_fences_total")
    for label in mine:
        _transition(ctx, label)
    return {"fenced": sorted(mine), "changes": {k: v for k, v in done.items() if v}}


def unbind_moved(net, state, managed):
    """Unbind what moves with ``net`` (its gateway, and its floating IPs in ``state``) and
    nothing else: the first step of giving a network up, so that the host falls silent
    for those addresses before anything slower (dnsmasq, the rest of the facets) runs."""
    done = {
        "links": links.apply(
            [
                Change(
                    "links",
                    "remove",
                    f"{net.bridge} {net.service_cidr}",
                    {"link": net.bridge, "address": net.service_cidr},
                )
            ],
            managed,
        )
    }
    unbinds = [
        Change("floating", "unbind", f.address, {"interface": f.public_interface})
        for f in state.floating_ips
        if f.network == net.label
    ]
    if unbinds:
        done["floating"] = floating.apply(unbinds, managed, 0)
    return {k: v for k, v in done.items() if v}


def unfence(paths, network):
    _set_fenced(paths, lambda rec: rec.pop(network, None))


# --------------------------------------------------------------------------- the slot


class Slot:
    """One takeover of ``network`` at a time on this host (an exclusive lock), and what
    the last one did (``run/hanet/takeover-<network>.json``: epoch, outcome, marks,
    moved addresses), so that the warm path and the job of the same order cooperate."""

    def __init__(self, paths, network):
        self.path = paths.run(f"takeover-{network}.json")
        self._lock = FileLock(paths.run(f"takeover-{network}.lock"))

    def __enter__(self):
        self._lock.__enter__()
        return self

    def __exit__(self, *exc):
        self._lock.__exit__(*exc)

    def read(self, epoch):
        got = _read_json(self.path)
        return got if isinstance(got, dict) and got.get("epoch") == int(epoch) else None

    def write(self, **record):
        write_atomic(self.path, json.dumps(record, sort_keys=True) + "\n")


class _Marks:
    """Timestamps of the takeover's steps (reported in the ``complete`` event)."""

    def __init__(self, marks=None):
        self.marks = [tuple(m) for m in marks] if marks else [("start", time.time())]

    def __call__(self, what):
        self.marks.append((what, time.time()))

    def timings(self):
        t0 = self.marks[0][1]
        return {f"{what}_s": round(at - t0, 4) for what, at in self.marks[1:]}


# --------------------------------------------------------------------------- the steps


def _network(ctx, network):
    net = ctx.cfg.networks.get(network)
    if net is None or net.multi_host or ctx.me not in net.network_hosts:
        raise ValueError(f"{ctx.me} is not a network host of {network!r}")
    return net


def _check_epoch(ctx, network, epoch):
    known = failover.epoch_of(ctx.owners(), network)
    if int(epoch) < known:
        raise ValueError(f"stale order for {network}: epoch {epoch} is older than {known}")


def _dad(net, planned, prechecked, mark, moving, handover=False):
    """Duplicate address detection of every address that moves (``moving``, [(ip,
    interface)]: the gateway on the segment, the floating IPs on the uplink) before
    any is bound here.

    After a failure the beacon probed them while the master decided (``prechecked``,
    {ip: [at, holder]}); what it found silent within ``PRECHECK_FRESH_S`` is not asked
    again. A gateway still answered on the segment means the owner is alive there: no
    takeover. A floating IP still answered on the uplink means the old owner lost the
    segment but not its uplink: it drops what it serves when it finds itself cut off
    (rule 2), so it is given ``HANDOVER_WAIT_S`` to fall silent, as is every address
    of a handover (the old owner was told to let go just before). Nothing is bound
    while any address is answered by another host."""
    if planned and not handover:
        return  # an order from before planned moves were handovers: nothing to wait for
    fresh = {
        ip
        for ip, got in (prechecked or {}).items()
        if isinstance(got, (list, tuple))
        and len(got) == 2
        and got[1] is None
        and 0 <= time.time() - float(got[0]) < PRECHECK_FRESH_S
    }
    waiting = [(ip, ifname) for ip, ifname in moving if ip not in fresh]
    deadline = time.monotonic() + HANDOVER_WAIT_S
    first = True
    while waiting:
        answered = arp.probe_many(waiting, arp.DAD_TIMEOUT_S, tries=1)
        if first and not handover and net.service_address in answered:
            mark("dad")
            raise RuntimeError(
                f"{failover._what(net)} {net.service_address} is still answered by {answered[net.service_address]} "
                f"on {net.bridge}: not binding it (duplicate address)"
            )
        first = False
        waiting = [(ip, ifname) for ip, ifname in waiting if ip in answered]
        if waiting and time.monotonic() >= deadline:
            ip, ifname = waiting[0]
            raise RuntimeError(
                f"{ip} is still answered by {answered[ip]} on {ifname} "
                f"{HANDOVER_WAIT_S:.0f} s into the takeover: not binding"
            )
        if waiting:
            time.sleep(0.01)
    mark("dad")


def _fence_wait(ctx, detected_at, cooperative):
    """Rule 2's margin: an owner cut off from everything falls silent on its own, at worst
    ``fence.guard_s`` after the first report of its loss (``detected_at``); until then a
    standby whose probes cannot reach it (the partition that cut it off) must not bind.
    The decision and the order usually take longer than that; when they did not, wait
    out the rest. Not for a planned move or a handover: there the owner lets go itself.
    True when it waited."""
    if cooperative or not isinstance(detected_at, (int, float)):
        return False
    wait = float(detected_at) + fence_guard_s(ctx.cfg.ha.probe) - time.time()
    if wait <= 0:
        return False
    time.sleep(min(wait, 1.0))  # a detection stamped in the future (a clock ahead): at most 1 s
    return True


def stamps(heard_at):
    """[(name, epoch seconds)] from an order's ``heard_at`` (a time, or [[name, time],
    ...]: the beacon's steps before the takeover started). They are timings only: what
    cannot be read is left out and logged, never a reason for a takeover to fail."""
    pre = heard_at if isinstance(heard_at, (list, tuple)) else [("heard", heard_at)]
    out = []
    for item in pre:
        try:
            name, at = item
            out.append((str(name), float(at)))
        except (TypeError, ValueError):
            log.warning("hanet takeover: a stamp that is no (name, time): %r", item)
    return out


def moving_addresses(net, state):
    """[(ip, interface)] that would move to this host with ``net``, from its desired
    state as a standby or as the owner: the gateway and the network's floating IPs
    (which a standby keeps NAT rules for, ``ruleset.floating``)."""
    fips = {(f.address, f.public_interface) for f in state.ruleset.floating if f.network == net.label}
    fips |= {(f.address, f.public_interface) for f in state.floating_ips if f.network == net.label}
    return [(net.service_address, net.bridge)] + sorted(fips)


def _holds_gateway(ctx, network):
    net = ctx.cfg.networks.get(network)
    return net is not None and net.service_cidr in links.addresses_by_link().get(net.bridge, [])


def bind_moved(net, state, managed):
    """Bind what moves, and only that: the gateway on the network's bridge and the
    network's floating IPs, as the links and floating planners would (the same changes,
    recorded the same way), without reading the rest of the host first."""
    if net.service_cidr not in next((b.addresses for b in state.bridges if b.name == net.bridge), ()):
        raise RuntimeError(f"the desired state does not put {net.service_address} on {net.bridge}")
    done = {"links": links_add(net)}
    binds = [
        Change("floating", "bind", f.address, {"interface": f.public_interface})
        for f in state.floating_ips
        if f.network == net.label
    ]
    if binds:
        done["floating"] = floating.apply(binds, managed, 0)
    return {k: v for k, v in done.items() if v}


def links_add(net):
    """Bind the gateway on the network's bridge (what ``links.apply`` does for the same
    change, in one netlink message: its link lookup and pyroute2's parsing cost 10-20 ms
    on the failover path). The managed record keeps links, not addresses: nothing to
    record."""
    import errno
    import socket

    from . import addrbatch

    try:
        index = socket.if_nametoindex(net.bridge)
    except OSError:
        raise links.LinkError(f"{net.bridge} does not exist: cannot bind {net.service_cidr}") from None
    cidr = net.service_cidr
    (code,) = addrbatch.change([("add", index, net.service_address, net.prefixlen, links.broadcast_of(cidr))])
    if code == errno.EEXIST:
        return []
    if code:
        raise links.LinkError(f"add {cidr} to {net.bridge}: {os.strerror(code)}")
    return [f"added {cidr} to {net.bridge}"]


def _as_owner(ctx, network):
    """This host's desired state were it the owner of ``network`` (what it holds, and so
    what a relinquish unbinds, once the record names another owner)."""
    return ctx.desired(dict(ctx.owner_map(), **{network: ctx.me}))


def _merge(done, more):
    for facet, msgs in more.items():
        done[facet] = done.get(facet, []) + list(msgs)
    return done


def run(
    ctx,
    network,
    epoch,
    previous=None,
    detected_at=None,
    planned=False,
    decision=None,
    warm=False,
    prechecked=None,
    handover=False,
    heard_at=None,
    heard_via=None,
):
    """Become the holder of ``network`` at ``epoch`` (see the module's docstring).
    Returns the ``complete`` event's data (warm: only what was bound); fires
    ``hanet/failover/<network>/complete``, or ``/failed`` with the reason and raises.
    The announcement's first frames (an ARP request for every moved address) go out as
    soon as the addresses are bound; the rest (the replies, then the repeat rounds)
    once the takeover is done (``repeat_announcement``), so that nothing after the
    binding (dnsmasq, the ``complete`` event) waits for them."""
    repeats = []
    data = _run(
        ctx,
        network,
        epoch,
        previous=previous,
        detected_at=detected_at,
        planned=planned,
        decision=decision,
        warm=warm,
        prechecked=prechecked,
        handover=handover,
        repeats=repeats,
        heard_at=heard_at,
        heard_via=heard_via,
    )
    for moved, rounds in repeats:
        try:
            repeat_announcement(ctx, network, epoch, moved, rounds)
        except Exception as err:  # pylint: disable=broad-except
            # the takeover is done and reported; its first frames went out: say so only
            log.warning("hanet takeover of %s: the announcement's repeats failed: %s", network, err)
    return data


def repeat_announcement(ctx, network, epoch, moved, rounds):
    """The rest of a takeover's announcement of ``moved`` [(ip, interface)]: the first
    round's replies (its requests went out at the binding), then ``rounds`` full rounds.
    Each round holds the network's slot and goes out only while this host still owns
    ``network`` at ``epoch`` in its own copy of the record and has not fenced it: a
    relinquish or a newer order (which take the slot) ends the announcement, so no
    frame announces an address this host gave up. Rounds are ``arp.GARP_INTERVAL``
    apart, and at least the time the pacing bucket needs to refill (each round starts
    with a full bucket, ``arp.garp_many``)."""
    per_iface = {}
    for _ip, iface in moved:
        per_iface[iface] = per_iface.get(iface, 0) + 2  # a request and a reply each
    gap = max([arp.GARP_INTERVAL] + [min(n, arp.GARP_BURST) / arp.GARP_PPS for n in per_iface.values()])
    for frames_of in [(1,)] + [(0, 1)] * int(rounds):
        time.sleep(gap)
        with Slot(ctx.paths, network):
            if network in fenced(ctx.paths) or local_owners(ctx.paths).get(network) != {
                "owner": ctx.me,
                "epoch": int(epoch),
            }:
                return
            _garp(ctx, moved, 1, frames_of)


def _run(
    ctx,
    network,
    epoch,
    previous=None,
    detected_at=None,
    planned=False,
    decision=None,
    warm=False,
    prechecked=None,
    handover=False,
    repeats=None,
    heard_at=None,
    heard_via=None,
):
    tag_base = {
        "network": network,
        "from": previous,
        "to": ctx.me,
        "epoch": int(epoch),
        "detected_at": detected_at,
        "planned": bool(planned),
    }
    if handover:
        tag_base["handover"] = True
    if isinstance(decision, dict):
        tag_base["decision"] = decision
    again = None
    with Slot(ctx.paths, network) as slot:
        prior = slot.read(epoch)
        if prior and prior.get("outcome") == "complete":
            if warm:
                return prior["data"]  # the other path of the same order did everything
            if _holds_gateway(ctx, network):
                # the same order again (a reconcile loop re-sent a move nobody confirmed:
                # the master the first complete went to died, or a second master sent
                # it): nothing to do, but say so again, to the master asking now
                again = dict(prior["data"], repeated_at=time.time())
            else:
                prior = None  # ordered again, and the gateway is gone (fenced, lost): bind anew
    if again is not None:
        ctx.fire(failover.failover_tag(network, "complete"), again)
        return again
    with Slot(ctx.paths, network) as slot:
        prior = slot.read(epoch)
        if prior and prior.get("outcome") == "complete":
            if warm or _holds_gateway(ctx, network):
                return prior["data"]  # the other path of the same order did everything (meanwhile)
            prior = None
        if warm and prior:
            return {"network": network, "epoch": int(epoch), "outcome": prior.get("outcome")}
        bound = prior if prior and prior.get("outcome") == "bound" else None
        mark = _Marks(bound["marks"] if bound else None)
        if heard_at and not bound:  # when the beacon heard the order, and its steps before "start"
            mark.marks.extend(stamps(heard_at))
        moved = [tuple(m) for m in bound["moved"]] if bound else []
        try:
            net = _network(ctx, network)
            _check_epoch(ctx, network, epoch)
            managed = Managed(ctx.paths)
            if not bound:
                mark("config")
                _dad(net, planned, prechecked, mark, moving_addresses(net, ctx.desired()), handover)
                unfence(ctx.paths, network)
                write_local_owner(ctx.paths, network, ctx.me, epoch)
                state = ctx.desired()
                mark("desired")
                if state.conntrack_sync is not None:
                    # the flows the old owner NATed, into this kernel before the first of
                    # their packets can arrive (ha:conntrack_sync)
                    conntrackd.commit(ctx.paths)
                    mark("committed")
                if _fence_wait(ctx, detected_at, planned or handover):  # the last step before the bind
                    mark("guarded")
                done = bind_moved(net, state, managed)
                mark("bound")
                moved = moving_addresses(net, state)
                _garp(ctx, moved, 1, (0,))  # every address's request now; the rest when done (run)
                mark("announced")
                if repeats is not None:
                    repeats.append((moved, max(state.garp_count, GARP_MIN) - 1))
                _merge(done, host.apply_now(("links", "floating"), state, ctx.paths, managed))
                if warm:
                    slot.write(
                        epoch=int(epoch), outcome="bound", marks=mark.marks, moved=moved, by="warm", via=heard_via
                    )
                    return {"network": network, "epoch": int(epoch), "outcome": "bound", "timings": mark.timings()}
            else:
                unfence(ctx.paths, network)
                write_local_owner(ctx.paths, network, ctx.me, epoch)
                state = ctx.desired()
                # bound by the warm path: make sure of it (no change when it is)
                done = host.apply_now(("links", "floating"), state, ctx.paths, managed)
            done.update(host.apply_now(("dnsmasq", "metadata"), state, ctx.paths, managed))
            mark("dhcp")
            if state.conntrack_sync is not None and not warm:
                # this host's caches from its kernel now, and the others told
                conntrackd.after_takeover(ctx.paths)
        except Exception as err:  # report, then let the caller see it too
            if warm:  # the job of the same order tries again and reports
                raise
            ctx.fire(failover.failover_tag(network, "failed"), dict(tag_base, reason=str(err), failed_at=time.time()))
            slot.write(epoch=int(epoch), outcome="failed", reason=str(err))
            metrics.host_store(ctx.paths).add(
                "hanet_takeovers_total",
                {"network": network, "bound_by": "warm" if bound else "job", "result": "failed"},
            )
            raise
        data = dict(
            tag_base,
            completed_at=time.time(),
            addresses=[ip for ip, _ in moved],
            timings=mark.timings(),
            bound_by="warm" if bound else "job",
            changes=done,
        )
        if bound and bound.get("via"):
            data["heard_via"] = bound["via"]  # how the beacon heard the order: direct, publication
        slot.write(epoch=int(epoch), outcome="complete", data=data)
    ctx.fire(failover.failover_tag(network, "complete"), data)
    _count_takeover(ctx, data)
    return data


def _count_takeover(ctx, data):
    store = metrics.host_store(ctx.paths)
    store.add("hanet_takeovers_total", {"network": data["network"], "bound_by": data["bound_by"], "result": "complete"})
    took = (data.get("timings") or {}).get("dhcp_s")  # from the order's arrival ("config")
    if isinstance(took, (int, float)):
        store.observe("hanet_takeover_duration_seconds", max(0.0, took), {"network": data["network"]})
    _transition(ctx, data["network"])


def _transition(ctx, network):
    metrics.host_store(ctx.paths).set(
        "hanet_gateway_last_transition_timestamp_seconds", {"network": network}, time.time()
    )


def _garp(ctx, pairs, count, frames_of=(0, 1)):
    """Announce ``pairs`` (``arp.garp_many``) and count the frames."""
    try:
        sent = arp.garp_many(pairs, count, frames_of=frames_of)
    except OSError:
        metrics.host_store(ctx.paths).add("hanet_garps_sent_total", {"result": "error"}, 1)
        raise
    metrics.host_store(ctx.paths).add("hanet_garps_sent_total", {"result": "sent"}, sent)
    return sent


def announce(ctx, rounds=GARP_MIN):
    """Announce (gratuitous ARP, ``GARP_MIN`` rounds) the gateway and floating IPs of
    every network-host network this host owns by its record and holds now. The beacon
    calls it when a peer comes back (a healed partition): whatever the neighbours
    learnt while the segment was split, they learn the owner again. Returns the
    addresses announced."""
    owners = ctx.owners()
    held = links.addresses_by_link()
    state = None
    out = []
    for label, net in sorted(ctx.cfg.networks.items()):
        if (
            net.multi_host
            or ctx.me not in net.network_hosts
            or label in fenced(ctx.paths)
            or failover.owner_of(ctx.cfg, owners, label) != ctx.me
            or net.service_cidr not in held.get(net.bridge, [])
        ):
            continue
        state = state or ctx.desired()
        out += moving_addresses(net, state)
    if out:
        _garp(ctx, out, max(1, int(rounds)))
    return [ip for ip, _ in out]


def relinquish(ctx, network, epoch, owner):
    """Give ``network`` up to ``owner`` (the master's record at ``epoch``): unbind the
    gateway and the network's floating IPs and stop its dnsmasq; keep the hot-standby
    rules. An order older than what this host knows changes nothing."""
    with Slot(ctx.paths, network):  # the beacon's warm relinquish and the job: one at a time
        if not write_local_owner(ctx.paths, network, owner, epoch) or failover.epoch_of(ctx.owners(), network) > int(
            epoch
        ):
            return {"stale": f"epoch {epoch} is older than what {ctx.me} knows for {network}"}
        unfence(ctx.paths, network)
        managed = Managed(ctx.paths)
        # silent first (a handover's new owner waits for it), then the rest
        done = unbind_moved(_network(ctx, network), _as_owner(ctx, network), managed)
        out = _merge(
            done, host.apply_now(("links", "floating", "dnsmasq", "metadata"), ctx.desired(), ctx.paths, managed)
        )
    metrics.host_store(ctx.paths).add("hanet_relinquishes_total", {"network": network})
    _transition(ctx, network)
    return out
