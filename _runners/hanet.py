"""hanet runner: the failover workflow, planned moves, and the cluster's view.

- ``hanet.liveness`` is what ``reactor/failover.sls`` (and the ``hanet_failover``
  engine) calls for every ``salt/beacon/<observer>/hanet_liveness/<peer>/<down|up>``
  event. It checks the report (shape, freshness, the observer's own minion key, not a
  replay), takes the master's second opinion of the suspect (its watch, or an ICMP
  check), lets ``_hanet.failover.decide`` rule, records the new owner durably under the
  master's cachedir and orders it to take over (``hanet.takeover``), which fires
  ``hanet/failover/<network>/complete``. Anything it refuses fires
  ``hanet/failover/<network or "unknown">/rejected`` with the reason, and nothing moves.
- ``hanet.evacuate <minion>`` / ``hanet.failback <network>``: planned moves. The old
  owner lets go first and keeps forwarding; the new one binds once every address is
  silent and announces it: never two holders, at most a packet in flight lost.
- ``hanet.status``: per network who serves, who stands by, whether every host agrees;
  per floating IP where it lives.

The protocol itself (tags, signatures, the record, the decision) lives in
``_modules/_hanet/failover.py``; the ICMP check and watch in ``_hanet/icmp.py``. This
module wires them to Salt.

CLI examples::

    salt-run hanet.status
    salt-run hanet.evacuate net1
    salt-run hanet.failback shared
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # Salt's loader injects these
    __opts__: dict = {}

log = logging.getLogger(__name__)

__virtualname__ = "hanet"

_clients = {}
_PUBLISH_LOCK = threading.Lock()
_CACHE = {}  # minion id -> (compiled at, (config, pillar)); lives as long as the process
CACHE_S = 600.0  # a highstate primes it afresh (reactor/prime.sls)
_WATCH = {}  # "watch" -> icmp.Watch, in the engine's process
# what the master knows of each network host's own health (its impaired/healthy reports,
# and hanet.serving in the reconcile loop's audits): {host: {"lost": [..], "since": t}}
_HEALTH = {}


def __virtual__():
    return __virtualname__


def _lib(name):
    """The ``_hanet.<name>`` library module, found where Salt modules find it: beside
    the directory this module was loaded from (a checkout's ``_modules``, a master's
    synced ``extmods/modules``), or in ``<extension_modules>/modules``."""
    up = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for cand in (
        os.path.join(up, "_modules"),
        os.path.join(up, "modules"),
        os.path.join(__opts__["extension_modules"], "modules"),
    ):
        if os.path.isdir(os.path.join(cand, "_hanet")):
            if cand not in sys.path:
                sys.path.append(cand)
            break
    return importlib.import_module(f"_hanet.{name}")


# --------------------------------------------------------------------------- salt plumbing


def _local():
    import salt.client

    if "local" not in _clients:
        _clients["local"] = salt.client.get_local_client(mopts=__opts__)
    return _clients["local"]


# A direct order the host acknowledged is published as a Salt job this long after it
# was sent: the job (dnsmasq, the complete event) is not urgent once the host's beacon
# binds, and the minion forking it and loading its modules while the beacon binds
# slowed the binding 3-5x on two CPUs (bench failover: takeover start -> bound 0.03 s
# against 0.11-0.13 s). Unacknowledged, it is published ACK_WAIT_S after sending.
DIRECT_GRACE_S = 0.25
ACK_WAIT_S = 0.03
_ACKS = {}  # jid -> threading.Event, set when the host acknowledged the direct order


def _direct_socket():
    """Where direct orders go from (an ephemeral UDP port): its thread reads the hosts'
    acknowledgements (``{"ack": jid}``) into ``_ACKS``."""
    import json

    udp = _clients.get("direct")
    if udp is None:

        def ack(raw, _addr):
            try:
                ev = _ACKS.get(json.loads(raw).get("ack"))
            except (ValueError, AttributeError):
                return
            if ev is not None:
                ev.set()

        udp = _clients["direct"] = _lib("common").Datagrams("0.0.0.0", 0, ack, "hanet-direct-acks").start()
    return udp


def _send_direct(tgt, fun, arg, kwarg, jid, port):
    """The order, signed with the master's key, in one UDP datagram to each address the
    master's watch knows for ``tgt`` (``failover.order_datagram``): the network host's
    beacon acts on it before the Salt publication of the same jid arrives. Best effort:
    nothing is waited for here, and the publication follows anyway. Returns how many
    went."""
    import salt.crypt

    w = _WATCH.get("watch")
    addrs = w.addresses(tgt) if w is not None and port else ()
    if not addrs:
        return 0
    failover = _lib("failover")
    try:
        key = _clients.get("master_key")
        if key is None:
            key = _clients["master_key"] = salt.crypt.PrivateKey.from_file(
                os.path.join(__opts__["pki_dir"], "master.pem")
            )
        raw = failover.order_datagram(key, tgt, fun, arg, kwarg, jid, time.time())
        udp = _direct_socket()
    except Exception as err:  # pylint: disable=broad-except  (the publication still goes)
        log.warning("hanet: no direct order to %s (%s); the publication alone carries it", tgt, err)
        return 0
    sent = 0
    for addr in addrs:
        try:
            udp.sock.sendto(raw, (addr, port))
            sent += 1
        except OSError as err:
            log.debug("hanet: direct order to %s at %s:%s: %s", tgt, addr, port, err)
    return sent


def _publish(tgt, fun, arg, kwarg=None, direct=0):
    """Publish a job without waiting for it; returns its jid.

    What ``LocalClient.cmd_async`` sends, on a request channel to the master that stays
    open (cmd_async opens a new one for every job, on the failover path). Any trouble
    with it falls back to ``cmd_async``. One job at a time: the engine's worker threads
    share the channel. ``direct`` (``ha:order_port``): the order also goes straight to
    the minion first (``_send_direct``), under the same jid, and the publication follows
    from a thread of its own (``DIRECT_GRACE_S``)."""
    import salt.utils.jid

    jid = salt.utils.jid.gen_jid(__opts__)
    if direct:
        acked = _ACKS[jid] = threading.Event()
        for old in list(_ACKS)[:-64]:
            _ACKS.pop(old, None)
        if _send_direct(tgt, fun, list(arg), kwarg or {}, jid, direct):
            sent = time.monotonic()

            def later():
                if acked.wait(ACK_WAIT_S):
                    time.sleep(max(0.0, sent + DIRECT_GRACE_S - time.monotonic()))
                _publish_now(tgt, fun, arg, kwarg, jid)

            threading.Thread(target=later, name="hanet-publish", daemon=True).start()
            return jid
    return _publish_now(tgt, fun, arg, kwarg, jid)


def _publish_now(tgt, fun, arg, kwarg, jid):
    """``_publish``'s Salt publication, under ``jid``."""
    import salt.channel.client
    import salt.exceptions
    import salt.utils.args
    import salt.utils.network

    opts = __opts__
    with _PUBLISH_LOCK:
        local = _local()
        try:
            chan = _clients.get("publish")
            if chan is None:
                uri = "tcp://{}:{}".format(salt.utils.network.ip_bracket(opts["interface"]), opts["ret_port"])
                chan = salt.channel.client.ReqChannel.factory(opts, crypt="clear", master_uri=uri)
                _clients["publish"] = chan
            load = local._prep_pub(  # pylint: disable=protected-access
                tgt, fun, salt.utils.args.condition_input(list(arg), kwarg or {}), "glob", "", jid, 10
            )
            got = chan.send(load, timeout=10)
            published = ((got or {}).get("load") or {}).get("jid") if isinstance(got, dict) else None
            if not published:
                raise RuntimeError(f"the master did not publish it: {got!r}")
            return published
        except (salt.exceptions.SaltException, OSError, RuntimeError) as err:
            log.warning(
                "hanet: publishing %s to %s on the kept channel failed (%s); using LocalClient.cmd_async", fun, tgt, err
            )
            chan = _clients.pop("publish", None)
            if chan is not None:
                try:
                    chan.close()
                except Exception:  # pylint: disable=broad-except  (closing a broken channel)
                    pass
            return local.cmd_async(tgt, fun, arg=list(arg), kwarg=kwarg or {}, jid=jid)


