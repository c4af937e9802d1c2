"""hanet_liveness: watch hanet peers (network hosts) by ARP and report transitions.

A probe thread (``_hanet.liveness.Prober``) asks each peer's addresses every
``interval_ms``; a peer is down after ``misses`` silent periods and up again after
``rise`` answered ones. Transitions are fired **at once** from the probe thread, in
the very load a minion sends its beacon events in (``_minion_event``), on the minion's
authenticated request channel to the master, rather than waiting for Salt's
once-a-second beacon poll (falling back to the minion's own beacon return path, the
``__beacons_return`` event, if the master cannot be reached directly). Each is signed
with the minion's key. They arrive on the master as::

    salt/beacon/<observer>/hanet_liveness/<peer>/down   {peer, state, detected_at, ...}
    salt/beacon/<observer>/hanet_liveness/<peer>/up

Only transitions are fired. The last known state of each peer is kept under the
minion's root_dir, so that a beacon refresh (which closes and restarts the beacon)
fires nothing unless a peer really changed meanwhile.

hanet's ``hanet.liveness`` state configures this beacon from the pillar; by hand:

.. code-block:: yaml

    beacons:
      hanet_liveness:
        - peers:
            net1: [[br200, 10.20.0.2], [eth0, 203.0.113.21]]
        - interval_ms: 100
        - misses: 3
        - rise: 5
"""
import json
import logging
import os
import sys
import time

log = logging.getLogger(__name__)

__virtualname__ = "hanet_liveness"
CTX = "hanet_liveness.prober"


def __virtual__():
    return __virtualname__


def _lib():
    # _hanet ships in the synced execution modules directory.
    extmods = os.path.join(__opts__["cachedir"], "extmods", "modules")  # noqa: F821
    if extmods not in sys.path:
        sys.path.insert(0, extmods)
    from _hanet import liveness

    return liveness


def _config(config):
    out = {}
    for item in config if isinstance(config, list) else [config]:
        if isinstance(item, dict):
            out.update(item)
    return out


def validate(config):
    cfg = _config(config)
    peers = cfg.get("peers")
    if not isinstance(peers, dict):
        return False, "hanet_liveness: 'peers' must map a peer to [[interface, ip], ...]"
    for name, targets in peers.items():
        if not isinstance(targets, list) or not all(
                isinstance(t, (list, tuple)) and len(t) == 2 for t in targets):
            return False, f"hanet_liveness: peers:{name} must be a list of [interface, ip]"
    for key in ("interval_ms", "misses", "rise"):
        if key in cfg and (not isinstance(cfg[key], int) or cfg[key] < 1):
            return False, f"hanet_liveness: {key} must be a positive integer"
    return True, "valid"


def _state_file():
    return os.path.join(__opts__.get("root_dir", "/"), "run/hanet/liveness.json")  # noqa: F821


def _load_known():
    try:
        with open(_state_file(), encoding="utf-8") as fh:
            return {k: v.get("state") for k, v in json.load(fh).get("peers", {}).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def _save(prober):
    path = _state_file()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump({"observer": __opts__["id"], "written_at": time.time(), "peers": prober.view()}, fh)  # noqa: F821
    os.replace(tmp, path)


def canonical(data):
    """The signed part of an event (the hanet runner verifies exactly this)."""
    return json.dumps({k: data.get(k) for k in ("observer", "peer", "state", "detected_at", "nonce")},
                      sort_keys=True, separators=(",", ":"))


def _fire(opts, peer, state, detected_at, targets):
    """Fire one transition now, signed with this minion's own key, so that the master
    can tell it from an event another minion forged."""
    import base64
    import uuid

    import salt.crypt
    import salt.utils.event

    data = {"peer": peer, "state": state, "detected_at": detected_at, "observer": opts["id"],
            "targets": targets, "id": opts["id"], "nonce": uuid.uuid4().hex}
    key = os.path.join(opts["pki_dir"], "minion.pem")
    data["sig"] = base64.b64encode(salt.crypt.sign_message(key, canonical(data).encode())).decode()
    tag = f"salt/beacon/{opts['id']}/{__virtualname__}/{peer}/{state}"
    event = {"tag": tag, "data": data, "beacon_name": __virtualname__}
    try:
        # Straight to the master on the minion's authenticated request channel: the
        # same ``_minion_event`` load the minion sends for its beacons, without waiting
        # for the once-a-second beacon poll or the minion's event loop.
        from _hanet import events

        events.send(opts, tag, data, timeout=3)
        return
    except Exception as err:  # pylint: disable=broad-except
        log.warning("hanet_liveness: direct send failed (%s); using the minion's event bus", err)
    with salt.utils.event.MinionEvent(opts, listen=False) as evt:
        evt.fire_event({"beacons": [event]}, "__beacons_return")


def _warm():
    """Import what a takeover needs in the minion's main process: Salt forks every job
    from it, so ``hanet.takeover`` then starts with them loaded (scapy alone costs about
    0.4 s to import)."""
    import importlib

    for name in ("_hanet.model", "_hanet.desired", "_hanet.common", "_hanet.links",
                 "_hanet.floating", "_hanet.dnsmasq", "_hanet.metadata", "_hanet.arp",
                 "scapy.layers.l2", "scapy.sendrecv", "pyroute2"):
        try:
            importlib.import_module(name)
        except Exception as err:  # pylint: disable=broad-except
            log.debug("hanet_liveness: could not preload %s: %s", name, err)


def _start(cfg):
    liveness = _lib()
    _warm()
    opts = __opts__  # noqa: F821
    known = _load_known()
    holder = {}

    def on_change(peer, state, detected_at, initial):
        prober = holder["prober"]
        if initial and known.get(peer, liveness.UP) == state:
            _save(prober)
            return  # nothing changed since the beacon last ran (a refresh, a restart)
        log.warning("hanet_liveness: peer %s is %s", peer, state)
        targets = [f"{i}:{a}" for i, a in prober.peers[peer].targets]
        try:
            _fire(opts, peer, state, detected_at, targets)
        finally:
            _save(prober)

    peers = {name: [tuple(t) for t in targets] for name, targets in cfg["peers"].items()}
    prober = liveness.Prober(peers, on_change, interval=cfg.get("interval_ms", 100) / 1000.0,
                             misses=cfg.get("misses", 3), rise=cfg.get("rise", 5))
    holder["prober"] = prober
    return prober.start()


def beacon(config):
    """Start the probe thread on the first poll; later polls only keep the peers' view
    (for ``hanet.status``) fresh. Transitions are fired by the thread itself."""
    cfg = _config(config)
    key = json.dumps(cfg, sort_keys=True, default=str)
    cur = __context__.get(CTX)  # noqa: F821
    if cur is not None and (cur[0] != key or not cur[1].alive):
        cur[1].stop()
        cur = None
    if cur is None:
        cur = (key, _start(cfg))
        __context__[CTX] = cur  # noqa: F821
    _save(cur[1])
    return []


def close(config):
    """Stop the probe thread (Salt calls this when beacons are refreshed or removed)."""
    cur = __context__.pop(CTX, None)  # noqa: F821
    if cur is not None:
        cur[1].stop()
