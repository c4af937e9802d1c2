"""hanet runner: the failover workflow, planned moves, and the cluster's view.

- ``hanet.liveness`` is what ``reactor/failover.sls`` calls for every
  ``salt/beacon/<observer>/hanet_liveness/<peer>/<down|up>`` event. For a *down* it
  validates the event (signed by the observer's own minion key, fresh, not a replay; the
  observer must watch that peer for a network the peer holds), confirms the failure with
  a second opinion (the master's own ICMP check of the suspect: a suspect that answers is
  alive, and a standby whose own link broke does not steal the network), records the new
  owner durably under the master's cachedir, and has it take over
  (``hanet.takeover``), which fires ``hanet/failover/<network>/complete``. Anything it
  refuses fires ``hanet/failover/<network or "unknown">/rejected`` with the reason, and
  nothing moves.
- ``hanet.evacuate <minion>`` / ``hanet.failback <network>``: planned moves. The new
  owner binds and announces first; only then does the old owner let go: no lost packet.
- ``hanet.status``: per network who serves, who stands by, whether every host agrees;
  per floating IP where it lives.

CLI examples::

    salt-run hanet.status
    salt-run hanet.evacuate net1
    salt-run hanet.failback shared
"""
import base64
import fcntl
import json
import logging
import os
import select
import socket
import struct
import time

log = logging.getLogger(__name__)

__virtualname__ = "hanet"

FRESH_S = 30.0  # a liveness event older than this is stale (or a replay)
_clients = {}


def __virtual__():
    return __virtualname__


# --------------------------------------------------------------------------- record


def _dir():
    path = os.path.join(__opts__["cachedir"], "hanet")  # noqa: F821
    os.makedirs(path, exist_ok=True)
    return path


class _Record:
    """The durable failover record: ``{"owners": {network: {owner, epoch, since, reason}},
    "seen": {nonce: t}}``, under an exclusive lock while a decision is made."""

    def __enter__(self):
        self._lock = open(os.path.join(_dir(), "owners.lock"), "w")
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        self.path = os.path.join(_dir(), "owners.json")
        try:
            with open(self.path, encoding="utf-8") as fh:
                self.data = json.load(fh)
        except (FileNotFoundError, ValueError):
            self.data = {}
        self.data.setdefault("owners", {})
        self.data.setdefault("seen", {})
        return self

    def save(self):
        now = time.time()
        self.data["seen"] = {k: v for k, v in self.data["seen"].items() if now - v < 10 * FRESH_S}
        tmp = f"{self.path}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(self.data, fh, sort_keys=True, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def __exit__(self, *exc):
        fcntl.flock(self._lock, fcntl.LOCK_UN)
        self._lock.close()


def _read_record():
    try:
        with open(os.path.join(_dir(), "owners.json"), encoding="utf-8") as fh:
            return json.load(fh).get("owners", {})
    except (FileNotFoundError, ValueError):
        return {}


# --------------------------------------------------------------------------- salt plumbing


def _local():
    import salt.client

    if "local" not in _clients:
        _clients["local"] = salt.client.get_local_client(mopts=__opts__)  # noqa: F821
    return _clients["local"]


def _fire(tag, data):
    import salt.utils.event

    with salt.utils.event.get_master_event(__opts__, __opts__["sock_dir"], listen=False) as ev:  # noqa: F821
        ev.fire_event(data, tag)


def _grains(minion_id):
    import salt.cache

    try:
        return salt.cache.factory(__opts__).fetch("grains", minion_id) or {}  # noqa: F821
    except Exception:  # pylint: disable=broad-except
        return {}


_CACHE = {}  # minion id -> (compiled at, (config, pillar)); lives as long as the reactor
CACHE_S = 600.0  # a highstate primes it afresh (reactor/prime.sls)


def _config(minion_id, fresh=False):
    """hanet's validated model from ``minion_id``'s pillar, compiled by the master (kept
    for ``CACHE_S``, so that a failover does not wait for a pillar compile)."""
    hit = _CACHE.get(minion_id)
    if hit and not fresh and time.monotonic() - hit[0] < CACHE_S:
        return hit[1]
    out = _compile(minion_id)
    _CACHE[minion_id] = (time.monotonic(), out)
    return out