def _fire(tag, data):
    import salt.utils.event

    with salt.utils.event.get_master_event(__opts__, __opts__["sock_dir"], listen=False) as ev:
        ev.fire_event(data, tag)


def _grains(minion_id):
    import salt.cache
    import salt.exceptions

    try:
        return salt.cache.factory(__opts__).fetch("grains", minion_id) or {}
    except salt.exceptions.SaltCacheError:
        return {}


def _config(minion_id, fresh=False):
    """hanet's validated model from ``minion_id``'s pillar, compiled by the master (kept
    for ``CACHE_S``, so that a failover does not wait for a pillar compile)."""
    hit = _CACHE.get(minion_id)
    if hit and not fresh and time.monotonic() - hit[0] < CACHE_S:
        return hit[1]
    import salt.pillar

    pillar = salt.pillar.get_pillar(__opts__, _grains(minion_id), minion_id, saltenv="base").compile_pillar()
    out = (_lib("model").load(pillar.get("hanet", {})), pillar)
    _CACHE[minion_id] = (time.monotonic(), out)
    return out


def _any_minion():
    """Some minion the master knows (for compiling the hanet pillar)."""
    import salt.cache

    known = sorted(salt.cache.factory(__opts__).list("grains") or [])
    if not known:
        raise RuntimeError("the master knows no minion yet")
    return known[0]


