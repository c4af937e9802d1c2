"""Many IPv4 addresses added or deleted in a few netlink round trips.

pyroute2's ``IPRoute.addr()`` sends one request and waits for its answer: about 0.6 ms
an address here, so a takeover binding 1,000 floating IPs spent 0.6 s in it (and 1.1 s
more when every address also looked its interface up). Here the requests go in chunks,
many netlink messages per datagram (the kernel handles every message of a datagram in
turn and acknowledges each), and the answers are read after each chunk: 1,000
addresses take a few milliseconds. A plain socket and ``struct``: no parsing beyond
the acknowledgements.
"""

from __future__ import annotations

import errno
import os
import socket
import struct

RTM_NEWADDR, RTM_DELADDR = 20, 21
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
IFA_ADDRESS, IFA_LOCAL, IFA_BROADCAST = 1, 2, 4
CHUNK = 256  # messages per datagram (40 bytes each)

_HDR = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_IFA = struct.Struct("=BBBBI")  # ifaddrmsg: family, prefixlen, flags, scope, index
_RTA = struct.Struct("=HH")  # rtattr: len, type


def message(action, index, address, prefixlen, seq, broadcast=None):
    """One RTM_NEWADDR (``add``: create, fail if it exists) or RTM_DELADDR (``del``)
    request for ``address``/``prefixlen`` on the link ``index``, with ``broadcast``
    when given (pure)."""
    addr = socket.inet_aton(address)
    body = (
        _IFA.pack(socket.AF_INET, int(prefixlen), 0, 0, int(index))
        + _RTA.pack(8, IFA_LOCAL)
        + addr
        + _RTA.pack(8, IFA_ADDRESS)
        + addr
    )
    if broadcast:
        body += _RTA.pack(8, IFA_BROADCAST) + socket.inet_aton(broadcast)
    if action == "add":
        kind, flags = RTM_NEWADDR, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
    elif action == "del":
        kind, flags = RTM_DELADDR, NLM_F_REQUEST | NLM_F_ACK
    else:
        raise ValueError(f"action must be add or del, not {action!r}")
    return _HDR.pack(_HDR.size + len(body), kind, flags, seq, 0) + body


def acks(data):
    """{seq: errno} of the NLMSG_ERROR answers in ``data`` (0: done) (pure)."""
    out, off = {}, 0
    while off + _HDR.size <= len(data):
        length, kind, _flags, seq, _pid = _HDR.unpack_from(data, off)
        if length < _HDR.size:
            break
        if kind == NLMSG_ERROR:
            (code,) = struct.unpack_from("=i", data, off + _HDR.size)
            out[seq] = -code
        off += (length + 3) & ~3
    return out


def change(ops):
    """Apply ``ops``, a list of (action, index, address, prefixlen[, broadcast]), in
    this network namespace. Returns the errno of each op in order (0: done; e.g. EEXIST for an
    address already there, EADDRNOTAVAIL for one already gone). Raises OSError when
    the kernel does not answer every request."""
    results = [None] * len(ops)
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind((0, 0))
        sock.settimeout(5.0)
        base = int.from_bytes(os.urandom(3), "big") << 8  # this batch's sequence numbers
        for start in range(0, len(ops), CHUNK):
            chunk = ops[start : start + CHUNK]
            seqs = {}
            buf = bytearray()
            for i, op in enumerate(chunk, start):
                seq = (base + i) & 0xFFFFFFFF
                seqs[seq] = i
                buf += message(*op[:4], seq, *op[4:5])
            sock.sendto(bytes(buf), (0, 0))
            while seqs:
                try:
                    data = sock.recv(1 << 16)
                except socket.timeout as exc:
                    raise OSError(errno.ETIMEDOUT, f"netlink: {len(seqs)} address requests unanswered") from exc
                for seq, code in acks(data).items():
                    if seq in seqs:
                        results[seqs.pop(seq)] = code
    finally:
        sock.close()
    return results
