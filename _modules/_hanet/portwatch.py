"""The beacon's port watch: VM ports are bound when they are plugged, not at the next apply.

A thread subscribed to the kernel's link events (a netlink socket) calls
``ruleset.bind_ports`` whenever a link appears, goes, changes its master or its MAC:
the (MAC, IP) of the NIC whose tap it is (libvirt's rule) is bound to it in the
anti-spoofing table's dynamic sets, in one nft transaction, within milliseconds; an
unplugged port's bindings go with it. Nothing else of the ruleset changes, so the next
highstate finds nothing to do. Bursts of events (a VM with several NICs, a host
starting many VMs) are bound together: the thread waits ``settle`` seconds after an
event for more before binding.

On a kernel whose nftables lack ``meta ibrname`` the bridge's VM ports are the elements
of a port set, filled here too: a port is guarded from the moment it is bound, a few
milliseconds after it appears (with ``meta ibrname``, from the start).
"""

from __future__ import annotations

import errno
import logging
import select
import socket
import time

from .common import Worker

log = logging.getLogger(__name__)

RTMGRP_LINK = 0x1  # the rtnetlink multicast group of link events (RTM_NEWLINK, RTM_DELLINK)


def subscribe():
    """A netlink socket that receives the link events of this network namespace, and
    nothing else. A plain socket, not pyroute2's: pyroute2 0.9's ``IPRoute.get()`` reads
    datagrams into an internal queue and returns one, so ``select`` on its descriptor can
    say "nothing" while events wait there (an unplug left bound until the next event)."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind((0, RTMGRP_LINK))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def drain(sock):
    """Read every datagram queued on ``sock``; True if there was one (or the kernel
    dropped some: ENOBUFS, the buffer overflowed in a burst)."""
    got = False
    while True:
        try:
            sock.recv(65536)
            got = True
        except BlockingIOError:
            return got
        except OSError as exc:
            if exc.errno != errno.ENOBUFS:
                raise
            got = True


class PortWatch(Worker):
    """``bind()`` at start and after every burst of link events; a bind that fails is
    tried again every ``retry`` seconds until one succeeds (nothing else may happen on the
    host to wake the watch)."""

    thread_name = "hanet-ports"

    def __init__(self, bind, settle=0.005, retry=0.5):
        super().__init__()
        self.bind = bind
        self.settle = float(settle)
        self.retry = float(retry)
        self.binds = 0  # how often it bound (tests, status)
        self.failures = 0  # binds that failed in a row
        self.last_bound_at = None

    def _bind(self):
        try:
            self.bind()
        except Exception:  # pylint: disable=broad-except  (log it; tried again after `retry`)
            self.failures += 1
            if self.failures == 1:
                log.warning("hanet port watch: binding the VM ports failed (trying again)", exc_info=True)
            else:
                log.debug("hanet port watch: binding the VM ports failed again", exc_info=True)
            return False
        if self.failures:
            log.warning("hanet port watch: the VM ports are bound after %d failed tries", self.failures)
        self.failures = 0
        self.binds += 1
        self.last_bound_at = time.time()
        return True

    def _run(self):
        with subscribe() as sock:  # subscribed before the first bind: no event falls between
            pending = True
            while not self._stop.is_set():
                if pending:
                    deadline = time.monotonic() + self.settle
                    while True:  # the rest of the burst
                        left = deadline - time.monotonic()
                        if left <= 0 or not select.select([sock], [], [], left)[0]:
                            break
                        drain(sock)
                    pending = not self._bind()
                wait = self.retry if pending else 0.5
                if select.select([sock], [], [], wait)[0] and drain(sock):
                    pending = True