def _canonical(fresh=False):
    """The minion whose compiled pillar is the cluster's one view of hanet: every
    decision (a report, a handover, the reconcile loop, planned moves, status) is made
    against it, never against the reporting minion's own pillar. The master option
    ``hanet_canonical_minion`` names it; by default it is the first minion the master
    knows (sorted), the same on every master, looked up again every ``CACHE_S`` or when
    ``fresh`` (a prime), not on the failover path."""
    named = __opts__.get("hanet_canonical_minion")
    if named:
        return named
    hit = _CACHE.get("<canonical>")
    if hit and not fresh and time.monotonic() - hit[0] < CACHE_S:
        return hit[1]
    mid = _any_minion()
    _CACHE["<canonical>"] = (time.monotonic(), mid)
    return mid


def _record():
    """The failover record, held for one decision: the master option ``hanet_record``
    chooses where it lives (``_hanet/record.py``: the local file, or etcd)."""
    return _lib("record").open(__opts__)


def _records(seed=None):
    """``for attempt in _records(): with attempt as rec: ...``: the record again, and the
    decision again, when another master changed it first (``RecordConflict``).
    ``seed``: what this decision read already (``record.seed_of``), for the first
    attempt (etcd: one round trip less)."""
    return _lib("record").attempts(__opts__, seed=seed)


def _owners():
    return _lib("record").read_owners(__opts__)


# --------------------------------------------------------------------------- second opinion


def _vouching(cfg, host):
    return _lib("failover").vouching_addresses(cfg, _grains(host).get("ipv4", []))


def _watch_hosts(cfg):
    """Start (or update) the master's watch of every network host, in this process
    (the hanet_failover engine's: ``prime(via="engine")``), every half probe interval."""
    icmp = _lib("icmp")
    interval = max(0.02, cfg.ha.probe.interval_s / 2)
    w = _WATCH.get("watch")
    if w is None or abs(w.interval - interval) > 1e-9:
        if w is not None:
            w.stop()
        w = _WATCH["watch"] = icmp.Watch(interval=interval).start()
    hosts = _lib("failover").watched_hosts(cfg)
    w.watch({h: _vouching(cfg, h) for h in hosts})
    return {"interval_s": interval, "hosts": hosts}


def _second_opinion(cfg, peer):
    """The master's view of ``peer``: its watch when that has a clear verdict (the
    addresses it watches as evidence: no grains lookup on the failover path, which
    cost 25-40 ms), else an ICMP check now."""
    failover, icmp = _lib("failover"), _lib("icmp")
    w = _WATCH.get("watch")
    seen = w.verdict(peer) if w is not None else None
    if seen is not None:
        return failover.Opinion(seen, "watch", w.addresses(peer))
    addrs = tuple(_vouching(cfg, peer))
    return failover.Opinion(icmp.check(addrs), "icmp", addrs)


# --------------------------------------------------------------------------- liveness


def prime(tag=None, data=None, via="reactor"):  # pylint: disable=unused-argument
    """Warm the failover path (imports, the pillar of the minion that just started), so
    that the first failover after a start does not pay for them. ``reactor/prime.sls``
    calls it for ``salt/minion/*/start`` and for ``hanet/prime`` (which every hanet
    highstate fires when it ends), in the reactor's own process: that is the process a
    failover runs in, and the one whose first rendering is slow. The hanet_failover
    engine calls it for the same events (``via="engine"``), and there it also starts or
    updates the master's watch of the network hosts.

    CLI example::

        salt-run hanet.prime
    """
    import salt.crypt  # noqa: F401  pylint: disable=unused-import

    failover = _lib("failover")
    if via == "reactor" and failover.engine_alive(__opts__["cachedir"]):
        return {"result": True, "reason": "left to the hanet_failover engine"}
    mid = (data or {}).get("id") if isinstance(data, dict) else None
    try:
        if mid:
            _config(mid, fresh=True)
        cfg, _ = _config(_canonical(fresh=True), fresh=True)
    except Exception as err:  # pylint: disable=broad-except  (any pillar trouble: report it)
        return {"result": False, "reason": str(err)}
    _lib("icmp").check(["127.0.0.1"], timeout=0.01, tries=1)
    _local()
    out = {"result": True}
    if via == "engine":
        out["watch"] = _watch_hosts(cfg)
        out["report_port"] = cfg.ha.report_port
    return out


