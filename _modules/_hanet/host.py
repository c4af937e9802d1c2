"""This host's facets, in the order they are applied, and what the host holds now.

Each facet pairs an applier's ``current`` (read the host), ``plan`` (pure: desired +
current -> changes) and ``apply`` (make exactly those changes). ``facet`` returns
``(changes, run)`` for one of them; the execution module, the states and the takeover
all go through it. Two facets configure Salt itself rather than the kernel: the
``hanet_liveness`` beacon (``liveness``) and the minion's start-up highstate
(``startup``); for them the caller hands in Salt's functions (``salt``: the
``__salt__`` mapping) and the minion's config directory.
"""

from __future__ import annotations

import os
import time

from . import conntrackd, dnsmasq, floating, links, metadata, metrics, ruleset, sysctls
from .common import Change, write_atomic
from .failover import BEACON

# The order in which facets are applied: links before the addresses dnsmasq binds,
# the ruleset before the daemons start answering.
FACETS = ("links", "sysctls", "ruleset", "floating", "conntrackd", "dnsmasq", "metadata", "liveness", "startup")
STARTUP_CONF = """# Written by hanet (salt://hanet): at start-up this minion applies the hanet state, which
# consults the master's failover record before it binds any address it may no longer own.
startup_states: sls
sls_list:
  - hanet
"""


def facet(name, state, paths, managed, salt=None, conf_dir=None):
    """(changes, run) for facet ``name``: ``changes`` lists what would change,
    ``run()`` makes those changes and returns what it did."""
    if name == "links":
        bridges = links.drop_local_remotes(state.bridges, links.local_addresses())
        cur = links.current(
            bridges, managed.get("links"), carried=managed.get(links.CARRIED), floating=managed.get("floating")
        )
        changes = links.plan(bridges, cur, managed.get("links"))
        guarded = {(br.name, a) for br in bridges for a in br.guarded}
        return changes, lambda: apply_links(changes, guarded, managed, state.garp_count)
    if name == "sysctls":
        cur = sysctls.current([k for k, _ in state.sysctls])
        changes = sysctls.plan(state.sysctls, cur)
        return changes, lambda: sysctls.apply(changes)
    if name == "ruleset":
        cur = ruleset.current(state.ruleset, paths)
        changes = ruleset.plan(state.ruleset, cur)
        return changes, lambda: ruleset.apply(changes, paths, managed)
    if name == "floating":
        cur = floating.current(managed.get("floating"), state.floating_ips)
        changes = floating.plan(state.floating_ips, cur)
        return changes, lambda: floating.apply(changes, managed, state.garp_count)
    if name == "conntrackd":
        sync = state.conntrack_sync
        changes = conntrackd.plan(sync, conntrackd.current(paths), conntrackd.desired_text(sync, paths))
        return changes, lambda: conntrackd.apply(changes, paths, sync)
    if name == "dnsmasq":
        cur = dnsmasq.current(paths, managed)
        changes = dnsmasq.plan(state.dnsmasqs, cur)
        return changes, lambda: dnsmasq.apply(changes, paths, managed)
    if name == "metadata":
        cur = metadata.current(paths, managed)
        changes = metadata.plan(state.metadata, cur, state.instances)
        return changes, lambda: metadata.apply(changes, paths, managed)
    if name == "liveness":
        return _liveness(state, salt, paths)
    if name == "startup":
        return _startup(state, conf_dir)
    raise ValueError(f"unknown facet {name!r}; one of {', '.join(FACETS)}")


