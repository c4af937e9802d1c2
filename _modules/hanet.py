"""hanet execution module: what this host holds, and the functions the hanet states call.

The work is done by the ``_hanet`` library that ships beside this module: a pure core
(``model``: pillar -> validated model, ``desired``: model -> this host's desired state,
each applier's ``plan``: desired + current -> changes) and the appliers that touch the
kernel (``links``, ``sysctls``), the ruleset (``ruleset``), and the daemons (``dnsmasq``,
``metadata``). This module only wires them to Salt: pillar in, changes out.

CLI examples::

    salt '*' hanet.validate
    salt compute1 hanet.desired
    salt compute1 hanet.plan
    salt compute1 hanet.status
    salt compute1 hanet.garp 192.168.0.3 br100 3
"""
import importlib
import logging
import os
import sys

log = logging.getLogger(__name__)

__virtualname__ = "hanet"

# The order in which facets are applied: links before the addresses dnsmasq binds,
# the ruleset before the daemons start answering.
FACETS = ("links", "sysctls", "ruleset", "floating", "dnsmasq", "metadata", "liveness", "startup")
STARTUP_CONF = """# Written by hanet (salt://hanet): at start-up this minion applies the hanet state, which
# consults the master's failover record before it binds any address it may no longer own.
startup_states: sls
sls_list:
  - hanet
"""

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
    """The ``_hanet.<name>`` library module. The minion's main process preloads the
    library for fast failover and every job is forked from there, so after a
    ``saltutil.sync_all`` changed any of its files the whole library is imported afresh
    (all of it at once: its modules share dataclasses)."""
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
    seen = getattr(mod, "_hanet_mtime", None)
    if seen is not None and seen != mtime:
        mod = importlib.reload(mod)
    mod._hanet_mtime = mtime  # pylint: disable=protected-access
    return mod


def __virtual__():
    try:
        import pyroute2  # noqa: F401
        import netaddr  # noqa: F401
    except ImportError as err:
        return False, f"hanet needs {err.name} (see hanet's README: requirements.txt)"
    return __virtualname__


class PillarInvalid(Exception):
    """The hanet pillar has problems; str() lists every one with its pillar path."""


def _lib():
    _h("desired")
    _h("model")
    return sys.modules["_hanet"]


def _paths():
    return _h("common").Paths(root_dir=__opts__.get("root_dir", "/"))


def _pillar_key(pillar):
    """An exact fingerprint of a pillar value (pickle keeps key types and True vs 1 apart),
    or None when it cannot be taken (then nothing is cached)."""
    import hashlib
    import pickle

    try:
        return hashlib.sha256(pickle.dumps(pillar, protocol=4)).hexdigest()
    except Exception:  # noqa: BLE001  unpicklable: just do not cache
        return None


def _cached(name, key, make):
    """``make()``, remembered in ``__context__`` under ``name`` for ``key`` (one entry).

    A state run calls hanet once per facet, each time with the same pillar; loading and
    validating a pillar of 1,000 instances costs 0.15 s or more, so it is done once per
    run. ``__context__`` lives as long as the run's loader; the key is the content, so a
    changed pillar or failover record is never served stale."""
    if key is None:
        return make()
    slot = __context__.get(name)  # noqa: F821
    if slot is not None and slot[0] == key:
        value = slot[1]
    else:
        try:
            value = make()
        except Exception as err:  # noqa: BLE001  an invalid pillar stays invalid: cache that too
            value = err
        __context__[name] = (key, value)  # noqa: F821
    if isinstance(value, Exception):
        raise value
    return value


def _config(pillar=None):
    """The validated model of ``pillar`` (default: this minion's ``hanet`` pillar)."""
    lib = _lib()
    if pillar is None:
        pillar = __pillar__.get("hanet", {})  # noqa: F821

    def load():
        try:
            return lib.model.load(pillar)
        except lib.model.PillarError as err:
            raise PillarInvalid(err.render()) from err

    return _cached("hanet.config", _pillar_key(pillar), load)


def _read_json(path):
    import json

    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (FileNotFoundError, ValueError):
        return None


def _records():
    """The failover record, {network: {owner, epoch}}: the master's (pillar
    ``hanet_owners``, from hanet's ext_pillar) and this host's own copy (written by
    takeover/relinquish); per network the higher epoch wins, so a host that was down
    while its network moved learns so from the master before it binds anything."""
    pill = __pillar__.get("hanet_owners") or {}  # noqa: F821
    local = _read_json(_paths().state("owners.json")) or {}
    out = {}
    for net in set(pill) | set(local):
        cands = [r for r in (pill.get(net), local.get(net))
                 if isinstance(r, dict) and isinstance(r.get("owner"), str)]
        if cands:
            out[net] = max(cands, key=lambda r: r.get("epoch", 0))
    return out