def _counts():
    """This master's counters (``hanet.metrics``)."""
    return _lib("metrics").master_store(__opts__["cachedir"])


def _count_moves(moves, reason):
    for move in moves:
        _counts().add("hanet_failovers_total", {"network": move.network, "reason": reason})


def _reject(network, reason, tag, data):
    failover = _lib("failover")
    log.warning("hanet failover: rejected %s: %s", tag, reason)
    _counts().add("hanet_reports_rejected_total", {"reason": failover.reject_kind(reason)})
    data = data if isinstance(data, dict) else {}
    _fire(
        failover.failover_tag(network, "rejected"),
        {
            "reason": reason,
            "event_tag": tag,
            "observer": data.get("observer"),
            "peer": data.get("peer"),
            "at": time.time(),
        },
    )
    return {"result": False, "reason": reason}


def liveness(tag=None, data=None, via="reactor"):
    """React to a hanet_liveness transition: called by ``reactor/failover.sls`` and, when
    the master runs it, by the ``hanet_failover`` engine (``via="engine"``) for the same
    event. Whichever comes first handles it; the other returns quietly.

    Reactor example (``reactor/failover.sls``)::

        hanet-liveness:
          runner.hanet.liveness:
            - args:
              - tag: {{ tag | json }}
              - data: {{ data | json }}
    """
    failover = _lib("failover")
    t0 = time.time()
    if via == "reactor" and failover.engine_alive(__opts__["cachedir"]):
        return {"result": True, "action": "none", "reason": "left to the hanet_failover engine"}
    try:
        rep = failover.parse_report(tag, data, t0)
    except failover.Rejected as err:
        return _reject(None, err.reason, tag, data)
    why = failover.verify(os.path.join(__opts__["pki_dir"], "minions", rep.observer), data)
    if why:
        return _reject(None, f"not from {rep.observer}: {why}", tag, data)
    if rep.state == failover.UP:
        log.info("hanet failover: %s sees %s up again", rep.observer, rep.peer)
        # a host is back (a healed partition, a reboot): the next round asks at once what
        # it holds, so that a loser still holding an address lets go now, not at the audit
        _RECONCILE["audit_at"] = 0.0
        return {"result": True, "action": "none", "reason": "up: no automatic failback"}
    if rep.state in (failover.IMPAIRED, failover.HEALTHY):
        return _health(rep, tag, data, via, t0)
    try:
        cfg, _ = _config(_canonical())
    except Exception as err:  # pylint: disable=broad-except  (any pillar trouble: refuse)
        return _reject(None, f"pillar: {err}", tag, data)
    t_valid = time.time()
    try:
        with _record() as rec:
            other = rec.handle(rep.nonce, via, t0)  # raises Rejected for a replay
            if other:
                return {"result": True, "action": "none", "reason": f"handled by the {other}"}
            stake = failover.at_stake(cfg, rec.owners, rep.observer, rep.peer)
            late = not stake and failover.moved_away(cfg, rec.owners, rep.observer, rep.peer)
            seed = _lib("record").seed_of(rec)
        if late:  # one of the many reports of one death, after the decision: nothing to say
            return {"result": True, "action": "none", "reason": f"moved already: {', '.join(late)}"}
        if not stake:  # nothing to check the suspect for
            return _reject(None, failover.nothing_at_stake(rep), tag, data)
        t_check = time.time()
        opinion = _second_opinion(cfg, rep.peer)
        t_confirmed = time.time()
        dead = _dead(cfg)
        for attempt in _records(seed):
            with attempt as rec:
                verdict = failover.decide(cfg, rec.owners, rep, opinion.verdict, opinion.evidence, dead)
                rec.record(verdict.moves, time.time(), f"{rep.peer} down (seen by {rep.observer})")
        t_recorded = time.time()
        if not verdict.moves and (attempt.number or not failover.at_stake(cfg, rec.owners, rep.observer, rep.peer)):
            # decided meanwhile (another master, or this one's other path): its move stands
            log.info("hanet failover: %s down (seen by %s): decided meanwhile", rep.peer, rep.observer)
            return {"result": True, "action": "none", "reason": "decided meanwhile (another master)"}
    except failover.Rejected as err:
        return _reject(None, err.reason, tag, data)
    except failover.RecordError as err:
        return _reject(None, f"no decision: {err}", tag, data)
    for network, reason in verdict.rejected:
        out = _reject(network, reason, tag, data)
    if opinion.verdict == failover.ALIVE_VERDICT:
        # reported down, answers the master: the reconcile loop asks the hosts carrying its
        # networks whether it is cut off from a segment (failover.segment_cuts)
        _RECONCILE["suspects"][rep.peer] = t0
    if verdict.rejected and not verdict.moves:
        return out
    for move in verdict.moves:
        decision = {
            "via": via,
            "received_at": t0,
            "validated_at": t_valid,
            "checked_at": t_check,
            "confirmed_at": t_confirmed,
            "recorded_at": t_recorded,
            "second_opinion": opinion.source,
            "published_at": time.time(),
        }
        args, kwargs = failover.takeover_order(
            move.network, move.epoch, move.previous, detected_at=rep.detected_at, decision=decision
        )
        _publish(move.new, failover.TAKEOVER_FUN, args, kwargs, direct=cfg.ha.order_port)
        # Fencing: should the suspect be alive after all, it gives the network up.
        _publish(move.previous, failover.RELINQUISH_FUN, [move.network, move.epoch, move.new], direct=cfg.ha.order_port)
    if verdict.moves:
        log.warning(
            "hanet failover: %s down (seen by %s): %s",
            rep.peer,
            rep.observer,
            ", ".join(f"{m.network} -> {m.new}" for m in verdict.moves),
        )
        _counts().observe("hanet_decision_duration_seconds", time.time() - t0)
        _count_moves(verdict.moves, "down")
    else:
        log.info("hanet failover: %s down (seen by %s): moved already", rep.peer, rep.observer)
    return {
        "result": True,
        "moved": {m.network: m.new for m in verdict.moves},
        "timings": {
            "validated_s": round(t_check - t0, 4),
            "confirmed_s": round(t_confirmed - t0, 4),
            "published_s": round(time.time() - t0, 4),
        },
    }


