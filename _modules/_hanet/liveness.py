"""Peer liveness by ARP: a probe thread that asks each peer's addresses "who has?"
every ``interval`` seconds on raw packet sockets, and reports transitions.

ARP needs no responder on the peer (its kernel answers for its own addresses), tests
the very L2 path that VM traffic takes, and costs one frame per address per period.

A peer is **down** after ``misses`` consecutive periods in which none of its
addresses answered (an answer counts only from the MAC that first answered for that
address: proxy ARP or another device claiming it does not keep a dead peer alive), and
**up** again only after ``rise`` consecutive periods in which one did (hysteresis). An
address that answers from a new MAC while the peer is up, vouched for by another of its
addresses answering from its known MAC, has that MAC learnt: the peer rebooted and
rebuilt that link (a bridge on a VXLAN segment takes a new MAC) or it was replaced;
without that, the peer would look cut off from that segment for good. A probe is answered when its reply arrives within half a period
(``window``): a live kernel answers ARP on a LAN within a millisecond, so each period's
verdict is known then, not only when the next period begins (that brings a failure's
detection forward by half a period without probing more often). The first verdict about a peer (from unknown) is reported with
``initial=True`` so that a caller restarting the prober (a beacon refresh) can compare
it with what it knew and fire nothing when nothing changed.
"""

from __future__ import annotations

import fcntl
import logging
import select
import socket
import struct
import threading
import time

from .common import Worker

log = logging.getLogger(__name__)

ETH_P_ARP = 0x0806
SIOCGIFHWADDR = 0x8927
BROADCAST = b"\xff" * 6
UNKNOWN, UP, DOWN = "unknown", "up", "down"


def _hwaddr(sock, ifname):
    req = struct.pack("256s", ifname.encode()[:15])
    return fcntl.ioctl(sock.fileno(), SIOCGIFHWADDR, req)[18:24]


def _own_ip(ifname):
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            return None
        for a in ipr.get_addr(family=2, index=idx[0]):
            return a.get_attr("IFA_ADDRESS")
    return None


def arp_request(src_mac, src_ip, dst_ip):
    """An Ethernet broadcast ARP request frame (bytes)."""
    eth = BROADCAST + src_mac + struct.pack("!H", ETH_P_ARP)
    arp = (
        struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1)
        + src_mac
        + socket.inet_aton(src_ip or "0.0.0.0")
        + b"\x00" * 6
        + socket.inet_aton(dst_ip)
    )
    return eth + arp


def parse_arp_reply(frame):
    """The sender IP of an ARP reply frame, or None."""
    if len(frame) < 42 or frame[12:14] != b"\x08\x06":
        return None
    htype, ptype, hlen, plen, op = struct.unpack("!HHBBH", frame[14:22])
    if op != 2 or ptype != 0x0800 or hlen != 6 or plen != 4:
        return None
    return socket.inet_ntoa(frame[28:32])


def view_path(paths):
    """Where the beacon keeps its last view of its peers (``hanet.status`` reads it)."""
    return paths.run("liveness.json")


def read_view(paths):
    """{"observer", "written_at", "peers": {peer: {state, last_seen, targets}}}, or {}."""
    import json

    try:
        with open(view_path(paths), encoding="utf-8") as fh:
            got = json.load(fh)
    except (OSError, ValueError):
        return {}
    return got if isinstance(got, dict) else {}


def known_states(paths):
    """{peer: state} as the beacon last saw them (a restarted beacon compares with it)."""
    peers = read_view(paths).get("peers")
    return {k: v.get("state") for k, v in peers.items() if isinstance(v, dict)} if isinstance(peers, dict) else {}


def save_view(paths, observer, view, health=None):
    """Write the beacon's view (and this host's own ``health``, when it is watched); the
    probe thread and the beacon's poll both do."""
    import json
    import os

    path = view_path(paths)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        out = {"observer": observer, "written_at": time.time(), "peers": view}
        if health is not None:
            out["health"] = health
        json.dump(out, fh)
    os.replace(tmp, path)


class Peer:
    def __init__(self, name, targets):
        self.name = name
        self.targets = tuple(targets)  # ((ifname, ip), ...)
        self.state = UNKNOWN
        self.misses = 0
        self.successes = 0
        self.answered = False
        self.last_seen = None
        self.rtt = None  # seconds: the last answered probe's round trip
        self.missed_total = 0  # rounds not answered since the prober started (metrics)


