"""The master's second opinion of a suspect network host: ICMP echo from the master.

``check`` asks once (a runner without the engine); ``Watch`` asks continuously in a
thread of its own (the hanet_failover engine), so that when a liveness report comes in
the answer is already known. Both say "alive", "dead" or None: None whenever no check
could be made (no address to ask, no raw socket, a watch that stalled or has not
judged the host yet). None never counts as dead.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import struct
import threading
import time

from .common import Worker

log = logging.getLogger(__name__)

ALIVE, DEAD = "alive", "dead"
PAYLOAD = b"hanet-second-opinion"


def _checksum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def echo(ident, seq):
    """An ICMP echo request (bytes, no IP header)."""
    hdr = struct.pack("!BBHHH", 8, 0, 0, ident, seq & 0xFFFF)
    return struct.pack("!BBHHH", 8, 0, _checksum(hdr + PAYLOAD), ident, seq & 0xFFFF) + PAYLOAD


def parse_reply(pkt):
    """(ident, seq) of an echo reply (a raw IPv4 packet), or None."""
    if len(pkt) < 20:
        return None
    ihl = (pkt[0] & 0x0F) * 4
    if len(pkt) < ihl + 8:
        return None
    typ, _, _, rid, rseq = struct.unpack("!BBHHH", pkt[ihl : ihl + 8])
    return (rid, rseq) if typ == 0 else None


def _raw_socket():
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    sock.setblocking(False)
    return sock


def _drain(sock, ident, sources, seq=None):
    """Sources among ``sources`` whose echo reply to ``ident`` (and ``seq``) is queued."""
    got = set()
    while True:
        try:
            pkt, (src, _) = sock.recvfrom(1500)
        except (BlockingIOError, InterruptedError):
            return got
        reply = parse_reply(pkt)
        if reply and reply[0] == ident and (seq is None or reply[1] == seq) and src in sources:
            got.add(src)


def check(addresses, timeout=0.05, tries=2):
    """ "alive" when any of ``addresses`` answers an ICMP echo within ``timeout`` (echoes
    sent ``tries`` times, spread over it), "dead" when none does, None when no check
    could be made (no address, no raw socket). A reply that arrived while this process
    was not scheduled is still read before the verdict."""
    addresses = list(addresses or ())
    if not addresses:
        return None
    try:
        sock = _raw_socket()
    except OSError as err:
        log.warning("hanet: no ICMP check from the master (%s)", err)
        return None
    ident = os.getpid() & 0xFFFF
    deadline = time.monotonic() + timeout
    sent = 0
    try:
        for seq in range(tries):
            for addr in addresses:
                try:
                    sock.sendto(echo(ident, seq), (addr, 0))
                    sent += 1
                except OSError:
                    pass  # no route from the master: that address cannot vouch
            until = min(deadline, time.monotonic() + timeout / tries)
            while True:
                left = until - time.monotonic()
                if left <= 0 or not select.select([sock], [], [], left)[0]:
                    break
                if _drain(sock, ident, addresses):
                    return ALIVE
            if time.monotonic() >= deadline:
                break
        if _drain(sock, ident, addresses):
            return ALIVE
        return DEAD if sent else None
    finally:
        sock.close()


class Watch:
    """The master's continuous view of the network hosts: an ICMP echo to every address
    of every watched host each ``interval``. A host whose echoes went unanswered
    ``dead_after`` rounds in a row (each round waits a whole interval) is dead at once,
    one that answered within the last two rounds is alive; anything less clear (a host
    just added, a watch that stalled or cannot open its socket) gives no verdict."""

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

    def addresses(self, host):
        """The addresses watched for ``host`` (sorted)."""
        with self._lock:
            return tuple(sorted(a for a, h in self._targets.items() if h == host))

    def verdict(self, host):
        """ "alive", "dead" or None (not watched, no address, or a view that may be stale)."""
        with self._lock:
            st = self._state.get(host)
            if st is None or self._thread is None or not self._thread.is_alive():
                return None
            if host not in self._targets.values():
                return None
            if time.monotonic() - self._last_round > 3 * self.interval + 0.05:
                return None
            if st[1]:
                return ALIVE
            return DEAD if st[0] >= self.dead_after else None

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
            sock = _raw_socket()
        except OSError as err:
            log.warning("hanet: the master cannot watch the network hosts (%s)", err)
            return
        ident, seq = (os.getpid() + 1) & 0xFFFF, 0
        try:
            while not self._stop.is_set():
                with self._lock:
                    targets = dict(self._targets)
                seq = (seq + 1) & 0xFFFF
                for addr in targets:
                    try:
                        sock.sendto(echo(ident, seq), (addr, 0))
                    except OSError:
                        pass
                answered = set()
                until = time.monotonic() + self.interval
                while True:
                    left = until - time.monotonic()
                    if select.select([sock], [], [], max(0.0, left))[0]:
                        answered |= {targets[a] for a in _drain(sock, ident, targets, seq)}
                    if left <= 0:
                        break
                self._judge(answered)
        finally:
            sock.close()

    def _judge(self, answered):
        with self._lock:
            for host, st in self._state.items():
                if host in answered:
                    self._state[host] = [0, True]
                else:
                    self._state[host] = [st[0] + 1, st[0] == 0 and st[1]]
            self._last_round = time.monotonic()


# setsockopt(SOL_RAW, ICMP_FILTER, mask): the ICMP types (bits) a raw socket is not given
SOL_RAW, ICMP_FILTER, ICMP_ECHOREPLY = 255, 1, 0


def _replies_only(sock):
    """Only echo replies reach ``sock`` (Linux): the pings a host's VMs send to their
    gateway, or a flood of them, never wake the thread that reads it."""
    try:
        sock.setsockopt(SOL_RAW, ICMP_FILTER, struct.pack("I", ~(1 << ICMP_ECHOREPLY) & 0xFFFFFFFF))
    except OSError as err:  # not Linux: every ICMP packet is read and dropped by ident
        log.debug("hanet: no ICMP_FILTER: %s", err)
    return sock


class Silence(Worker):
    """An ICMP echo to each of ``targets`` every ``period`` seconds, in a thread of its
    own, so that whether a target has fallen silent is known at any moment without
    waiting for an answer (the fence's view of the master, ``fence.Fence``).

    ``silent(target, window, grace)``: the target answered no echo within the last
    ``window`` seconds although at least two echoes to it went out in that window, each
    at least ``grace`` seconds ago (time enough to be answered). An echo that could not
    be sent (no route: the link is gone) counts as unanswered. A thread that did not run
    (a starved process) sent nothing: no evidence, not silent; nor is a watch whose
    socket could not be opened or whose thread ended (``alive``). Replies that arrived
    while this process was not scheduled are read before each verdict. The socket is
    given echo replies only (``ICMP_FILTER``)."""

    thread_name = "hanet-fence-icmp"

    def __init__(self, targets, period):
        super().__init__()
        self.targets = [t for t in targets if t]
        self.period = float(period)
        self._sent = {t: [] for t in self.targets}  # monotonic times of the recent echoes
        self._heard = dict.fromkeys(self.targets, 0.0)  # monotonic time of the last reply
        self._lock = threading.Lock()
        self._sock = None
        self._ident = (os.getpid() + 2) & 0xFFFF

    def start(self):
        try:
            self._sock = _replies_only(_raw_socket())
        except OSError as err:
            log.warning("hanet: no ICMP watch of %s (%s): no evidence of isolation", self.targets, err)
            return self
        return super().start()

    def stop(self, timeout=2.0):
        super().stop(timeout)
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def _read(self):
        """Replies queued on the socket (with the lock held)."""
        if self._sock is None:
            return
        now = time.monotonic()
        for src in _drain(self._sock, self._ident, self._heard):
            self._heard[src] = now

    def _send(self, seq):
        with self._lock:
            now = time.monotonic()
            for t in self.targets:
                try:
                    self._sock.sendto(echo(self._ident, seq), (t, 0))
                except OSError:
                    pass  # no route: unanswered
                sent = self._sent[t]
                sent.append(now)
                del sent[:-64]

    def _run(self):
        poller = select.poll()  # not select(): a minion's descriptors may pass 1024
        poller.register(self._sock.fileno(), select.POLLIN)
        seq, said = 0, 0.0
        while not self._stop.is_set():
            try:
                seq = (seq + 1) & 0xFFFF
                self._send(seq)
                until = time.monotonic() + self.period
                while not self._stop.is_set():
                    left = until - time.monotonic()
                    if left <= 0:
                        break
                    if poller.poll(left * 1000):
                        with self._lock:
                            self._read()
            except Exception as err:  # pylint: disable=broad-except  (keep watching; say so)
                if self._stop.is_set():
                    return  # the socket was closed by stop()
                if time.monotonic() - said > 60:
                    said = time.monotonic()
                    log.warning("hanet: the ICMP watch of %s: %s", self.targets, err, exc_info=True)
                self._stop.wait(self.period)

    def silent(self, target, window, grace):
        with self._lock:
            if not self.alive or target not in self._heard:
                return False
            self._read()
            now = time.monotonic()
            if now - self._heard[target] < window:
                return False
            asked = [s for s in self._sent[target] if now - window <= s <= now - grace]
            return len(asked) >= 2