def _learn_health(host, lost, now):
    """Keep what ``host`` says it cannot serve; ``since`` moves only when that changed."""
    lost = sorted(lost)
    cur = _HEALTH.get(host)
    if cur is None:
        _HEALTH[host] = {"lost": lost, "since": now if lost else 0.0}
    elif cur["lost"] != lost:
        _HEALTH[host] = {"lost": lost, "since": now}


def _dead(cfg):
    """The network hosts the master's watch sees dead now (none without the watch)."""
    w = _WATCH.get("watch")
    if w is None:
        return set()
    return {h for h in _lib("failover").watched_hosts(cfg) if w.verdict(h) == "dead"}


def _health(rep, tag, data, via, t0):
    """A network host's report about itself: what it cannot serve now. Networks it owns
    and cannot serve go to a standby that can (``failover.handover``): the old owner is
    told to let go first, and the new one binds once the gateway is silent."""
    failover = _lib("failover")
    try:
        cfg, _ = _config(_canonical())
    except Exception as err:  # pylint: disable=broad-except  (any pillar trouble: refuse)
        return _reject(None, f"pillar: {err}", tag, data)
    try:
        for attempt in _records():
            with attempt as rec:
                other = None if attempt.number else rec.handle(rep.nonce, via, t0)  # Rejected: a replay
                if other:
                    return {"result": True, "action": "none", "reason": f"handled by the {other}"}
                _learn_health(rep.observer, rep.lost, t0)
                if rep.state == failover.HEALTHY:
                    log.warning("hanet failover: %s can serve all its networks again", rep.observer)
                    return {"result": True, "action": "none", "reason": "healthy"}
                dead = _dead(cfg)
                verdict = failover.handover(cfg, rec.owners, rep.observer, rep.lost, _HEALTH, dead, t0)
                rec.record(verdict.moves, time.time(), f"{rep.observer} cannot serve it (handover)")
    except failover.Rejected as err:
        return _reject(None, err.reason, tag, data)
    except failover.RecordError as err:
        return _reject(None, f"no decision: {err}", tag, data)
    for network, reason in verdict.rejected:
        _reject(network, reason, tag, data)
    for move in verdict.moves:
        for order in failover.handover_orders(move):
            _RECONCILE["issued"][order.key] = time.time()
            _send(order, via, cfg.ha.order_port)
    _count_moves(verdict.moves, "handover")
    if verdict.moves:
        log.warning(
            "hanet failover: %s cannot serve %s: %s",
            rep.observer,
            ", ".join(rep.lost),
            ", ".join(f"{m.network} -> {m.new}" for m in verdict.moves),
        )
    return {
        "result": True,
        "moved": {m.network: m.new for m in verdict.moves},
        "rejected": [r for _, r in verdict.rejected],
    }


