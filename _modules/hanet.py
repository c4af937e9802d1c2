"""hanet execution module: what this host holds, and the functions the hanet states call.

The work is done by the ``_hanet`` library that ships beside this module: a pure core
(``model``: pillar -> validated model, ``desired``: model -> this host's desired state,
each applier's ``plan``: desired + current -> changes), the appliers that touch the
kernel and the daemons, ``host`` (the facets in order, and what the host holds),
``failover`` (the protocol: record, orders, events) and ``takeover``. This module only
wires them to Salt: pillar and opts in, changes out.

CLI examples::

    salt '*' hanet.validate
    salt compute1 hanet.desired
    salt compute1 hanet.plan
    salt compute1 hanet.status
    salt compute1 hanet.garp 192.168.0.3 br100 3
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import pickle
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # Salt's loader injects these
    __opts__: dict = {}
    __pillar__: dict = {}
    __salt__: dict = {}
    __context__: dict = {}

log = logging.getLogger(__name__)

__virtualname__ = "hanet"

# _hanet lives beside this file (both are synced into extmods/modules). Salt's loader
# takes its own directories off sys.path again after loading a module, so the path is
# ensured at call time.
_HERE = os.path.dirname(os.path.abspath(__file__))


def _lib_stamp():
    d = os.path.join(_HERE, "_hanet")
    try:
        return max(os.path.getmtime(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".py"))
    except (OSError, ValueError):
        return None


def _h(name):
    """The ``_hanet.<name>`` library module: the one way a hanet Salt module on a minion
    loads the library (the beacon and the states go through this module). The minion's
    main process preloads the library for fast failover and every job is forked from
    there, so after a ``saltutil.sync_all`` changed any of its files the whole library
    is imported afresh (all of it at once: its modules share dataclasses)."""
    if _HERE not in sys.path:
        sys.path.append(_HERE)
    pkg = sys.modules.get("_hanet")
    stamp = _lib_stamp()
    if pkg is not None and getattr(pkg, "_hanet_stamp", stamp) != stamp:
        for key in [k for k in sys.modules if k == "_hanet" or k.startswith("_hanet.")]:
            del sys.modules[key]
    mod = importlib.import_module(f"_hanet.{name}")
    sys.modules["_hanet"]._hanet_stamp = stamp  # pylint: disable=protected-access
    return mod


def __virtual__():
    try:
        import netaddr  # noqa: F401
        import pyroute2  # noqa: F401
    except ImportError as err:
        return False, f"hanet needs {err.name} (see hanet's README: requirements.txt)"
    return __virtualname__


class PillarInvalid(Exception):
    """The hanet pillar has problems; str() lists every one with its pillar path."""


def _paths():
    return _h("common").Paths(root_dir=__opts__.get("root_dir", "/"))


def _pillar_key(pillar):
    """An exact fingerprint of a pillar value (pickle keeps key types and True vs 1 apart),
    or None when it cannot be taken (then nothing is cached)."""
    try:
        return hashlib.sha256(pickle.dumps(pillar, protocol=4)).hexdigest()
    except (pickle.PicklingError, TypeError, AttributeError, RecursionError):
        return None


def _cached(name, key, make):
    """``make()``, remembered in ``__context__`` under ``name`` for ``key`` (one entry).

    A state run calls hanet once per facet, each time with the same pillar, so the
    pillar is loaded and validated once per run. ``__context__`` lives as long as the
    run's loader; the key is the content, so a changed pillar or failover record is
    never served stale."""
    if key is None:
        return make()
    slot = __context__.get(name)
    if slot is not None and slot[0] == key:
        value = slot[1]
    else:
        try:
            value = make()
        except PillarInvalid as err:  # an invalid pillar stays invalid: cache that too
            value = err
        __context__[name] = (key, value)
    if isinstance(value, Exception):
        raise value
    return value


LAST_KNOWN = "pillar.json"  # under the state dir: the last valid hanet pillar applied here


def _config(pillar=None, last_known=False):
    """The validated model of ``pillar`` (default: this minion's ``hanet`` pillar).

    ``last_known``: when this minion object has no pillar at all, use the copy of the
    last pillar applied here (``<state_dir>/pillar.json``, mode 0600, kept by
    ``apply_facet``; a test=True run keeps nothing). The failover path asks for it: with hot
    multi-master Salt runs the beacon (and so the warm takeover, the fence and the
    announcements) in the first master's minion object, whose pillar stays empty while
    that master is down at start; the data plane was built from the last pillar, so
    that is the one to fail over with."""
    model = _h("model")
    if pillar is None:
        pillar = __pillar__.get("hanet", {})
        if not pillar and last_known and not __pillar__:
            # no pillar at all (never compiled: its master is down); a pillar without a
            # hanet key (the host left hanet's targeting, a render error) means what it says
            pillar = _last_known_pillar() or {}

    def load():
        try:
            return model.load(pillar)
        except model.PillarError as err:
            raise PillarInvalid(err.render()) from err

    return _cached("hanet.config", _pillar_key(pillar), load)


def _keep_applied(pillar=None):
    """``pillar`` (default: this minion's hanet pillar), valid and being applied, is the
    last one applied on this host; with it the master's failover record as this apply
    saw it (``hanet_owners``), for the beacon, which reads files, not Salt's pillar."""
    applied = __pillar__.get("hanet", {}) if pillar is None else pillar
    _remember_pillar(applied, _pillar_key(applied))
    _remember_record(__pillar__.get("hanet_owners") or {})


def _keep_json(path, data, what):
    """Write ``data`` as JSON to ``path`` (0600, atomically) unless the file already
    holds it; an error is a warning (an apply or the failover path must not fail on it)."""
    try:
        text = json.dumps(data, sort_keys=True, default=str) + "\n"
        try:
            with open(path, encoding="utf-8") as fh:
                if fh.read() == text:
                    return
        except FileNotFoundError:
            pass
        _h("common").write_atomic(path, text, mode=0o600)
    except (OSError, TypeError, ValueError) as err:
        log.warning("hanet: cannot keep %s in %s: %s", what, path, err)


def _remember_record(record):
    _keep_json(_paths().state(_h("host").APPLIED_RECORD), record, "the failover record")


def _remember_pillar(pillar, key):
    """Keep ``pillar`` (valid, just applied) as the last one applied on this host."""
    if not pillar or key is None or __context__.get("hanet.remembered") == key:
        return
    __context__["hanet.remembered"] = key  # tried once per pillar: one warning, not one per call
    _keep_json(_paths().state(LAST_KNOWN), pillar, "the last hanet pillar")


def _last_known_pillar():
    path = _paths().state(LAST_KNOWN)
    try:
        with open(path, encoding="utf-8") as fh:
            pillar = json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        log.warning("hanet: the last hanet pillar %s cannot be read: %s", path, err)
        return None
    log.info("hanet: no hanet pillar in this minion object; using the last one seen (%s)", path)
    return pillar if isinstance(pillar, dict) else None


def _records():
    """The failover record as this host knows it: the master's (pillar ``hanet_owners``,
    from hanet's ext_pillar) merged with this host's own copy, the higher epoch winning."""
    return _h("failover").merge(__pillar__.get("hanet_owners") or {}, _h("takeover").local_owners(_paths()))


def _desired(pillar=None):
    cfg = _config(pillar)
    owners = _h("takeover").owner_map(_records(), _paths())
    # cfg itself in the key: the same object compares by identity (fast), and holding it
    # keeps a new Config from ever being mistaken for it
    key = (cfg, __opts__["id"], tuple(sorted(owners.items())))
    return _cached("hanet.desired", key, lambda: _h("desired").compute(cfg, __opts__["id"], owners))


def links():
    """The network links of this host (this network namespace), by name.

    CLI example::

        salt '*' hanet.links
    """
    return _h("links").link_names()


def validate(pillar=None):
    """Validate the hanet pillar: ``{valid: True}`` or ``{valid: False, problems: [...]}``
    with every problem and its pillar path.

    CLI example::

        salt '*' hanet.validate
    """
    try:
        _config(pillar)  # cached: the facets that follow in a state run reuse it
    except PillarInvalid as err:
        cause = err.__cause__
        return {"valid": False, "problems": [f"{p}: {m}" for p, m in cause.problems]}
    return {"valid": True}


def desired(pillar=None):
    """This host's desired state under the pillar (nothing is read from or done to the host).

    CLI example::

        salt compute1 hanet.desired
    """
    try:
        return _desired(pillar).to_dict()
    except PillarInvalid as err:
        return {"error": str(err)}


def _facet(facet, state, paths, managed):
    return _h("host").facet(
        facet, state, paths, managed, salt=__salt__, conf_dir=os.path.dirname(__opts__["conf_file"])
    )


def plan(facet=None, pillar=None):
    """The changes an apply would make now, per facet (nothing is changed).

    CLI example::

        salt compute1 hanet.plan
        salt compute1 hanet.plan dnsmasq
    """
    state = _desired(pillar)
    paths = _paths()
    managed = _h("common").Managed(paths)
    return {f: [str(c) for c in _facet(f, state, paths, managed)[0]] for f in ([facet] if facet else _h("host").FACETS)}


def apply_facet(facet, pillar=None, test=False):
    """Bring one facet of this host to the desired state. Returns
    ``{facet, changes: [...], test}``; with ``test=True`` only what would change.
    Raises PillarInvalid (nothing changed) when the pillar has problems.

    CLI example::

        salt compute1 hanet.apply_facet links
    """
    state = _desired(pillar)
    paths = _paths()
    paths.ensure()
    if not test:  # the data plane is (being) made from this pillar: the failover path's copy
        _keep_applied(pillar)
    changes, run = _facet(facet, state, paths, _h("common").Managed(paths))
    if test or not changes:
        return {"facet": facet, "changes": [str(c) for c in changes], "test": bool(test)}
    done = run()
    return {"facet": facet, "changes": list(done) if done else [str(c) for c in changes], "test": False}


def garp(ip, interface=None, count=None):
    """Send gratuitous ARP for ``ip`` (default interface: the link that holds it; default
    count: the pillar's ``send_arp_for_ha_count``, else 3).

    CLI example::

        salt compute1 hanet.garp 192.168.0.3
        salt compute1 hanet.garp 203.0.113.50 eth0 5
    """
    if count is None:
        count = (__pillar__.get("hanet") or {}).get("send_arp_for_ha_count", 3)
    return _h("arp").garp(ip, interface, int(count))


def status():
    """What this host holds now: per network its bridge, addresses, whether it is the
    active gateway, its dnsmasq pid and lease/host counts; its floating IPs; the
    ruleset's handle; the liveness beacon's view of its peers.

    CLI example::

        salt compute1 hanet.status
    """
    paths = _paths()
    try:
        state, cfg, problems = _desired(), _config(), []
    except PillarInvalid as err:
        state, cfg, problems = None, None, str(err).splitlines()[1:]
    out = _h("host").status(__opts__["id"], state, cfg, paths, _h("liveness").read_view(paths))
    out["problems"] = problems + out["problems"]
    return out


def version():
    """hanet's version on this host, and where Salt loads it from: ``installed`` when it
    comes from the pip-installed extension (``saltext_hanet``), else the synced copy in
    the minion's extmods (or a checkout). A synced copy shadows an installed one.

    CLI example::

        salt '*' hanet.version
    """
    installed = os.path.basename(os.path.dirname(_HERE)) == "saltext_hanet"
    _h("common")  # the library, loaded the one way (its package carries the version)
    return {"version": sys.modules["_hanet"].VERSION, "source": _HERE, "installed": installed}


def metrics(write=True):
    """This host's Prometheus metrics (text exposition format): what it holds (gateways,
    floating IPs, leases, daemons, the ruleset), its beacon's view of its peers, and
    what it counted (takeovers and their duration, GARPs, relinquishes, fences, daemon
    restarts). With ``write`` (the default) also written, for node_exporter's textfile
    collector, to ``<root_dir>/<metrics_textfile_dir>/hanet.prom`` (pillar
    ``metrics_textfile_dir``, default ``/var/lib/hanet/metrics``; ``''``: no file). The
    liveness beacon writes it every few seconds. Names and labels: docs/metrics.md.

    CLI example::

        salt compute1 hanet.metrics
    """
    paths = _paths()
    try:
        cfg = _config(last_known=True)
    except PillarInvalid:
        cfg = None
    return _h("host").write_metrics(__opts__["id"], paths, cfg, None, status(), write=write)


def serving():
    """What this host holds of the network-host networks it serves or stands by for,
    the epochs it knows, and its liveness beacon's view of its peers (the master's
    reconcile loop asks it).

    CLI example::

        salt net2 hanet.serving
    """
    paths = _paths()
    return _h("host").serving(__opts__["id"], _config(), _records(), _h("liveness").read_view(paths))


# --------------------------------------------------------------------------- failover


def _takeover_context():
    def fire(tag, data):
        _h("events").send(__opts__, tag, data)

    return _h("takeover").Context(
        me=__opts__["id"],
        cfg=_config(last_known=True),
        paths=_paths(),
        owners=_records,
        fire=fire,
        memo=__context__.setdefault("hanet.takeover.desired", {}),
    )


def prepare():
    """Compute ahead what a takeover order would need here (the validated model, and the
    desired state of each network-host network this host stands by for, with this host
    as its owner), kept in the running minion, so that the order only binds. The
    liveness beacon of a network host calls it on every poll; it costs a fingerprint of
    the pillar while nothing changed. Returns the networks prepared.

    CLI example::

        salt net2 hanet.prepare
    """
    return _h("takeover").prepare(_takeover_context())


def takeover(
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
    """Become the holder of network-host network ``network`` at ``epoch`` (ordered by
    the master after a confirmed failure, or for a planned move): probe the gateway
    (duplicate address detection; skipped when planned), record the new owner, bind the
    gateway and the network's floating IPs, announce them with gratuitous ARP on both
    sides, start dnsmasq with the same host entries, and fire
    ``hanet/failover/<network>/complete`` (or ``/failed`` with a reason). ``decision``
    (the master's stamps) is passed through into the ``complete`` event. The beacon
    calls it with ``warm=True`` (bind and announce only) and ``prechecked`` (its own
    probe of the gateway); see ``_hanet/takeover.py``. ``handover``: the old owner is
    alive and was told to let go (its health said it cannot serve the network): wait for
    the gateway to fall silent before binding. ``heard_at``: when the beacon heard
    the order (a stamp in the ``complete`` event's timings, ``heard_s``; or a list of
    ``[name, time]`` stamps of the beacon's steps, the first when it heard it; the
    call's own entry is added as ``entered``), ``heard_via``
    how (``direct``: the master's datagram; ``publication``), also in the event.

    CLI example::

        salt net2 hanet.takeover shared 7 previous=net1
    """
    if heard_at:
        pre = list(heard_at) if isinstance(heard_at, (list, tuple)) else [("heard", heard_at)]
        heard_at = pre + [("entered", time.time())]
    return _h("takeover").run(
        _takeover_context(),
        network,
        epoch,
        previous=previous,
        detected_at=detected_at,
        planned=planned,
        decision=decision,
        warm=warm,
        prechecked=prechecked,
        handover=handover,
        heard_at=heard_at,
        heard_via=heard_via,
    )


def relinquish(network, epoch, owner):
    """Give up network ``network`` to ``owner`` (the master's record at ``epoch``):
    unbind the gateway and the network's floating IPs and stop its dnsmasq; keep the
    hot-standby rules. An order older than what this host knows changes nothing.

    CLI example::

        salt net1 hanet.relinquish shared 8 net2
    """
    return _h("takeover").relinquish(_takeover_context(), network, epoch, owner)


def announce(rounds=None):
    """Announce again (gratuitous ARP, ``rounds`` rounds, default 3) the gateway and
    floating IPs of every network this host serves. The beacon calls it when a peer comes
    back after a partition, and every ``ha:garp_refresh_s`` seconds (one round) when set.

    CLI example::

        salt net1 hanet.announce
    """
    tk = _h("takeover")
    return tk.announce(_takeover_context(), tk.GARP_MIN if rounds is None else int(rounds))


def fence():
    """Stop answering for every network-host network this host serves (its gateway,
    floating IPs and dnsmasq go, its configuration stays), until the master orders it to
    take them again. The beacon calls it when this host has lost its peers, the master
    and its next hop at once (docs/faults.md).

    CLI example::

        salt-call hanet.fence
    """
    return _h("takeover").fence(_takeover_context())


def owners():
    """The failover record as this host sees it: {network: {owner, epoch}}.

    CLI example::

        salt '*' hanet.owners
    """
    return _records()