def _compile(minion_id):
    import sys

    import salt.pillar

    pillar = salt.pillar.get_pillar(__opts__, _grains(minion_id), minion_id,  # noqa: F821
                                    saltenv="base").compile_pillar()
    here = os.path.dirname(os.path.abspath(__file__))
    # _hanet: beside the checkout's _runners (runner_dirs), or synced with the modules
    for cand in (os.path.join(here, "..", "_modules"), os.path.join(here, "..", "modules"),
                 os.path.join(__opts__["extension_modules"], "modules")):  # noqa: F821
        if os.path.isdir(os.path.join(cand, "_hanet")) and cand not in sys.path:
            sys.path.append(cand)
    from _hanet import model

    return model.load(pillar.get("hanet", {})), pillar


def _any_minion():
    """Some minion the master knows (for compiling the hanet pillar)."""
    import salt.cache

    known = sorted(salt.cache.factory(__opts__).list("grains") or [])  # noqa: F821
    if not known:
        raise RuntimeError("the master knows no minion yet")
    return known[0]


def _verify(observer, data):
    """The event's signature, by the observer's accepted minion key."""
    import salt.crypt

    sig = data.get("sig")
    if not isinstance(sig, str):
        return "unsigned"
    keyfile = os.path.join(__opts__["pki_dir"], "minions", observer)  # noqa: F821
    if not os.path.isfile(keyfile):
        return f"no accepted key for {observer}"
    message = canonical(data).encode()
    try:
        if not salt.crypt.verify_signature(keyfile, message, base64.b64decode(sig)):
            return "bad signature"
    except Exception as err:  # pylint: disable=broad-except
        return f"bad signature ({err})"
    return None


def canonical(data):
    """The signed part of a liveness event (the beacon signs exactly this)."""
    return json.dumps({k: data.get(k) for k in ("observer", "peer", "state", "detected_at", "nonce")},
                      sort_keys=True, separators=(",", ":"))


# --------------------------------------------------------------------------- second opinion


def _checksum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def icmp_alive(addresses, timeout=0.08, tries=2):
    """True when any of ``addresses`` answers an ICMP echo from the master."""
    if not addresses:
        return False
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    except OSError:
        return False
    ident = os.getpid() & 0xFFFF
    deadline = time.monotonic() + timeout
    try:
        sock.setblocking(False)
        for seq in range(tries):
            for addr in addresses:
                hdr = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
                payload = b"hanet-second-opinion"
                pkt = struct.pack("!BBHHH", 8, 0, _checksum(hdr + payload), ident, seq) + payload
                try:
                    sock.sendto(pkt, (addr, 0))
                except OSError:
                    pass  # no route from the master: that address cannot vouch
            until = min(deadline, time.monotonic() + timeout / tries)
            while True:
                left = until - time.monotonic()
                if left <= 0:
                    break
                ready, _, _ = select.select([sock], [], [], left)
                if not ready:
                    break
                pkt, (src, _) = sock.recvfrom(1500)
                ihl = (pkt[0] & 0x0F) * 4
                typ, _, _, rid, _ = struct.unpack("!BBHHH", pkt[ihl:ihl + 8])
                if typ == 0 and rid == ident and src in addresses:
                    return True
            if time.monotonic() >= deadline:
                break
    finally:
        sock.close()
    return False


def _vouching_addresses(suspect, cfg):
    """The suspect's own addresses (grains), less those that move between hosts."""
    moving = {n.gateway for n in cfg.networks.values() if n.gateway}
    moving |= {f.address for i in cfg.instances.values() for f in i.floating_ips}
    return sorted(a for a in _grains(suspect).get("ipv4", [])
                  if not a.startswith("127.") and a not in moving)


# --------------------------------------------------------------------------- liveness


def prime(tag=None, data=None):  # pylint: disable=unused-argument
    """Warm the failover path (imports, the pillar of the minion that just started), so
    that the first failover after a start does not pay for them. ``reactor/prime.sls``
    calls it for ``salt/minion/*/start`` and for ``hanet/prime`` (which every hanet
    highstate fires when it ends), in the reactor's own process: that is the process a
    failover runs in, and the one whose first rendering is slow.

    CLI example::

        salt-run hanet.prime
    """
    import salt.crypt  # noqa: F401  pylint: disable=unused-import

    mid = (data or {}).get("id") if isinstance(data, dict) else None
    try:
        _config(mid or _any_minion(), fresh=True)
    except Exception as err:  # pylint: disable=broad-except
        return {"result": False, "reason": str(err)}
    icmp_alive(["127.0.0.1"], timeout=0.01, tries=1)
    _local()
    return {"result": True}