# --------------------------------------------------------------------------- reconcile

_RECONCILE = {"issued": {}, "audit_at": 0.0, "dead_since": {}, "suspects": {}, "cut_since": {}}
AUDIT_S = 5.0  # how often the network hosts are asked what they hold
GRACE_S = 2.0  # how long a death is left to the report path before the loop acts on it


def _ask(tgt, fun, timeout=2):
    """{minion: answer} from the minions ``tgt`` (a list), on the reconcile loop's own
    client (the failover path's client is not shared across threads)."""
    import salt.client

    client = _clients.get("reconcile")
    if client is None:
        client = _clients["reconcile"] = salt.client.get_local_client(mopts=__opts__)
    got = client.cmd(sorted(tgt), fun, tgt_type="list", timeout=timeout) if tgt else {}
    return {k: v for k, v in (got or {}).items() if isinstance(v, dict)}


def _send(order, via, port=0):
    failover = _lib("failover")
    if order.kind == "takeover":
        args, kwargs = failover.takeover_order(
            order.network,
            order.epoch,
            order.previous,
            decision={"via": via, "published_at": time.time()},
            handover=order.handover,
        )
        return _publish(order.host, failover.TAKEOVER_FUN, args, kwargs, direct=port)
    return _publish(order.host, failover.RELINQUISH_FUN, [order.network, order.epoch, order.owner], direct=port)


def reconcile(via="reconcile"):
    """One round of the master's reconcile loop (the hanet_failover engine runs it every
    second): the record against what the master's watch sees and what the network hosts
    say they hold, and the moves and orders that make them converge
    (``_hanet.failover.reconcile``): a dead owner replaced without waiting for a report,
    a lost or failed order sent again, a second holder told to let go. Without the
    engine's watch only orders are re-sent (nothing is moved).

    CLI example::

        salt-run hanet.reconcile
    """
    failover = _lib("failover")
    now = time.time()
    cfg, _ = _config(_canonical())
    w = _WATCH.get("watch")
    hosts = failover.watched_hosts(cfg)
    verdicts = {h: w.verdict(h) if w is not None else None for h in hosts}
    # the fast path (a report) gets GRACE_S to act on a death first: the loop is for what
    # it lost, and must not compete with it for the CPU while it works
    since = _RECONCILE["dead_since"]
    for h, v in verdicts.items():
        if v == "dead":
            since.setdefault(h, now)
        else:
            since.pop(h, None)
    verdicts = {h: None if v == "dead" and now - since[h] < GRACE_S else v for h, v in verdicts.items()}
    try:
        owners = _owners()
    except failover.RecordError as err:
        log.error("hanet reconcile: no decision: %s", err)
        return {"result": False, "reason": str(err)}
    audit = now - _RECONCILE["audit_at"] >= AUDIT_S
    suspects = _RECONCILE["suspects"]
    for h in [h for h, at in suspects.items() if now - at > failover.SUSPECT_S]:
        del suspects[h]
    ask = failover.to_ask(cfg, owners, verdicts, audit, suspects)
    got = _ask(sorted(ask), "hanet.serving") if ask else {}
    views = {h: r.get("peers") or {} for h, r in got.items()}
    holdings = None
    if audit:
        _RECONCILE["audit_at"] = now
        holdings = {h: r.get("networks") or {} for h, r in got.items() if h in hosts}
    for h, r in got.items():
        if h in hosts and isinstance(r.get("lost"), list):
            _learn_health(h, r["lost"], now)
    moves, orders = failover.reconcile(
        cfg, owners, verdicts, views, holdings, now, _RECONCILE["issued"], health=_HEALTH
    )
    links = {h: r.get("links") or {} for h, r in got.items()}
    # a network host that sees an owner silent on a segment (while the owner may still
    # answer on its uplink): ask the hosts carrying its networks from the next round on
    for seen in links.values():
        for peer, by_link in seen.items():
            if "down" in by_link.values():
                suspects[peer] = now
    cut_since, cuts = _RECONCILE["cut_since"], failover.segment_cuts(cfg, owners, verdicts, links)
    for label in [label for label in cut_since if label not in cuts]:
        del cut_since[label]  # healed, or not asked this round
    reasons = {}
    for label, (owner, standby, down, asked) in sorted(cuts.items()):
        first = cut_since.setdefault(label, now)
        if now - first < failover.CUT_DWELL_S or any(m.network == label for m in moves):
            continue
        move = failover.Move(label, owner, standby, failover.epoch_of(owners, label) + 1, handover=True)
        moves.append(move)
        orders += failover.handover_orders(move)
        reasons[label] = f"{owner} cut off from the segment of {label} (seen down by {down} of {asked} hosts)"
        log.warning("hanet reconcile: %s", reasons[label])
    if moves:
        try:
            for attempt in _records():
                with attempt as rec:  # decided on a copy: keep only what still holds
                    valid = [m for m in moves if failover.still_valid(cfg, rec.owners, m)]
                    for m in valid:  # one save: one transaction with the etcd record
                        failover.record_move(rec.owners, m, now, reasons.get(m.network, "reconcile"))
                    if valid:
                        rec.save()
        except failover.RecordError as err:
            log.error("hanet reconcile: no decision: %s", err)
            return {"result": False, "reason": str(err)}
        stale = {(m.network, m.epoch) for m in moves if m not in valid}
        orders = [o for o in orders if (o.network, o.epoch) not in stale]
        moves = valid
        for m in moves:
            _count_moves([m], "segment_cut" if m.network in reasons else "reconcile")
    for order in orders:
        _RECONCILE["issued"][order.key] = now
        _send(order, via, cfg.ha.order_port)
    if moves or orders:
        log.warning(
            "hanet reconcile: moved %s; sent %s",
            [(m.network, m.new, m.epoch) for m in moves],
            [order.key for order in orders],
        )
    return {
        "result": True,
        "moved": {m.network: m.new for m in moves},
        "orders": [list(order.key) for order in orders],
        "report_port": cfg.ha.report_port,
    }


