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


def _raw(interface):
    import socket

    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
    sock.bind((interface, 0x0806))
    return sock


def garp(ip, interface=None, count=3, interval=0.02):
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
        for sock in socks:
            sock.close()
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


def garp_many(pairs, count=3, interval=0.02):
    """Announce several addresses at once: ``pairs`` is [(ip, interface)]. Each round
    sends every address's frames, so the first announcement of every address goes out
    before any repeat. Returns the number of frames sent."""
    from . import liveness

    by_iface = {}
    for ip, iface in pairs:
        by_iface.setdefault(iface, []).append(ip)
    socks, frames = {}, {}
    sent = 0
    try:
        for iface, ips in by_iface.items():
            socks[iface] = sock = _raw(iface)
            mac = liveness._hwaddr(sock, iface)  # pylint: disable=protected-access
            frames[iface] = [f for ip in ips for f in garp_bytes(ip, mac)]
        for i in range(int(count)):
            for iface, fs in frames.items():
                for frame in fs:
                    socks[iface].send(frame)
                    sent += 1
            if i + 1 < count:
                time.sleep(interval)
    finally:
        for sock in socks.values():
            sock.close()
    return sent
