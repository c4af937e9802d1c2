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
import threading
import time

log = logging.getLogger(__name__)

__virtualname__ = "hanet"

FRESH_S = 30.0  # a liveness event older than this is stale (or a replay)
_clients = {}
_PUBLISH_LOCK = threading.Lock()


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

    def save(self, durable=True):
        """Write the record; ``durable``: fsync it first (an owner change must survive a
        crash of the master; a remembered nonce need not: the freshness check covers it)."""
        now = time.time()
        self.data["seen"] = {k: v for k, v in self.data["seen"].items()
                             if now - _seen_at(v) < 10 * FRESH_S}
        tmp = f"{self.path}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(self.data, fh, sort_keys=True, indent=1)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def __exit__(self, *exc):
        fcntl.flock(self._lock, fcntl.LOCK_UN)
        self._lock.close()


def _seen_at(entry):
    """When a nonce was first handled (``[at, via]``; a bare float in older records)."""
    return entry[0] if isinstance(entry, list) else float(entry)


def _seen_via(entry):
    return entry[1] if isinstance(entry, list) and len(entry) > 1 else "reactor"


ENGINE_BEAT = "engine.beat"  # the hanet_failover engine touches it every second
ENGINE_FRESH_S = 5.0


def _engine_alive():
    """Whether the hanet_failover engine runs (its heartbeat file is fresh): then the
    reactor path leaves liveness events to it, so that each is handled and reported once."""
    try:
        return time.time() - os.stat(os.path.join(_dir(), ENGINE_BEAT)).st_mtime < ENGINE_FRESH_S
    except OSError:
        return False


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


def _publish(tgt, fun, arg, kwarg=None):
    """Publish a job without waiting for it; returns its jid.

    What ``LocalClient.cmd_async`` sends, on a request channel to the master that stays
    open (cmd_async opens a new one for every job: 30-40 ms on the failover path). Any
    trouble with it falls back to ``cmd_async``. One job at a time: the engine's worker
    threads share the channel."""
    import salt.channel.client
    import salt.utils.args
    import salt.utils.network

    opts = __opts__  # noqa: F821
    with _PUBLISH_LOCK:
        local = _local()
        try:
            chan = _clients.get("publish")
            if chan is None:
                uri = "tcp://{}:{}".format(salt.utils.network.ip_bracket(opts["interface"]),
                                           opts["ret_port"])
                chan = salt.channel.client.ReqChannel.factory(opts, crypt="clear", master_uri=uri)
                _clients["publish"] = chan
            load = local._prep_pub(  # pylint: disable=protected-access
                tgt, fun, salt.utils.args.condition_input(list(arg), kwarg or {}),
                "glob", "", "", 10)
            got = chan.send(load, timeout=10)
            jid = ((got or {}).get("load") or {}).get("jid") if isinstance(got, dict) else None
            if not jid:
                raise RuntimeError(f"the master did not publish it: {got!r}")
            return jid
        except Exception as err:  # pylint: disable=broad-except
            log.warning("hanet: publishing %s to %s on the kept channel failed (%s); "
                        "using LocalClient.cmd_async", fun, tgt, err)
            chan = _clients.pop("publish", None)
            if chan is not None:
                try:
                    chan.close()
                except Exception:  # pylint: disable=broad-except
                    pass
            return local.cmd_async(tgt, fun, arg=list(arg), kwarg=kwarg or {})


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


def icmp_alive(addresses, timeout=0.05, tries=2):
    """True when any of ``addresses`` answers an ICMP echo from the master within
    ``timeout`` (echoes sent ``tries`` times, spread over it). A live host's kernel answers
    a LAN echo in well under a millisecond; a reply that arrived while this process was
    not scheduled is still read before the verdict."""
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
        return _late_reply(sock, ident, addresses)
    finally:
        sock.close()


def _late_reply(sock, ident, addresses):
    """A reply already queued on ``sock`` (read without waiting)."""
    while select.select([sock], [], [], 0)[0]:
        pkt, (src, _) = sock.recvfrom(1500)
        ihl = (pkt[0] & 0x0F) * 4
        typ, _, _, rid, _ = struct.unpack("!BBHHH", pkt[ihl:ihl + 8])
        if typ == 0 and rid == ident and src in addresses:
            return True
    return False