def outcome(tag=None, data=None, via="engine"):  # pylint: disable=unused-argument
    """A takeover's ``hanet/failover/<network>/complete``: the record's owner confirmed
    at that epoch (the engine calls it; the reconcile loop re-sends unconfirmed moves).

    CLI example (what the engine does with the event's data)::

        salt-run hanet.outcome tag=hanet/failover/shared/complete \
            data='{"network": "shared", "to": "net2", "epoch": 4}'
    """
    failover = _lib("failover")
    if not isinstance(data, dict) or failover.parse_failover_tag(tag) != (data.get("network"), "complete"):
        return {"result": False, "reason": "not a complete event"}
    try:
        for attempt in _records():
            with attempt as rec:
                if failover.confirm(rec.owners, data.get("network"), data.get("to"), data.get("epoch"), data):
                    rec.save()
                    return {"result": True, "confirmed": [data.get("network"), data.get("epoch")]}
    except failover.RecordError as err:  # the reconcile loop orders it again, and it confirms then
        log.error("hanet failover: %s not confirmed: %s", tag, err)
        return {"result": False, "reason": str(err)}
    return {"result": True}


# --------------------------------------------------------------------------- planned moves


def _move(cfg, label, new, reason, timeout=30):
    failover = _lib("failover")
    for attempt in _records():
        with attempt as rec:
            move = failover.planned_move(cfg, rec.owners, label, new)
            if move is None:
                return {"network": label, "owner": new, "moved": False}
            rec.record([move], time.time(), reason)
    _count_moves([move], reason.split()[0])  # evacuate | failback
    # break before make, and no packet lost: the old owner unbinds first, but keeps
    # forwarding what its neighbours still send to its MAC (its rules stay) until the
    # new owner, once every address is silent, binds and announces them. Both orders go
    # out at once (the beacons act on them in a few ms; the takeover waits for the
    # silence): a gap of seconds between them would let the neighbours' ARP entries for
    # the old MAC fail their unicast probes and drop packets
    _publish(move.previous, failover.RELINQUISH_FUN, [label, move.epoch, new], direct=cfg.ha.order_port)
    args, kwargs = failover.takeover_order(label, move.epoch, move.previous, planned=True, handover=True)
    got = _local().cmd(new, failover.TAKEOVER_FUN, arg=args, kwarg=kwargs, timeout=timeout)
    done = got.get(new) if isinstance(got.get(new), dict) else None
    if new not in got or not isinstance(got[new], dict):
        raise RuntimeError(f"{new} did not take {label} over: {got.get(new)}")
    for attempt in _records():
        with attempt as rec:
            if failover.confirm(rec.owners, label, new, move.epoch, done):
                rec.save()
    # the takeover bound only once every address was silent: the old owner let go
    return {
        "network": label,
        "from": move.previous,
        "to": new,
        "epoch": move.epoch,
        "moved": True,
        "takeover": got[new].get("timings"),
        "old_released": True,
    }