def _owners():
    """Who holds each network-host network now, by the failover record."""
    return {net: r["owner"] for net, r in _records().items()}


def _write_record(network, owner, epoch):
    import json

    common = _h("common")
    paths = _paths()
    rec = _read_json(paths.state("owners.json")) or {}
    rec[network] = {"owner": owner, "epoch": int(epoch)}
    common.write_atomic(paths.state("owners.json"), json.dumps(rec, sort_keys=True) + "\n")


def _desired(pillar=None):
    cfg = _config(pillar)
    owners = _owners()
    # cfg itself in the key: the same object compares by identity (fast), and holding it
    # keeps a new Config from ever being mistaken for it
    key = (cfg, __opts__["id"], tuple(sorted(owners.items())))  # noqa: F821
    return _cached("hanet.desired", key,
                   lambda: _lib().desired.compute(cfg, __opts__["id"], owners))  # noqa: F821


def links():
    """The network links of this host (this network namespace), by name.

    CLI example::

        salt '*' hanet.links
    """
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return sorted(link.get_attr("IFLA_IFNAME") for link in ipr.get_links())


def validate(pillar=None):
    """Validate the hanet pillar: ``{valid: True}`` or ``{valid: False, problems: [...]}``
    with every problem and its pillar path.

    CLI example::

        salt '*' hanet.validate
    """
    lib = _lib()
    try:
        _config(pillar)  # cached: the facets that follow in a state run reuse it
    except PillarInvalid as err:
        cause = err.__cause__
        if isinstance(cause, lib.model.PillarError):
            return {"valid": False, "problems": [f"{p}: {m}" for p, m in cause.problems]}
        raise
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
    """(plan, runner) for one facet: ``plan`` lists the changes, ``runner()`` makes them."""
    dnsmasq, floating, links_, metadata, ruleset, sysctls = (
        _h(n) for n in ("dnsmasq", "floating", "links", "metadata", "ruleset", "sysctls"))

    if facet == "links":
        bridges = links_.drop_local_remotes(state.bridges, links_.local_addresses())
        cur = links_.current(bridges, managed.get("links"))
        changes = links_.plan(bridges, cur, managed.get("links"))
        return changes, lambda: links_.apply(changes, managed)
    if facet == "sysctls":
        cur = sysctls.current([k for k, _ in state.sysctls])
        changes = sysctls.plan(state.sysctls, cur)
        return changes, lambda: sysctls.apply(changes)
    if facet == "ruleset":
        cur = ruleset.current(state.ruleset, paths)
        changes = ruleset.plan(state.ruleset, cur)
        return changes, lambda: ruleset.apply(changes, paths, managed)
    if facet == "floating":
        cur = floating.current(managed.get("floating"), state.floating_ips)
        changes = floating.plan(state.floating_ips, cur)
        return changes, lambda: floating.apply(changes, managed, state.garp_count)
    if facet == "dnsmasq":
        cur = dnsmasq.current(paths, managed)
        changes = dnsmasq.plan(state.dnsmasqs, cur)
        return changes, lambda: dnsmasq.apply(changes, paths, managed)
    if facet == "metadata":
        cur = metadata.current(paths, managed)
        changes = metadata.plan(state.metadata, cur, state.instances)
        return changes, lambda: metadata.apply(changes, paths, managed)
    if facet == "liveness":
        return _liveness_plan(state)
    if facet == "startup":
        return _startup_plan(state)
    raise ValueError(f"unknown facet {facet!r}; one of {', '.join(FACETS)}")


def _beacon_config(state):
    """The hanet_liveness beacon's configuration for this host, or None. A network host
    (serving or standing by) also listens for takeover orders (``orders``)."""
    if not state.liveness:
        return None
    out = [
        {"peers": {peer: [list(t) for t in targets] for peer, targets in state.liveness}},
        {"interval_ms": state.probe[0]},
        {"misses": state.probe[1]},
        {"rise": max(3, state.probe[1])},
    ]
    if state.orders:
        out.append({"orders": True})
    if state.standby_for:
        out.append({"standby_for": {peer: [list(t) for t in targets]
                                    for peer, targets in state.standby_for}})
    return out