class Prober(Worker):
    """``peers``: {name: [(ifname, ip), ...]}; ``probe``: a ``model.Probe`` (interval,
    misses, rise); ``on_change(peer, state, detected_at, initial)`` is called from the
    probe thread on every transition."""

    thread_name = "hanet-liveness"

    def __init__(self, peers, on_change, probe, window=None):
        super().__init__()
        self.peers = {name: Peer(name, t) for name, t in sorted(peers.items()) if t}
        self.on_change = on_change
        self.interval = probe.interval_s
        self.window = min(self.interval, float(window) if window else self.interval / 2)
        self.misses = int(probe.misses)
        self.rise = int(probe.rise)
        self._socks = {}  # ifname -> (sock, mac, ip)
        self._by_ip = {}  # (ifname, ip) -> Peer
        self._macs = {}  # (ifname, ip) -> the MAC that answers for it (bytes)
        self._warned = set()
        self._sent_at = time.monotonic()
        self._target_seen = {}  # (ifname, ip) -> when it last answered (wall clock)
        # set after every period's verdict: the fence checks right then, not on a
        # schedule of its own (that phase cost up to a period of rule 2's margin)
        self.judged = threading.Event()

    # -- lifecycle -----------------------------------------------------------------
    def stop(self, timeout=2.0):
        super().stop(timeout)
        for sock, _, _ in self._socks.values():
            sock.close()
        self._socks.clear()

    def view(self):
        return {
            p.name: {
                "state": p.state,
                "last_seen": p.last_seen,
                "targets": [f"{i}:{a}" for i, a in p.targets],
                # per target: a peer answering on one link only is up, but not on the other
                "seen": {f"{i}:{a}": self._target_seen.get((i, a)) for i, a in p.targets},
                "rtt": p.rtt,
                "missed_total": p.missed_total,
            }
            for p in self.peers.values()
        }

    # -- probing -------------------------------------------------------------------
    def _sock(self, ifname):
        if ifname in self._socks:
            return self._socks[ifname]
        try:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
            sock.bind((ifname, ETH_P_ARP))
            sock.setblocking(False)
            entry = (sock, _hwaddr(sock, ifname), _own_ip(ifname))
        except OSError as err:  # the interface is missing or down: a miss, not a crash
            log.debug("hanet liveness: cannot probe on %s: %s", ifname, err)
            return None
        self._socks[ifname] = entry
        return entry

    def _send_round(self):
        self._sent_at = time.monotonic()
        for peer in self.peers.values():
            peer.answered = False
            for ifname, ip in peer.targets:
                entry = self._sock(ifname)
                if entry is None:
                    continue
                sock, mac, own = entry
                self._by_ip[(ifname, ip)] = peer
                try:
                    sock.send(arp_request(mac, own, ip))
                except OSError as err:
                    log.debug("hanet liveness: send on %s failed: %s", ifname, err)
                    self._drop(ifname)

    def _drop(self, ifname):
        entry = self._socks.pop(ifname, None)
        if entry:
            entry[0].close()

    def _collect(self, until):
        """Read replies until ``until`` (monotonic), and once more without waiting at the
        end, so that what arrived while this thread was not running still counts."""
        while not self._stop.is_set():
            left = until - time.monotonic()
            socks = {e[0]: name for name, e in self._socks.items()}
            if not socks:
                if left > 0:
                    self._stop.wait(left)
                return
            ready, _, _ = select.select(list(socks), [], [], max(0.0, left))
            for sock in ready:
                self._read(sock, socks[sock])
            if left <= 0:
                return

    def _read(self, sock, ifname):
        try:
            while True:
                frame = sock.recv(128)
                ip = parse_arp_reply(frame)
                peer = self._by_ip.get((ifname, ip)) if ip else None
                if peer is not None and self._from_peer(ifname, ip, frame[22:28]):
                    self._target_seen[(ifname, ip)] = time.time()
                    if not peer.answered:
                        peer.rtt = time.monotonic() - self._sent_at
                    peer.answered = True
                    peer.last_seen = time.time()
        except BlockingIOError:
            pass
        except OSError:
            self._drop(ifname)

    def _vouched(self, peer, ifname, ip):
        """Whether ``peer`` is up and another of its addresses answered from its known
        MAC within the last ``misses`` periods: the host itself is there."""
        if peer is None or peer.state != UP:
            return False
        recent = time.time() - self.interval * max(1, self.misses)
        return any((i, a) != (ifname, ip) and (self._target_seen.get((i, a)) or 0) >= recent for i, a in peer.targets)

    def _from_peer(self, ifname, ip, mac):
        """Whether a reply for the peer's ``ip`` comes from the peer itself: the first
        MAC that answered for it, which every later reply must carry. Anybody else
        answering for it (proxy ARP, a device that took the address over) does not keep
        the peer alive. A new MAC is learnt when the peer is up and vouched for by
        another of its addresses (``_vouched``: a rebooted or replaced host), and
        anew when the prober restarts."""
        known = self._macs.setdefault((ifname, ip), mac)
        if known != mac and self._vouched(self._by_ip.get((ifname, ip)), ifname, ip):
            log.warning(
                "hanet liveness: %s on %s now answers from %s (was %s), and its host answers on its other links: learnt",
                ip,
                ifname,
                mac.hex(":"),
                known.hex(":"),
            )
            self._macs[(ifname, ip)] = known = mac
            self._warned.discard((ifname, ip))
        if known != mac and (ifname, ip) not in self._warned:
            self._warned.add((ifname, ip))
            log.warning(
                "hanet liveness: %s on %s answered by %s, not %s: not the peer",
                ip,
                ifname,
                mac.hex(":"),
                known.hex(":"),
            )
        return known == mac

    def _judge(self):
        now = time.time()
        for peer in self.peers.values():
            if peer.answered:
                peer.successes += 1
                peer.misses = 0
            else:
                peer.misses += 1
                peer.missed_total += 1
                peer.successes = 0
            new = None
            if peer.state != DOWN and peer.misses >= self.misses:
                new = DOWN
            elif peer.state == DOWN and peer.successes >= self.rise:
                new = UP
            elif peer.state == UNKNOWN and peer.successes >= 1:
                new = UP
            if new is not None:
                initial = peer.state == UNKNOWN
                peer.state = new
                try:
                    self.on_change(peer.name, new, now, initial)
                except Exception:  # a failing callback must not stop the probes
                    log.exception("hanet liveness: transition callback failed")
        self.judged.set()

    def _run(self):
        next_round = time.monotonic()
        while not self._stop.is_set():
            self._send_round()
            sent = time.monotonic()
            next_round += self.interval
            if next_round < sent:  # we fell behind (a stalled process): do not burst
                next_round = sent + self.interval
            # replies already queued are read before the verdict, also when this thread
            # was not scheduled for a while: only a reply that did not arrive is a miss
            self._collect(min(next_round, sent + self.window))
            if self._stop.is_set():
                break
            self._judge()
            self._collect(next_round)