def evacuate(minion, tgt_pillar_from=None):
    """Planned move of every network ``minion`` holds to its next standby: ``minion`` lets
    go first (it keeps forwarding what its neighbours still send to its MAC), then the
    new owner binds each address once it is silent and announces it: never two holders,
    and at most a packet in flight lost.

    CLI example::

        salt-run hanet.evacuate net1
    """
    cfg, _ = _config(tgt_pillar_from or _canonical(), fresh=True)
    out = []
    for label, move in _lib("failover").evacuation(cfg, _owners(), minion):
        if move is None:
            out.append({"network": label, "moved": False, "reason": "no standby"})
        else:
            out.append(_move(cfg, label, move.new, f"evacuate {minion}"))
    return out


def failback(network, to=None):
    """Move ``network`` back to its first network host (or ``to``), planned.

    CLI example::

        salt-run hanet.failback shared
    """
    cfg, _ = _config(_canonical(), fresh=True)
    net = cfg.networks.get(network)
    if net is None or net.multi_host:
        raise ValueError(f"{network!r} is not a network with network_hosts")
    return _move(cfg, network, to or net.network_hosts[0], "failback")


def status(timeout=10, table=False):
    """The whole cluster: for each network who serves, who stands by, whether every host
    agrees; for each floating IP, where it lives; ``problems``, what to look at (two
    holders, no holder, an unconfirmed move, no standby, a host that did not answer, a
    dead dnsmasq, a floating IP on two hosts, a host's pillar problems). ``table=True``:
    the same as one screen of text.

    CLI example::

        salt-run hanet.status
        salt-run hanet.status table=True
        salt-run hanet.status --out=json
    """
    out = _status(timeout)
    if table and "networks" in out:
        return _lib("failover").status_table(out)
    return out


def _status(timeout):
    failover = _lib("failover")
    asked_at = time.time()
    got = _local().cmd("*", "hanet.status", timeout=timeout)
    got = {k: v for k, v in got.items() if isinstance(v, dict)}
    if not got:
        return {"error": "no minion answered hanet.status"}
    skew = failover.clock_skew(got, asked_at, time.time())
    cfg, _ = _config(_canonical(), fresh=True)
    try:
        record = _owners()
    except failover.RecordError as err:
        # fail static: no move is made while the record cannot be read; who serves now
        # is still shown, the record's side (owner, epoch, agree) is not known
        out = failover.cluster_status(cfg, {}, got, skew)
        for entry in out["networks"].values():
            if not entry["multi_host"]:
                entry.update(owner=None, epoch=None, confirmed=None, agree=None)
        out.update(
            record=None,
            record_error=str(err),
            record_backend=_record_backend(),
            problems=failover.cluster_problems(cfg, out["networks"], out["floating_ips"], got, skew),
            clock_skew=skew,
        )
        return out
    out = failover.cluster_status(cfg, record, got, skew)
    out.update(record_backend=_record_backend(), clock_skew=skew)
    return out


def metrics(write=True):
    """This master's Prometheus metrics (text exposition format): the failover record
    (owner, epoch, since, unconfirmed moves, whether it can be read) and what this master
    counted (moves by reason, rejected reports by reason, decision durations). With
    ``write`` also written, for node_exporter's textfile collector, to
    ``<hanet_metrics_dir>/hanet_master.prom`` (master option; default
    ``<cachedir>/hanet/metrics``; ``''``: no file). The hanet_failover engine writes
    it every few seconds. Names and labels: docs/metrics.md.

    CLI example::

        salt-run hanet.metrics
    """
    m, failover = _lib("metrics"), _lib("failover")
    backend = (
        __opts__.get("hanet_record", {}).get("backend", "file")
        if isinstance(__opts__.get("hanet_record"), dict)
        else "file"
    )
    try:
        owners, ok = _owners(), True
    except failover.RecordError:
        owners, ok = None, False
    store = _counts()
    fams = m.master_families(owners, backend, ok)
    text = m.render(m.merge(fams, store.families().values()).values())
    directory = __opts__.get("hanet_metrics_dir", os.path.join(__opts__["cachedir"], "hanet", "metrics"))
    if write and directory:
        m.write_textfile(directory, m.MASTER_TEXTFILE, text)
    return text


def _record_backend():
    try:
        return _lib("record").describe(__opts__)
    except Exception as err:  # pylint: disable=broad-except  (a bad option: say so)
        return f"unusable: {err}"
