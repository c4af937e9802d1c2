"""The beacon's owner watch: which MAC answers for a network host's ``dhcp_server`` now.

On a hardware-gateway network served by network hosts, an instance's frames that must
leave through its floating IP's SNAT (and its metadata requests, and what goes to
``force_snat_range``) are readdressed on its own host's bridge to the network's owner,
nova's ebtables redirect pointed at the network host (``ruleset``: the bridge table's
``<bridge>_via`` map). The owner moves in a failover, so this host follows it as a
neighbour's ARP cache would:

- it hears the ARP the owner sends on the bridge (the announcements after a takeover
  or a planned move, its answers), and takes the sender's MAC for the address;
- it asks every ``probe_s`` seconds itself (RFC 5227 style, sender 0.0.0.0: the host needs
  no address on the network), every ``UNKNOWN_S`` while it knows no MAC yet;
- where this host holds the address itself (a network host with instances), the bridge's
  own MAC: the frame goes up to its own IP stack.

A change is written to ``<root_dir>/run/hanet/follow.json`` and put into the kernel by
``rebind({ip: MAC})`` (the beacon: ``ruleset.bind_owners``, the ``_via`` maps alone;
``bind_ports``, after every apply and port event, reads the same file). Until a MAC is known
the frames go on to the hardware router, as they would without a floating IP. A MAC
that stops answering is kept: without an owner the network has no floating IP to serve.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time

from .common import Worker, write_atomic

log = logging.getLogger(__name__)

PROBE_S = 1.0  # how often the owner is asked while its MAC is known
UNKNOWN_S = 0.25  # ... and while it is not
FILE = "follow.json"


def learnt(paths):
    """{ip: MAC} the owner watch learnt (``{}`` when it knows nothing yet)."""
    try:
        with open(paths.run(FILE), encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def forget(paths):
    """Remove what the watch learnt (this host follows no owner any more)."""
    try:
        os.unlink(paths.run(FILE))
    except FileNotFoundError:
        pass


def sender_of(frame):
    """(sender IP, sender MAC) of an IPv4-over-Ethernet ARP request or reply, or None
    (a probe's sender 0.0.0.0 included: it says nothing about who holds an address)."""
    if len(frame) < 42 or frame[12:14] != b"\x08\x06" or frame[14:20] != b"\x00\x01\x08\x00\x06\x04":
        return None
    if frame[20:22] not in (b"\x00\x01", b"\x00\x02"):
        return None
    ip = socket.inet_ntoa(frame[28:32])
    mac = frame[22:28]
    if ip == "0.0.0.0" or mac == b"\x00" * 6 or mac[0] & 1:
        return None
    return ip, ":".join(f"{b:02x}" for b in mac)


class Follow(Worker):
    """Keeps ``learnt`` true for ``targets`` [(bridge, ip)] and calls ``rebind(macs)`` after
    each change (again every round until a rebind succeeds). A bridge that is missing
    (not created yet, or re-created) is opened again the next round; errors are logged
    and the watch goes on."""

    thread_name = "hanet-follow"
    BURST = 64  # frames read per wake-up at most: a flood of ARP never starves the rounds

    def __init__(self, paths, targets, rebind, probe_s=PROBE_S, local=None):
        super().__init__()
        self.paths = paths
        self.targets = sorted({(str(b), str(ip)) for b, ip in targets})
        self.rebind = rebind
        self.probe_s = float(probe_s)
        self.local = local or _local_addresses  # {bridge: [ip, ...]} held by this host
        wanted = {ip for _, ip in self.targets}
        self.macs = {ip: mac for ip, mac in learnt(paths).items() if ip in wanted}
        self.changes = 0  # how often a MAC was learnt or changed (tests, status)
        self._unbound = False  # the last rebind failed: tried again every round

    def learn(self, ip, mac):
        """Take ``mac`` for ``ip``; True if that changed what the kernel holds. The file
        first, then the view: a write that fails is tried again with the next frame."""
        if self.macs.get(ip) == mac:
            return False
        before = self.macs.get(ip)
        path = self.paths.run(FILE)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_atomic(path, json.dumps(dict(self.macs, **{ip: mac}), sort_keys=True) + "\n")
        self.macs[ip] = mac
        self.changes += 1
        log.warning("hanet follow: %s is answered by %s now (was %s)", ip, mac, before or "unknown")
        self._bind()
        return True

    def _bind(self):
        try:
            self.rebind(dict(self.macs))
            self._unbound = False
        except Exception:  # pylint: disable=broad-except  (tried again next round)
            if not self._unbound:
                log.exception("hanet follow: putting the owners' MACs into the bridge table failed")
            self._unbound = True

    def _run(self):
        import select

        socks = {}  # bridge -> (socket, its MAC as bytes, its ifindex)
        next_round = 0.0
        try:
            while not self._stop.is_set():
                try:
                    now = time.monotonic()
                    if now >= next_round:
                        self._round(socks)
                        known = all(ip in self.macs for _, ip in self.targets)
                        next_round = now + (self.probe_s if known else UNKNOWN_S)
                    wait = max(0.0, next_round - time.monotonic())
                    if not socks:
                        self._stop.wait(wait)
                        continue
                    poller = select.poll()
                    by_fd = {}
                    for bridge, (sock, mac, _) in socks.items():
                        poller.register(sock.fileno(), select.POLLIN)
                        by_fd[sock.fileno()] = (sock, bridge, mac)
                    for fd, _ in poller.poll(wait * 1000):
                        self._hear(*by_fd[fd])
                except Exception:  # pylint: disable=broad-except  (log it; the watch goes on)
                    log.exception("hanet follow: a round failed")
                    self._stop.wait(UNKNOWN_S)
        finally:
            for sock, _, _ in socks.values():
                sock.close()

    def _open(self, socks, bridge):
        """``socks[bridge]`` opened, or re-opened when the bridge was re-created (a socket
        stays bound to the index of a link that is gone); False when it does not exist."""
        from . import arp, liveness

        try:
            index = socket.if_nametoindex(bridge)
        except OSError:
            index = None
        have = socks.get(bridge)
        if have is not None and have[2] == index:
            return True
        if have is not None:
            socks.pop(bridge)[0].close()
        if index is None:
            return False
        sock = arp._raw(bridge)  # pylint: disable=protected-access
        try:
            sock.setblocking(False)
            mac = liveness._hwaddr(sock, bridge)  # pylint: disable=protected-access
        except BaseException:
            sock.close()
            raise
        socks[bridge] = (sock, mac, index)
        return True

    def _round(self, socks):
        """Open what is missing, take this host's own addresses, ask for the others."""
        from . import liveness

        if self._unbound:
            self._bind()
        try:
            held = self.local()
        except Exception:  # pylint: disable=broad-except
            log.debug("hanet follow: reading this host's addresses failed", exc_info=True)
            held = {}
        for bridge, ip in self.targets:
            try:
                if not self._open(socks, bridge):
                    continue
            except OSError as err:
                log.debug("hanet follow: no socket on %s yet: %s", bridge, err)
                continue
            sock, mac, _ = socks[bridge]
            if ip in held.get(bridge, ()):
                self.learn(ip, ":".join(f"{b:02x}" for b in mac))
                continue
            try:
                sock.send(liveness.arp_request(mac, None, ip))
            except OSError as err:  # a link that is down: asked again next round
                log.debug("hanet follow: asking for %s on %s failed: %s", ip, bridge, err)

    def _hear(self, sock, bridge, own):
        for _ in range(self.BURST):
            try:
                frame = sock.recv(128)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                log.debug("hanet follow: reading on %s failed: %s", bridge, err)
                return
            got = sender_of(frame)
            if got is None or frame[22:28] == own or (bridge, got[0]) not in self.targets:
                continue
            self.learn(*got)


def _local_addresses():
    from . import links

    return {link: [a.split("/")[0] for a in addrs] for link, addrs in links.addresses_by_link().items()}