def _liveness_plan(state):
    Change = _h("common").Change
    want = _beacon_config(state)
    have = (__salt__["beacons.list"](return_yaml=False, include_pillar=False) or {}).get(  # noqa: F821
        "hanet_liveness")
    if want == have:
        return [], None
    if want is None:
        changes = [Change("liveness", "remove", "hanet_liveness beacon")]
    else:
        peers = ", ".join(p for p, _ in state.liveness)
        changes = [Change("liveness", "configure" if have is None else "update",
                          f"hanet_liveness beacon watching {peers}")]

    def run():
        if want is None:
            res = __salt__["beacons.delete"]("hanet_liveness")  # noqa: F821
        elif have is None:
            res = __salt__["beacons.add"]("hanet_liveness", want)  # noqa: F821
        else:
            res = __salt__["beacons.modify"]("hanet_liveness", want)  # noqa: F821
        if not res.get("result"):
            raise RuntimeError(f"beacon: {res.get('comment')}")
        saved = __salt__["beacons.save"]()  # noqa: F821
        if not saved.get("result"):
            raise RuntimeError(f"beacon save: {saved.get('comment')}")
        return [str(c) for c in changes]

    return changes, run


def _startup_plan(state):
    Change = _h("common").Change
    path = os.path.join(os.path.dirname(__opts__["conf_file"]), "minion.d", "hanet.conf")  # noqa: F821
    want = STARTUP_CONF if state.bridges or state.liveness else None
    try:
        with open(path, encoding="utf-8") as fh:
            have = fh.read()
    except FileNotFoundError:
        have = None
    if want == have:
        return [], None
    if want is None:
        return [Change("startup", "remove", path)], lambda: os.unlink(path) or [f"removed {path}"]

    def run():
        _h("common").write_atomic(path, want)
        return [f"wrote {path}: apply hanet at start-up"]

    return [Change("startup", "write", path)], run


def plan(facet=None, pillar=None):
    """The changes an apply would make now, per facet (nothing is changed).

    CLI example::

        salt compute1 hanet.plan
        salt compute1 hanet.plan dnsmasq
    """
    Managed = _h("common").Managed

    state = _desired(pillar)
    paths = _paths()
    managed = Managed(paths)
    out = {}
    for f in ([facet] if facet else FACETS):
        changes, _ = _facet(f, state, paths, managed)
        out[f] = [str(c) for c in changes]
    return out


def apply_facet(facet, pillar=None, test=False):
    """Bring one facet of this host to the desired state. Returns
    ``{facet, changes: [...], test}``; with ``test=True`` only what would change.
    Raises PillarInvalid (nothing changed) when the pillar has problems.

    CLI example::

        salt compute1 hanet.apply_facet links
    """
    Managed = _h("common").Managed

    state = _desired(pillar)
    paths = _paths()
    paths.ensure()
    managed = Managed(paths)
    changes, run = _facet(facet, state, paths, managed)
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
    arp = _h("arp")

    if count is None:
        count = (__pillar__.get("hanet") or {}).get("send_arp_for_ha_count", 3)  # noqa: F821
    return arp.garp(ip, interface, int(count))


def status():
    """What this host holds now: per network its bridge, addresses, whether it is the
    active gateway, its dnsmasq pid and lease/host counts; its floating IPs; the
    ruleset's handle; the liveness beacon's view of its peers.

    CLI example::

        salt compute1 hanet.status
    """
    from pyroute2 import IPRoute

    dnsmasq, ruleset = _h("dnsmasq"), _h("ruleset")

    paths = _paths()
    out = {"host": __opts__["id"], "networks": {}, "floating_ips": [], "problems": []}
    try:
        state = _desired()
    except PillarInvalid as err:
        out["problems"] = str(err).splitlines()[1:]
        state = None
    daemons = dnsmasq.status(paths)
    with IPRoute() as ipr:
        held = {}
        for a in ipr.get_addr(family=2):
            name = ipr.get_links(a["index"])[0].get_attr("IFLA_IFNAME")
            held.setdefault(name, []).append(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}")
    if state is not None:
        roles = dict(state.roles)
        cfg = _config()
        for br in state.bridges:
            net = cfg.networks[br.network]
            addrs = held.get(br.name, [])
            gw = f"{net.gateway}/{net.prefixlen}" if net.gateway else None
            out["networks"][br.network] = {
                "bridge": br.name,
                "present": br.name in held or _link_exists(br.name),
                "addresses": addrs,
                "role": roles.get(br.network),
                "active_gateway": (not net.multi_host and not net.hardware and gw in addrs)
                or (net.multi_host and roles.get(br.network) == "serving" and not net.hardware),
                "dnsmasq": daemons.get(br.network),
            }
        public = {h.public_interface for h in cfg.hosts.values()}
        fl = {f.address for f in state.floating_ips}
        for ifname in public:
            for a in held.get(ifname, []):
                if a.split("/")[0] in fl:
                    out["floating_ips"].append({"address": a.split("/")[0], "interface": ifname})
    out["ruleset"] = ruleset.handle(paths)
    out["peers"] = _peers(paths)
    return out


