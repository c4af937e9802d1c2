"""Gratuitous ARP and duplicate address detection, on the host's own links.

``garp_many`` announces that this host now answers for addresses (after a gateway or
floating IPs are bound), so that neighbours' ARP caches follow at once. ``probe_many``
asks whether anybody else answers for addresses (RFC 5227 style: sender IP 0.0.0.0),
which a new owner does before binding moved addresses. Both run on the failover path:
frames are built by hand and sent on raw sockets, the interface's MAC read with one
ioctl on that socket (no netlink dump, no scapy: ``garp_frames`` keeps scapy's version,
which the unit tests compare the hand-built frames with).
"""

from __future__ import annotations

import time

BROADCAST = "ff:ff:ff:ff:ff:ff"
DAD_TIMEOUT_S = 0.03  # a live holder's kernel answers an ARP request within a millisecond

# Pacing of large announcements, per interface: a token bucket. The first GARP_BURST
# frames go at once (every announcement of up to GARP_BURST / 2 addresses: a gateway and
# its floating IPs, unpaced), then at most GARP_PPS frames a second: switches police ARP
# to their CPU (control-plane policing), and a burst of thousands of frames is dropped
# there. 2,000 frames/s announces 1,000 addresses (their first frames go first) in 0.4 s.
GARP_BURST = 256
GARP_PPS = 2000
GARP_INTERVAL = 0.02  # between the rounds of an announcement (s)


def link_of(ip):
    """(ifname, mac) of the link that holds ``ip`` on this host, or (None, None)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        for addr in ipr.get_addr(family=2):
            if addr.get_attr("IFA_ADDRESS") == ip:
                link = ipr.get_links(addr["index"])[0]
                return link.get_attr("IFLA_IFNAME"), link.get_attr("IFLA_ADDRESS")
    return None, None


def mac_of(ifname):
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            raise ValueError(f"no interface {ifname!r} on this host")
        return ipr.get_links(idx[0])[0].get_attr("IFLA_ADDRESS")


def garp_frames(ip, mac):
    """The two announcements: an ARP request and an ARP reply, both sender=target=ip."""
    from scapy.layers.l2 import ARP, Ether

    return [
        Ether(src=mac, dst=BROADCAST) / ARP(op=1, hwsrc=mac, psrc=ip, hwdst="00:00:00:00:00:00", pdst=ip),
        Ether(src=mac, dst=BROADCAST) / ARP(op=2, hwsrc=mac, psrc=ip, hwdst=BROADCAST, pdst=ip),
    ]


def _raw(interface, receive=True):
    """A packet socket on ``interface``; ``receive``: it also receives the ARP frames
    (a send-only socket binds protocol 0: it receives nothing, and registers no receive
    hook)."""
    import socket

    proto = 0x0806 if receive else 0
    # created with protocol 0, the protocol given at the bind: a socket created with one
    # registers its hook at once, and the bind then replaces it, waiting for an RCU grace
    # period (3-30 ms measured here)
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        sock.bind((interface, proto))
    except BaseException:
        sock.close()
        raise
    return sock


def _close_later(socks):
    """Close packet sockets off the caller's path: closing one waits for an RCU grace
    period in the kernel (``packet_release``: 6-30 ms measured here), which a takeover
    paid once per interface between binding an address and announcing the next."""
    import threading

    socks = list(socks)
    if socks:
        threading.Thread(target=lambda: [s.close() for s in socks], name="hanet-arp-close", daemon=True).start()


def garp(ip, interface=None, count=3, interval=GARP_INTERVAL):
    """Send ``count`` rounds of gratuitous ARP for ``ip`` out of ``interface`` (default:
    the link that holds it). Returns {ip, interface, mac, sent}."""
    if interface is None:
        interface, mac = link_of(ip)
        if interface is None:
            raise ValueError(f"{ip} is on no interface of this host; name the interface")
    else:
        mac = mac_of(interface)
    sent = garp_many([(ip, interface)], count, interval)
    return {"ip": ip, "interface": interface, "mac": mac, "sent": sent}


def probe(ip, interface, timeout=0.2, tries=2):
    """Duplicate address detection: the MAC that answers for ``ip`` on ``interface``
    (someone else holds it), or None when nobody answers within ``timeout`` per try."""
    return probe_many([(ip, interface)], timeout, tries).get(ip)


def probe_many(pairs, timeout=DAD_TIMEOUT_S, tries=1):
    """Duplicate address detection of several addresses at once: ``pairs`` is
    [(ip, interface)]; every probe goes out first, then the replies are collected for
    ``timeout`` (per try), so that a thousand floating IPs cost one timeout, not a
    thousand. Returns {ip: MAC of the other holder} for the addresses someone else
    answers for. The requests are built by hand and sent on raw sockets (no netlink
    dump, no scapy set-up: this runs on the failover path, before anything is bound)."""
    import select

    from . import liveness

    wanted = {}
    for ip, iface in pairs:
        wanted.setdefault(iface, set()).add(ip)
    socks, found = {}, {}
    try:
        for iface in wanted:
            sock = _raw(iface)
            socks[sock] = (iface, liveness._hwaddr(sock, iface))  # pylint: disable=protected-access
            sock.setblocking(False)
        for _ in range(tries):
            for sock, (iface, mac) in socks.items():
                for ip in sorted(wanted[iface] - set(found)):
                    sock.send(liveness.arp_request(mac, None, ip))  # sender 0.0.0.0 (RFC 5227)
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                ready = select.select(list(socks), [], [], left)[0]
                if not ready:
                    break
                for sock in ready:
                    iface, mac = socks[sock]
                    try:
                        reply = sock.recv(128)
                    except BlockingIOError:
                        continue
                    ip, sender = liveness.parse_arp_reply(reply), reply[22:28]
                    if ip in wanted[iface] and sender != mac and ip not in found:
                        found[ip] = ":".join(f"{b:02x}" for b in sender)
            if len(found) == sum(len(v) for v in wanted.values()):
                break
    finally:
        _close_later(socks)
    return found


def garp_bytes(ip, mac):
    """``garp_frames`` as bytes, built by hand: ``mac`` is the sender's 6 bytes."""
    import socket
    import struct

    from . import liveness

    bcast, addr = b"\xff" * 6, socket.inet_aton(ip)
    reply = (
        bcast + mac + struct.pack("!H", 0x0806) + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 2) + mac + addr + bcast + addr
    )
    return [liveness.arp_request(mac, ip, ip), reply]


