"""Gratuitous ARP and duplicate address detection (scapy, on the host's own links).

``garp`` announces that this host now answers for an address (after a gateway or a
floating IP is bound), so that neighbours' ARP caches follow at once. ``probe``
asks whether anybody else answers for an address (RFC 5227 style: sender IP
0.0.0.0), which a new owner does before binding a moved address.
"""
from __future__ import annotations

import time

BROADCAST = "ff:ff:ff:ff:ff:ff"


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


def garp(ip, interface=None, count=3, interval=0.02):
    """Send ``count`` rounds of gratuitous ARP for ``ip`` out of ``interface`` (default:
    the link that holds it). Returns {ip, interface, mac, sent}."""
    from scapy.sendrecv import sendp

    if interface is None:
        interface, mac = link_of(ip)
        if interface is None:
            raise ValueError(f"{ip} is on no interface of this host; name the interface")
    else:
        mac = mac_of(interface)
    frames = garp_frames(ip, mac)
    sent = 0
    for i in range(int(count)):
        sendp(frames, iface=interface, verbose=False)
        sent += len(frames)
        if i + 1 < count:
            time.sleep(interval)
    return {"ip": ip, "interface": interface, "mac": mac, "sent": sent}


def probe(ip, interface, timeout=0.2, tries=2):
    """Duplicate address detection: the MAC that answers for ``ip`` on ``interface``
    (someone else holds it), or None when nobody answers within the timeout."""
    from scapy.layers.l2 import ARP, Ether
    from scapy.sendrecv import srp

    mac = mac_of(interface)
    frame = Ether(src=mac, dst=BROADCAST) / ARP(op=1, hwsrc=mac, psrc="0.0.0.0", pdst=ip)
    for _ in range(tries):
        answered, _ = srp(frame, iface=interface, timeout=timeout, verbose=False)
        for _, reply in answered:
            if reply.haslayer(ARP) and reply[ARP].psrc == ip and reply[ARP].hwsrc != mac:
                return reply[ARP].hwsrc
    return None


def garp_many(pairs, count=3, interval=0.02):
    """Announce several addresses at once: ``pairs`` is [(ip, interface)]. Each round
    sends every address's frames, so the first announcement of every address goes out
    before any repeat. Returns the number of frames sent."""
    from scapy.sendrecv import sendp

    by_iface = {}
    for ip, iface in pairs:
        by_iface.setdefault(iface, []).extend(garp_frames(ip, mac_of(iface)))
    sent = 0
    for i in range(int(count)):
        for iface, frames in by_iface.items():
            sendp(frames, iface=iface, verbose=False)
            sent += len(frames)
        if i + 1 < count:
            time.sleep(interval)
    return sent