def _link_exists(name):
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return bool(ipr.link_lookup(ifname=name))


def _peers(paths):
    """The liveness beacon's last view of its peers (written by the beacon)."""
    import json

    try:
        with open(paths.run("liveness.json"), encoding="utf-8") as fh:
            return json.load(fh)
    except (FileNotFoundError, ValueError):
        return {}


# --------------------------------------------------------------------------- failover


def _fire(tag, data):
    _h("events").send(__opts__, tag, data)  # noqa: F821


def _apply_now(facets, state, paths, managed, garp=0):
    done = {}
    for facet in facets:
        changes, run = _facet(facet, state, paths, managed)
        if facet == "floating":  # takeover announces every moved address itself
            fl = _h("floating")
            run = (lambda ch=changes: fl.apply(ch, managed, garp)) if changes else None
        if changes and run:
            done[facet] = run() or [str(c) for c in changes]
    return done


PRECHECK_FRESH_S = 1.0  # how old the beacon's clear probe of a gateway may be


class _TakeoverSlot:
    """One takeover of ``network`` at a time on this host (an exclusive lock), and what
    the last one did (``run/hanet/takeover-<network>.json``: epoch, outcome, marks,
    moved addresses), so that the warm path and the job of the same order cooperate:
    whichever comes first binds, the job finishes (DHCP, metadata, the event)."""

    def __init__(self, paths, network):
        import fcntl

        os.makedirs(paths.run_dir, exist_ok=True)
        self._fcntl = fcntl
        self.path = paths.run(f"takeover-{network}.json")
        self._lock = open(paths.run(f"takeover-{network}.lock"), "w", encoding="utf-8")

    def __enter__(self):
        self._fcntl.flock(self._lock, self._fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        self._fcntl.flock(self._lock, self._fcntl.LOCK_UN)
        self._lock.close()

    def read(self, epoch):
        got = _read_json(self.path)
        return got if isinstance(got, dict) and got.get("epoch") == int(epoch) else None

    def write(self, **record):
        import json

        _h("common").write_atomic(self.path, json.dumps(record, sort_keys=True) + "\n")


def _bind_moved(net, network, state, managed):
    """Bind what moves, and only that: the gateway on the network's bridge and the
    network's floating IPs, as the links and floating planners would (the same changes,
    recorded the same way), without reading the rest of the host first; the full
    facets run after the announcement."""
    common, links, floating = _h("common"), _h("links"), _h("floating")
    bridge = next((b for b in state.bridges if b.name == net.bridge), None)
    gw = next((a for a in (bridge.addresses if bridge else ()) if a.split("/")[0] == net.gateway), None)
    if gw is None:
        raise RuntimeError(f"the desired state does not put {net.gateway} on {net.bridge}")
    done = {"links": links.apply([common.Change("links", "add", f"{net.bridge} {gw}",
                                                {"link": net.bridge, "address": gw})], managed)}
    binds = [common.Change("floating", "bind", f.address, {"interface": f.public_interface})
             for f in state.floating_ips if f.network == network]
    if binds:
        done["floating"] = floating.apply(binds, managed, 0)
    return {k: v for k, v in done.items() if v}


def takeover(network, epoch, previous=None, detected_at=None, planned=False, decision=None,
             warm=False, prechecked=None):
    """Become the holder of network-host network ``network`` (called by the hanet
    runner after a confirmed failure, or for a planned move): record the new owner,
    probe the gateway address (duplicate address detection; skipped when planned, as
    the old owner still holds it until the new one has announced it), bind the gateway
    and the network's floating IPs, announce every moved address with gratuitous ARP on
    both sides, start dnsmasq with the same host entries, and fire
    ``hanet/failover/<network>/complete`` (or ``/failed`` with a reason). ``decision``
    (the master's stamps: when it received the liveness event, confirmed the failure and
    published this job) is passed through into the ``complete`` event.

    The hanet_liveness beacon of a network host hears the same order on the minion's
    publish channel and calls this with ``warm=True`` in the minion's running process:
    that binds and announces only (no job process to fork, nothing to load), while the
    job, which arrives a little later, finds the addresses bound and does the rest.
    The beacon probes the gateway the moment it sees the peer down, while the master
    decides; ``prechecked`` ({ip: [at, holder or None]}) hands that result over, and a
    clear probe younger than a second stands for the probe here.

    CLI example::

        salt net2 hanet.takeover shared 7 previous=net1
    """
    import time

    t_call = time.time()
    me = __opts__["id"]  # noqa: F821
    tag = f"hanet/failover/{network}"
    base = {"network": network, "from": previous, "to": me, "epoch": int(epoch),
            "detected_at": detected_at, "planned": bool(planned)}
    if isinstance(decision, dict):
        base["decision"] = decision
    paths = _paths()
    with _TakeoverSlot(paths, network) as slot:
        prior = slot.read(epoch)
        if prior and prior.get("outcome") == "complete":
            return prior["data"]  # the other path of the same order did everything
        if warm and prior:
            return {"network": network, "epoch": int(epoch), "outcome": prior.get("outcome")}
        bound = prior if prior and prior.get("outcome") == "bound" else None
        marks = [tuple(m) for m in bound["marks"]] if bound else [("start", t_call)]

        def mark(what):
            marks.append((what, time.time()))

        moved = [tuple(m) for m in bound["moved"]] if bound else []
        done = {}
        try:
            cfg = _config()
            net = cfg.networks.get(network)
            if net is None or net.multi_host or me not in net.network_hosts:
                raise ValueError(f"{me} is not a network host of {network!r}")
            managed = _h("common").Managed(paths)
            if not bound:
                mark("config")
                pre = (prechecked or {}).get(net.gateway)
                if planned:
                    pass
                elif isinstance(pre, (list, tuple)) and len(pre) == 2 and pre[1] is None \
                        and 0 <= time.time() - float(pre[0]) < PRECHECK_FRESH_S:
                    mark("dad")  # probed by the beacon while the master decided: nobody answered
                else:
                    # the master has confirmed the failure; this is the last guard: a live
                    # holder's kernel answers an ARP request on the segment at once
                    arp = _h("arp")
                    holder = arp.probe(net.gateway, net.bridge, timeout=arp.DAD_TIMEOUT_S, tries=1)
                    mark("dad")
                    if holder:
                        raise RuntimeError(f"gateway {net.gateway} is still answered by {holder} "
                                           f"on {net.bridge}: not binding it (duplicate address)")
                _write_record(network, me, epoch)
                state = _lib().desired.compute(cfg, me, _owners())
                mark("desired")
                done = _bind_moved(net, network, state, managed)
                mark("bound")
                moved = [(net.gateway, net.bridge)] + [
                    (f.address, f.public_interface) for f in state.floating_ips if f.network == network]
                _h("arp").garp_many(moved, max(state.garp_count, 3))
                mark("announced")
                for facet, msgs in _apply_now(("links", "floating"), state, paths, managed).items():
                    done[facet] = done.get(facet, []) + list(msgs)  # anything else still missing
                if warm:
                    slot.write(epoch=int(epoch), outcome="bound", marks=marks, moved=moved,
                               by="warm")
                    return {"network": network, "epoch": int(epoch), "outcome": "bound",
                            "timings": {f"{w}_s": round(at - marks[0][1], 4) for w, at in marks[1:]}}
            else:
                _write_record(network, me, epoch)
                state = _lib().desired.compute(cfg, me, _owners())
                # bound by the warm path: make sure of it (no change when it is)
                done = _apply_now(("links", "floating"), state, paths, managed)
            done.update(_apply_now(("dnsmasq", "metadata"), state, paths, managed))
            mark("dhcp")
        except Exception as err:  # report, then let the caller see it too
            if warm:  # the job of the same order tries again and reports
                raise
            _fire(f"{tag}/failed", dict(base, reason=str(err), failed_at=time.time()))
            slot.write(epoch=int(epoch), outcome="failed", reason=str(err))
            raise
        t0 = marks[0][1]
        data = dict(base, completed_at=time.time(), addresses=[ip for ip, _ in moved],
                    timings={f"{what}_s": round(at - t0, 4) for what, at in marks[1:]},
                    bound_by="warm" if bound else "job", changes=done)
        slot.write(epoch=int(epoch), outcome="complete", data=data)
    _fire(f"{tag}/complete", data)
    return data


def relinquish(network, epoch, owner):
    """Give up network ``network`` to ``owner`` (the runner's record at ``epoch``):
    unbind the gateway and the network's floating IPs and stop its dnsmasq; keep the
    hot-standby rules.

    CLI example::

        salt net1 hanet.relinquish shared 8 net2
    """
    _write_record(network, owner, epoch)
    paths = _paths()
    managed = _h("common").Managed(paths)
    state = _desired()
    return _apply_now(("links", "floating", "dnsmasq", "metadata"), state, paths, managed)


def owners():
    """The failover record as this host sees it: {network: {owner, epoch}}.

    CLI example::

        salt '*' hanet.owners
    """
    return _records()