def garp_schedule(counts, rounds, interval=GARP_INTERVAL, burst=GARP_BURST, pps=GARP_PPS):
    """When each frame of an announcement goes (pure). ``counts``: {interface: frames per
    round}. Returns [(at, interface, index)], sorted by ``at`` (seconds from the start):
    round after round, each at least ``interval`` after the previous round's last frame,
    and on each interface the k-th frame of the whole announcement no earlier than
    ``(k + 1 - burst) / pps`` (a bucket of ``burst`` tokens, refilled at ``pps``)."""
    out, start, sent = [], 0.0, dict.fromkeys(counts, 0)
    for r in range(int(rounds)):
        last = start
        for iface, n in counts.items():
            for i in range(n):
                k = sent[iface]
                sent[iface] += 1
                at = max(start, (k + 1 - burst) / pps) if k >= burst else start
                out.append((at, iface, i))
                last = max(last, at)
        start = last + interval if r + 1 < rounds else last
    out.sort(key=lambda x: x[0])
    return out


def garp_many(pairs, count=3, interval=GARP_INTERVAL, frames_of=(0, 1)):
    """Announce several addresses at once: ``pairs`` is [(ip, interface)]. Each round
    sends every address's first frame (the ARP request), then every address's second (the
    reply), so the first announcement of every address goes out before any repeat; past
    ``GARP_BURST`` frames an interface is paced to ``GARP_PPS`` (``garp_schedule``).
    ``frames_of``: which of the two frames (0: the request, 1: the reply) each round
    sends. Returns the number of frames sent."""
    from . import liveness

    by_iface = {}
    for ip, iface in pairs:
        by_iface.setdefault(iface, []).append(ip)
    socks, frames = {}, {}
    sent = 0
    try:
        for iface, ips in by_iface.items():
            socks[iface] = sock = _raw(iface, receive=False)
            mac = liveness._hwaddr(sock, iface)  # pylint: disable=protected-access
            both = [garp_bytes(ip, mac) for ip in ips]
            frames[iface] = [b[k] for k in frames_of for b in both]
        t0 = time.monotonic()
        for at, iface, i in garp_schedule({k: len(v) for k, v in frames.items()}, count, interval):
            wait = t0 + at - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            socks[iface].send(frames[iface][i])
            sent += 1
    finally:
        _close_later(socks.values())
    return sent