def apply_links(changes, guarded, managed, garp_count=0):
    """``links.apply`` with duplicate address detection: an address in ``guarded``
    ({(link, "ip/len")}: a gateway that moves between hosts) is added last, and only when
    no other host answers ARP for it on that link. So an apply (the start-up highstate of
    a host that was cut off, a record that is behind) never makes a second holder; the
    master's reconcile loop settles who serves. A link that cannot send (no carrier, no
    port) reaches nobody who could hold the address, and the address is bound.
    ``garp_count`` (nova's ``send_arp_for_ha_count``; 0 when ``send_arp_for_ha`` is off):
    the gateways bound here are announced with that many gratuitous ARP rounds, as a
    takeover announces them, so neighbours that learnt another MAC for them meanwhile
    learn this host's."""
    from . import arp

    later = [c for c in changes if c.action == "add" and (c.detail.get("link"), c.detail.get("address")) in guarded]
    done = links.apply([c for c in changes if c not in later], managed)
    refused, bound = [], []
    for change in later:
        ip, link = change.detail["address"].split("/")[0], change.detail["link"]
        try:
            holder = arp.probe(ip, link, timeout=arp.DAD_TIMEOUT_S, tries=2)
        except OSError:
            holder = None
        if holder:
            refused.append(f"{ip} on {link} is answered by {holder}")
        else:
            done += links.apply([change], managed)
            bound.append((ip, link))
    if bound and garp_count:
        try:
            arp.garp_many(bound, garp_count)
            done += [f"announced {ip} on {link} ({garp_count} gratuitous ARP rounds)" for ip, link in bound]
        except OSError as err:  # bound all the same: the next announcement (refresh, peer back) tells them
            done += [f"could not announce {ip} on {link}: {err}" for ip, link in bound]
    if refused:
        raise RuntimeError(
            "not bound (duplicate address detection; the master's reconcile loop "
            "decides who serves): " + "; ".join(refused)
        )
    return done


def apply_now(names, state, paths, managed, garp=0):
    """Apply facets ``names`` now; {facet: [what was done]} for those that changed.
    ``garp``: gratuitous ARPs per floating IP bound (a takeover announces itself: 0)."""
    done = {}
    for name in names:
        changes, run = facet(name, state, paths, managed)
        if name == "floating" and changes:

            def run(ch=changes):
                return floating.apply(ch, managed, garp)

        if changes and run:
            done[name] = run() or [str(c) for c in changes]
    return done


# --------------------------------------------------------------------------- the beacon


def beacon_config(state):
    """The hanet_liveness beacon's configuration for this host, or None. A network host
    (serving or standing by) also listens for takeover orders (``orders``); a standby
    names what it would take over from each peer (``standby_for``); a host that runs
    dnsmasq or the metadata service has them restarted when they die (``supervise``)."""
    supervise = bool(state.dnsmasqs or (state.metadata is not None and state.metadata.local_service))
    if not state.liveness and not supervise and not state.follow:
        return None
    out = [
        {"peers": {peer: [list(t) for t in targets] for peer, targets in state.liveness}},
        {"interval_ms": state.probe.interval_ms},
        {"misses": state.probe.misses},
        {"rise": state.probe.rise},
    ]
    if state.report_port and state.liveness:
        out.append({"report_port": state.report_port})
    if state.orders:
        out.append({"orders": True})
        if state.garp_refresh_s:
            out.append({"garp_refresh_s": state.garp_refresh_s})
        if state.order_port:
            out.append({"order_port": state.order_port})
    if supervise:
        out.append({"supervise": True})
    if state.standby_for:
        out.append({"standby_for": {peer: [list(t) for t in targets] for peer, targets in state.standby_for}})
    if state.health_segments:
        out.append({"health": {"uplink": state.health_uplink, "segments": {n: i for n, i in state.health_segments}}})
    if state.follow:
        out.append({"follow": [list(t) for t in state.follow]})
    return out


def _liveness(state, salt, paths):
    want = beacon_config(state)
    have = (salt["beacons.list"](return_yaml=False, include_pillar=False) or {}).get(BEACON)
    if want == have:
        return [], None
    if want is None:
        changes = [Change("liveness", "remove", f"{BEACON} beacon")]
    else:
        peers = ", ".join(p for p, _ in state.liveness)
        changes = [Change("liveness", "configure" if have is None else "update", f"{BEACON} beacon watching {peers}")]

    def run():
        if want is None:
            res = salt["beacons.delete"](BEACON)
            metrics.host_store(paths).forget()  # the beacon wrote the metrics file
        elif have is None:
            res = salt["beacons.add"](BEACON, want)
        else:
            res = salt["beacons.modify"](BEACON, want)
        if not res.get("result"):
            raise RuntimeError(f"beacon: {res.get('comment')}")
        saved = salt["beacons.save"]()
        if not saved.get("result"):
            raise RuntimeError(f"beacon save: {saved.get('comment')}")
        if not state.follow:  # no owner to follow any more: what the watch learnt goes too
            from . import follow

            follow.forget(paths)
        return [str(c) for c in changes]

    return changes, run


