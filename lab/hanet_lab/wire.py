"""What a frame on the wire says, as a guest reading raw frames sees it (tests' helpers)."""

from __future__ import annotations

import struct


def udp_ports(ip):
    """(source port, destination port) of an IPv4 packet ``ip`` carrying UDP, else None."""
    ihl = (ip[0] & 15) * 4
    if len(ip) < ihl + 8 or ip[9] != 17:
        return None
    return struct.unpack("!HH", ip[ihl : ihl + 4])


def udp_checksum_valid(ip):
    """Whether the UDP checksum of IPv4 packet ``ip`` is right (one's complement over the
    pseudo-header and the datagram). A packet sent with checksum offload and never filled
    in (a veth, a VM's virtual NIC) fails it."""
    ihl = (ip[0] & 15) * 4
    udp = ip[ihl : ihl + struct.unpack("!H", ip[ihl + 4 : ihl + 6])[0]]
    data = ip[12:20] + struct.pack("!BBH", 0, 17, len(udp)) + udp
    data += b"\0" * (len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total == 0xFFFF