def _reject(network, reason, tag, data):
    log.warning("hanet failover: rejected %s: %s", tag, reason)
    _fire(f"hanet/failover/{network or 'unknown'}/rejected",
          {"reason": reason, "event_tag": tag, "observer": (data or {}).get("observer"),
           "peer": (data or {}).get("peer"), "at": time.time()})
    return {"result": False, "reason": reason}


def owner_of(cfg, record, network):
    rec = record.get(network)
    return rec["owner"] if rec else cfg.networks[network].network_hosts[0]


def liveness(tag=None, data=None):
    """React to a hanet_liveness transition (called by reactor/failover.sls)."""
    t0 = time.time()
    if not isinstance(tag, str) or not isinstance(data, dict):
        return _reject(None, "malformed event", tag, None)
    parts = tag.split("/")
    if len(parts) != 6 or parts[:2] != ["salt", "beacon"] or parts[3] != "hanet_liveness" \
            or parts[5] not in ("down", "up"):
        return _reject(None, "malformed tag", tag, data)
    observer, peer, state = parts[2], parts[4], parts[5]
    if data.get("observer") != observer or data.get("peer") != peer or data.get("state") != state:
        return _reject(None, "tag and data disagree", tag, data)
    detected_at = data.get("detected_at")
    if not isinstance(detected_at, (int, float)) or not isinstance(data.get("nonce"), str):
        return _reject(None, "malformed data (detected_at, nonce)", tag, data)
    if abs(t0 - detected_at) > FRESH_S:
        return _reject(None, f"stale event (detected {t0 - detected_at:.1f} s ago)", tag, data)
    why = _verify(observer, data)
    if why:
        return _reject(None, f"not from {observer}: {why}", tag, data)
    if state == "up":
        log.info("hanet failover: %s sees %s up again", observer, peer)
        return {"result": True, "action": "none", "reason": "up: no automatic failback"}

    try:
        cfg, _ = _config(observer)
    except Exception as err:  # pylint: disable=broad-except
        return _reject(None, f"pillar: {err}", tag, data)
    with _Record() as rec:
        if data["nonce"] in rec.data["seen"]:
            return _reject(None, "replayed event", tag, data)
        rec.data["seen"][data["nonce"]] = t0
        rec.save()
        owners = rec.data["owners"]
        nets = [label for label, n in sorted(cfg.networks.items())
                if not n.multi_host and peer in n.network_hosts
                and owner_of(cfg, owners, label) == peer
                and observer in cfg.hosts_carrying(label) and observer != peer]
    if not nets:
        return _reject(None, f"{observer} watches no network that {peer} holds", tag, data)

    addrs = _vouching_addresses(peer, cfg)
    t_check = time.time()
    if icmp_alive(addrs):
        return _reject(nets[0], f"second opinion: {peer} answers the master ({', '.join(addrs)})",
                       tag, data)
    t_confirmed = time.time()

    moved = []
    with _Record() as rec:
        owners = rec.data["owners"]
        for label in nets:
            if owner_of(cfg, owners, label) != peer:
                continue  # another observer's report moved it already
            order = list(cfg.networks[label].network_hosts)
            standbys = [h for h in order if h != peer]
            new = observer if observer in standbys else (standbys[0] if standbys else None)
            if new is None:
                _reject(label, f"no standby for {label}", tag, data)
                continue
            epoch = owners.get(label, {}).get("epoch", 0) + 1
            owners[label] = {"owner": new, "epoch": epoch, "since": time.time(),
                             "reason": f"{peer} down (seen by {observer})"}
            moved.append((label, new, epoch))
        rec.save()
    for label, new, epoch in moved:
        _local().cmd_async(new, "hanet.takeover", arg=[label, epoch],
                           kwarg={"previous": peer, "detected_at": detected_at})
        # Fencing: should the suspect be alive after all, it gives the network up.
        _local().cmd_async(peer, "hanet.relinquish", arg=[label, epoch, new])
    log.warning("hanet failover: %s down (seen by %s): %s", peer, observer,
                ", ".join(f"{n} -> {h}" for n, h, _ in moved))
    return {"result": True, "moved": {n: h for n, h, _ in moved},
            "timings": {"validated_s": round(t_check - t0, 4),
                        "confirmed_s": round(t_confirmed - t0, 4),
                        "published_s": round(time.time() - t0, 4)}}