def _startup(state, conf_dir):
    path = os.path.join(conf_dir, "minion.d", "hanet.conf")
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
        write_atomic(path, want)
        return [f"wrote {path}: apply hanet at start-up"]

    return [Change("startup", "write", path)], run


# --------------------------------------------------------------------------- status


def status(host, state, cfg, paths, peers):
    """What this host holds now (``hanet.status``); ``state``/``cfg`` None when the
    pillar is invalid (then only what runs is reported)."""
    out = {"host": host, "networks": {}, "floating_ips": [], "problems": [], "time": time.time()}
    daemons = dnsmasq.status(paths)
    held = links.addresses_by_link()
    if state is not None:
        roles = dict(state.roles)
        present = set(links.link_names())
        for br in state.bridges:
            net = cfg.networks[br.network]
            addrs = held.get(br.name, [])
            role = roles.get(br.network)
            out["networks"][br.network] = {
                "bridge": br.name,
                "present": br.name in present,
                "addresses": addrs,
                "role": role,
                # a network-host network: the owner holds its service address (the
                # gateway, or on a hardware network the dhcp_server that moves)
                "active_gateway": net.service_cidr in addrs
                if not net.multi_host
                else not net.hardware and role == "serving",
                "dnsmasq": daemons.get(br.network),
            }
        if state.follow:
            # a hardware network's owner, as this host's beacon follows it: where its
            # instances' floating-IP frames go (``_hanet.follow``)
            from . import follow

            seen = follow.learnt(paths)
            for bridge, ip in state.follow:
                label = next(b.network for b in state.bridges if b.name == bridge)
                out["networks"][label]["owner_mac"] = {"address": ip, "mac": seen.get(ip)}
                if seen.get(ip) is None:
                    out["problems"].append(
                        f"no MAC known for {label}'s dhcp_server {ip}: its floating IPs' frames go to the router"
                    )
        public = {h.public_interface for h in cfg.hosts.values()}
        fl = {f.address for f in state.floating_ips}
        for ifname in sorted(public):
            for a in held.get(ifname, []):
                if a.split("/")[0] in fl:
                    out["floating_ips"].append({"address": a.split("/")[0], "interface": ifname})
        if state.ruleset.guards:
            ports = ruleset.ports_now(state.ruleset.guards)
            out["ports"] = {k: [list(x) for x in v] for k, v in ports.items()}
            out["problems"] += [
                f"port {p} on {b} (MAC {m}) is no instance NIC's: it may send nothing" for b, p, m in ports["unknown"]
            ]
    out["ruleset"] = ruleset.handle(paths)
    out["peers"] = peers
    return out


LINK_SILENT_S = 2.0  # a peer's target silent this long (as of the view) is down on that link


def link_states(view):
    """{peer: {ifname: "up" | "down"}} from the beacon's view: per link the peer is probed
    on, whether it answered there within ``LINK_SILENT_S`` of the view being written. A
    peer cut off from one segment but answering on its uplink is "up" as a peer and
    "down" on that segment's bridge (``failover.segment_cuts``). Pure."""
    at = view.get("written_at")
    peers = view.get("peers") if isinstance(view.get("peers"), dict) else {}
    if not isinstance(at, (int, float)):
        return {}
    out = {}
    for peer, v in peers.items():
        seen = v.get("seen") if isinstance(v, dict) else None
        if not isinstance(seen, dict):
            continue
        links = out.setdefault(peer, {})
        for target, t in seen.items():
            ifname = str(target).rsplit(":", 1)[0]
            up = isinstance(t, (int, float)) and at - t <= LINK_SILENT_S
            if up or links.get(ifname) != "up":
                links[ifname] = "up" if up else "down"
    return out


