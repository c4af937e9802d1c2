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
FACETS = ("links", "sysctls", "ruleset", "floating", "dnsmasq", "metadata")

# _hanet lives beside this file (both are synced into extmods/modules). Salt's loader
# takes its own directories off sys.path again after loading a module, so the path is
# ensured at call time.
_HERE = os.path.dirname(os.path.abspath(__file__))


def _h(name):
    """The ``_hanet.<name>`` library module."""
    if _HERE not in sys.path:
        sys.path.append(_HERE)
    return importlib.import_module(f"_hanet.{name}")


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


def _config(pillar=None):
    """The validated model of ``pillar`` (default: this minion's ``hanet`` pillar)."""
    lib = _lib()
    if pillar is None:
        pillar = __pillar__.get("hanet", {})  # noqa: F821
    try:
        return lib.model.load(pillar)
    except lib.model.PillarError as err:
        raise PillarInvalid(err.render()) from err


def _owners():
    """Who holds each network-host network now: the failover record, when there is one."""
    import json

    try:
        with open(_paths().state("owners.json"), encoding="utf-8") as fh:
            return json.load(fh)
    except (FileNotFoundError, ValueError):
        return {}


def _desired(pillar=None):
    return _lib().desired.compute(_config(pillar), __opts__["id"], _owners())


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
        lib.model.load(__pillar__.get("hanet", {}) if pillar is None else pillar)  # noqa: F821
    except lib.model.PillarError as err:
        return {"valid": False, "problems": [f"{p}: {m}" for p, m in err.problems]}
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
        cur = links_.current(state.bridges, managed.get("links"))
        changes = links_.plan(state.bridges, cur, managed.get("links"))
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
    raise ValueError(f"unknown facet {facet!r}; one of {', '.join(FACETS)}")


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