# --------------------------------------------------------------------------- planned moves


def _move(cfg, label, new, reason, timeout=30):
    with _Record() as rec:
        old = owner_of(cfg, rec.data["owners"], label)
        if old == new:
            return {"network": label, "owner": new, "moved": False}
        epoch = rec.data["owners"].get(label, {}).get("epoch", 0) + 1
        rec.data["owners"][label] = {"owner": new, "epoch": epoch, "since": time.time(),
                                     "reason": reason}
        rec.save()
    got = _local().cmd(new, "hanet.takeover", arg=[label, epoch],
                       kwarg={"previous": old, "planned": True}, timeout=timeout)
    if new not in got or not isinstance(got[new], dict):
        raise RuntimeError(f"{new} did not take {label} over: {got.get(new)}")
    rel = _local().cmd(old, "hanet.relinquish", arg=[label, epoch, new], timeout=timeout)
    return {"network": label, "from": old, "to": new, "epoch": epoch, "moved": True,
            "takeover": got[new].get("timings"), "old_released": old in rel}


def evacuate(minion, tgt_pillar_from=None):
    """Planned move of every network ``minion`` holds to its next standby: the new owner
    binds and announces each address first, then ``minion`` lets go, so no packet is lost.

    CLI example::

        salt-run hanet.evacuate net1
    """
    cfg, _ = _config(tgt_pillar_from or minion, fresh=True)
    record = _read_record()
    out = []
    for label, net in sorted(cfg.networks.items()):
        if net.multi_host or owner_of(cfg, record, label) != minion:
            continue
        standbys = [h for h in net.network_hosts if h != minion]
        if not standbys:
            out.append({"network": label, "moved": False, "reason": "no standby"})
            continue
        out.append(_move(cfg, label, standbys[0], f"evacuate {minion}"))
    return out


def failback(network, to=None):
    """Move ``network`` back to its first network host (or ``to``), planned.

    CLI example::

        salt-run hanet.failback shared
    """
    cfg, _ = _config(to or _any_minion(), fresh=True)
    net = cfg.networks.get(network)
    if net is None or net.multi_host:
        raise ValueError(f"{network!r} is not a network with network_hosts")
    return _move(cfg, network, to or net.network_hosts[0], "failback")


def status(timeout=10):
    """The whole cluster: for each network who serves, who stands by, whether every host
    agrees; for each floating IP, where it lives.

    CLI example::

        salt-run hanet.status
    """
    got = _local().cmd("*", "hanet.status", timeout=timeout)
    got = {k: v for k, v in got.items() if isinstance(v, dict)}
    if not got:
        return {"error": "no minion answered hanet.status"}
    cfg, _ = _config(sorted(got)[0], fresh=True)
    record = _read_record()
    nets = {}
    for label, net in sorted(cfg.networks.items()):
        holders = {h: s["networks"].get(label, {}) for h, s in got.items() if label in s.get("networks", {})}
        serving = sorted(h for h, n in holders.items() if n.get("role") == "serving")
        entry = {"multi_host": net.multi_host, "serving": serving,
                 "standby": sorted(h for h, n in holders.items() if n.get("role") == "standby"),
                 "unreachable": sorted(h for h in cfg.hosts_carrying(label) if h not in got)}
        if not net.multi_host:
            owner = owner_of(cfg, record, label)
            gw = f"{net.gateway}/{net.prefixlen}"
            with_gw = sorted(h for h, n in holders.items() if gw in n.get("addresses", []))
            entry.update(owner=owner, epoch=record.get(label, {}).get("epoch", 0),
                         gateway_on=with_gw, agree=with_gw == [owner] and serving == [owner])
        else:
            entry["agree"] = all(n.get("present") for n in holders.values())
        nets[label] = entry
    fips = {}
    for h, s in got.items():
        for f in s.get("floating_ips", []):
            fips.setdefault(f["address"], []).append(h)
    return {"networks": nets, "floating_ips": {a: sorted(h) for a, h in sorted(fips.items())},
            "record": record}