def write_metrics(me, paths, cfg, state, status_now, write=True):
    """This host's metrics text (``hanet.metrics``; the beacon's writer calls it without
    Salt's loader): ``status_now`` is ``hanet.status``'s answer, ``cfg``/``state`` None
    when there is no valid pillar. Writes the textfile (``metrics_textfile_dir``) and
    returns the text; "" (and the file and counters removed) when hanet has nothing here."""
    from . import liveness, supervise

    daemons, view = supervise.running(paths), liveness.read_view(paths)
    store = metrics.host_store(paths)
    if not status_now["networks"] and not daemons and not view.get("peers"):
        if write:
            store.forget()  # hanet left this host (or never came): no file to scrape
        return ""
    fams = metrics.host_families(me, status_now, daemons, view)
    text = metrics.render(metrics.merge(fams, store.families().values()).values())
    directory = cfg.metrics_textfile_dir if cfg is not None else metrics.DEFAULT_DIR
    if write and directory:
        directory = os.path.join(paths.root_dir, directory.lstrip("/"))
        metrics.write_textfile(directory, metrics.TEXTFILE, text)
        store.note_textfile(os.path.join(directory, metrics.TEXTFILE))
    return text


def applied_config(paths, last_known="pillar.json"):
    """The model of the last pillar applied here (``<state_dir>/pillar.json``), or None."""
    import json

    from . import model

    try:
        with open(paths.state(last_known), encoding="utf-8") as fh:
            return model.load(json.load(fh))
    except (OSError, ValueError, model.PillarError):
        return None


APPLIED_RECORD = "pillar-owners.json"  # the master's record (hanet_owners) as the last apply saw it


def beacon_owners(paths):
    """{network: owner} as the beacon can know it without Salt: the master's record as
    the last apply saw it merged with the host's own copy (its takeovers and
    relinquishes), the higher epoch winning, as the execution module merges them. A
    host that was off while its network moved learns it from the first, so it does not
    call itself the server of a network it no longer holds."""
    import json

    from . import failover, takeover

    try:
        with open(paths.state(APPLIED_RECORD), encoding="utf-8") as fh:
            applied = json.load(fh)
    except (OSError, ValueError):
        applied = {}
    merged = failover.merge(applied if isinstance(applied, dict) else {}, takeover.local_owners(paths))
    return takeover.owner_map(merged, paths)


def beacon_metrics(me, paths):
    """The beacon's metrics writer: everything from the library and files (the last
    applied pillar, the owner record: ``beacon_owners``), nothing through Salt's loader,
    whose locks a job forked from the minion at that moment would inherit held."""
    from . import desired, liveness

    cfg = applied_config(paths)
    owners = beacon_owners(paths)
    state = desired.compute(cfg, me, owners) if cfg is not None else None
    st = status(me, state, cfg, paths, liveness.read_view(paths))
    return write_metrics(me, paths, cfg, state, st)


def beacon_announce(me, paths, rounds=1):
    """The beacon's periodic re-announcement (``ha:garp_refresh_s``), from the library:
    the addresses of the networks this host owns by its own record."""
    from . import takeover

    cfg = applied_config(paths)
    if cfg is None:
        return []
    ctx = takeover.Context(
        me=me, cfg=cfg, paths=paths, owners=lambda: takeover.local_owners(paths), fire=lambda tag, data: None
    )
    return takeover.announce(ctx, rounds)


def serving(host, cfg, owners, view):
    """What this host holds of the network-host networks it is a network host of, and
    its beacon's view of its peers (the master's reconcile loop asks):
    ``{"networks": {network: holds its gateway}, "epochs": {network: epoch known here},
    "peers": {peer: "up" | "down"}, "lost": [network it cannot serve now]}`` (``lost``
    only when the beacon watches this host's health)."""
    held = links.addresses_by_link()
    nets, epochs = {}, {}
    for label, net in sorted(cfg.networks.items()):
        if net.multi_host or host not in net.network_hosts:
            continue
        nets[label] = net.service_cidr in held.get(net.bridge, [])
        epochs[label] = int((owners.get(label) or {}).get("epoch", 0))
    peers = view.get("peers") if isinstance(view.get("peers"), dict) else {}
    out = {
        "networks": nets,
        "epochs": epochs,
        "peers": {p: v.get("state") for p, v in peers.items() if isinstance(v, dict)},
        "links": link_states(view),
    }
    health = view.get("health")
    if isinstance(health, dict) and isinstance(health.get("lost"), list):
        out["lost"] = health["lost"]
    return out