def _echo(ident, seq):
    payload = b"hanet-second-opinion"
    hdr = struct.pack("!BBHHH", 8, 0, 0, ident, seq & 0xFFFF)
    return struct.pack("!BBHHH", 8, 0, _checksum(hdr + payload), ident, seq & 0xFFFF) + payload


class Watch:
    """The master's own, continuous view of the network hosts (run by the
    hanet_failover engine): an ICMP echo to every address of every host it watches
    each ``interval``. A host whose echoes went unanswered ``dead_after`` rounds in a
    row (each round waits a whole interval) is dead in the master's eyes at once, one
    that answered within the last two rounds is alive: then a liveness report needs no
    check of its own (which waits up to 50 ms). Anything less clear (a host just added,
    a watch that stalled) gives no verdict, and the runner checks actively."""

    def __init__(self, interval=0.05, dead_after=3):
        self.interval = float(interval)
        self.dead_after = int(dead_after)
        self._targets = {}  # address -> host
        self._state = {}  # host -> [unanswered rounds in a row, answered in the last 2]
        self._last_round = 0.0  # monotonic time the last round was judged
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None

    def watch(self, hosts):
        """``hosts``: {host: [address, ...]}; replaces what is watched."""
        with self._lock:
            self._targets = {a: h for h, addrs in hosts.items() for a in addrs}
            self._state = {h: self._state.get(h, [0, False]) for h in hosts}

    def verdict(self, host):
        """"alive", "dead" or None (no clear view: the host is not watched, or the watch
        is not running or has not finished a round lately, so its view may be stale)."""
        with self._lock:
            st = self._state.get(host)
            if st is None or self._thread is None or not self._thread.is_alive():
                return None
            if time.monotonic() - self._last_round > 3 * self.interval + 0.05:
                return None
            if st[1]:
                return "alive"
            return "dead" if st[0] >= self.dead_after else None

    def start(self):
        self._thread = threading.Thread(target=self._run, name="hanet-master-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)

    def _run(self):
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        except OSError as err:
            log.warning("hanet: the master cannot watch the network hosts (%s)", err)
            return
        ident, seq = (os.getpid() + 1) & 0xFFFF, 0
        sock.setblocking(False)
        try:
            while not self._stop.is_set():
                with self._lock:
                    targets = dict(self._targets)
                answered = set()
                seq += 1
                for addr in targets:
                    try:
                        sock.sendto(_echo(ident, seq), (addr, 0))
                    except OSError:
                        pass
                until = time.monotonic() + self.interval
                while True:
                    left = until - time.monotonic()
                    ready = select.select([sock], [], [], max(0.0, left))[0]
                    while ready:
                        try:
                            pkt, (src, _) = sock.recvfrom(1500)
                        except BlockingIOError:
                            break
                        ihl = (pkt[0] & 0x0F) * 4
                        typ, _, _, rid, rseq = struct.unpack("!BBHHH", pkt[ihl:ihl + 8])
                        if typ == 0 and rid == ident and rseq == seq and src in targets:
                            answered.add(targets[src])
                    if left <= 0:
                        break
                with self._lock:
                    for host, st in self._state.items():
                        if host in answered:
                            self._state[host] = [0, True]
                        else:
                            self._state[host] = [st[0] + 1, st[0] == 0 and st[1]]
                    self._last_round = time.monotonic()
        finally:
            sock.close()


_WATCH = {}  # "watch" -> Watch, in the engine's process


def _watch_hosts(interval_ms=None):
    """Start (or update) the master's watch of every network host, in this process
    (the hanet_failover engine's: ``prime(via="engine")``)."""
    cfg, _ = _config(_any_minion())
    hosts = sorted({h for n in cfg.networks.values() if not n.multi_host for h in n.network_hosts})
    interval = max(0.02, (interval_ms or cfg.ha.probe_interval_ms) / 2000.0)
    w = _WATCH.get("watch")
    if w is None or abs(w.interval - interval) > 1e-9:
        if w is not None:
            w.stop()
        w = _WATCH["watch"] = Watch(interval=interval).start()
    w.watch({h: _vouching_addresses(h, cfg) for h in hosts})
    return {"interval_s": interval, "hosts": hosts}


def _vouching_addresses(suspect, cfg):
    """The suspect's own addresses (grains), less those that move between hosts."""
    moving = {n.gateway for n in cfg.networks.values() if n.gateway}
    moving |= {f.address for i in cfg.instances.values() for f in i.floating_ips}
    return sorted(a for a in _grains(suspect).get("ipv4", [])
                  if not a.startswith("127.") and a not in moving)


# --------------------------------------------------------------------------- liveness


def prime(tag=None, data=None, via="reactor"):  # pylint: disable=unused-argument
    """Warm the failover path (imports, the pillar of the minion that just started), so
    that the first failover after a start does not pay for them. ``reactor/prime.sls``
    calls it for ``salt/minion/*/start`` and for ``hanet/prime`` (which every hanet
    highstate fires when it ends), in the reactor's own process: that is the process a
    failover runs in, and the one whose first rendering is slow. The hanet_failover
    engine calls it for the same events (``via="engine"``), and there it also starts or
    updates the master's watch of the network hosts (``Watch``).

    CLI example::

        salt-run hanet.prime
    """
    import salt.crypt  # noqa: F401  pylint: disable=unused-import

    if via == "reactor" and _engine_alive():
        return {"result": True, "reason": "left to the hanet_failover engine"}
    mid = (data or {}).get("id") if isinstance(data, dict) else None
    try:
        _config(mid or _any_minion(), fresh=True)
    except Exception as err:  # pylint: disable=broad-except
        return {"result": False, "reason": str(err)}
    icmp_alive(["127.0.0.1"], timeout=0.01, tries=1)
    _local()
    out = {"result": True}
    if via == "engine":
        try:
            out["watch"] = _watch_hosts()
        except Exception as err:  # pylint: disable=broad-except
            log.warning("hanet: no master watch of the network hosts: %s", err)
    return out


def _reject(network, reason, tag, data):
    log.warning("hanet failover: rejected %s: %s", tag, reason)
    _fire(f"hanet/failover/{network or 'unknown'}/rejected",
          {"reason": reason, "event_tag": tag, "observer": (data or {}).get("observer"),
           "peer": (data or {}).get("peer"), "at": time.time()})
    return {"result": False, "reason": reason}


def owner_of(cfg, record, network):
    rec = record.get(network)
    return rec["owner"] if rec else cfg.networks[network].network_hosts[0]


def liveness(tag=None, data=None, via="reactor"):
    """React to a hanet_liveness transition: called by ``reactor/failover.sls`` and, when
    the master runs it, by the ``hanet_failover`` engine (``via="engine"``) for the same
    event. Whichever comes first handles it; the other returns quietly."""
    t0 = time.time()
    if via == "reactor" and _engine_alive():
        return {"result": True, "action": "none", "reason": "left to the hanet_failover engine"}
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
        seen = rec.data["seen"].get(data["nonce"])
        if seen is not None and _seen_via(seen) != via and t0 - _seen_at(seen) < FRESH_S:
            return {"result": True, "action": "none", "reason": f"handled by the {_seen_via(seen)}"}
        if seen is not None:
            return _reject(None, "replayed event", tag, data)
        rec.data["seen"][data["nonce"]] = [t0, via]
        rec.save(durable=False)
        owners = rec.data["owners"]
        nets = [label for label, n in sorted(cfg.networks.items())
                if not n.multi_host and peer in n.network_hosts
                and owner_of(cfg, owners, label) == peer
                and observer in cfg.hosts_carrying(label) and observer != peer]
    if not nets:
        return _reject(None, f"{observer} watches no network that {peer} holds", tag, data)

    addrs = _vouching_addresses(peer, cfg)
    t_check = time.time()
    w = _WATCH.get("watch")
    seen = w.verdict(peer) if w is not None else None
    if seen == "alive" or (seen is None and icmp_alive(addrs)):
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
        decision = {"via": via, "received_at": t0, "confirmed_at": t_confirmed,
                    "second_opinion": "watch" if seen else "icmp", "published_at": time.time()}
        _publish(new, "hanet.takeover", [label, epoch],
                 {"previous": peer, "detected_at": detected_at, "decision": decision})
        # Fencing: should the suspect be alive after all, it gives the network up.
        _publish(peer, "hanet.relinquish", [label, epoch, new])
    if moved:
        log.warning("hanet failover: %s down (seen by %s): %s", peer, observer,
                    ", ".join(f"{n} -> {h}" for n, h, _ in moved))
    else:
        log.info("hanet failover: %s down (seen by %s): moved already", peer, observer)
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
