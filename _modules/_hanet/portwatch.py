"""The beacon's port watch: VM ports are bound when they are plugged, not at the next apply.

A thread subscribed to the kernel's link events (netlink, pyroute2) calls
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

import logging
import select
import time

from .common import Worker

log = logging.getLogger(__name__)

EVENTS = ("RTM_NEWLINK", "RTM_DELLINK")


class PortWatch(Worker):
    """``bind()`` at start and after every burst of link events."""

    thread_name = "hanet-ports"

    def __init__(self, bind, settle=0.005):
        super().__init__()
        self.bind = bind
        self.settle = float(settle)
        self.binds = 0  # how often it bound (tests, status)
        self.last_bound_at = None

    def _bind(self):
        try:
            self.bind()
            self.binds += 1
            self.last_bound_at = time.time()
        except Exception:  # pylint: disable=broad-except  (log it; the next event tries again)
            log.warning("hanet port watch: binding the VM ports failed", exc_info=True)

    def _run(self):
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            ipr.bind()  # subscribe before the first bind: no event falls between
            self._bind()
            while not self._stop.is_set():
                ready, _, _ = select.select([ipr], [], [], 0.5)
                if not ready:
                    continue
                if not any(m.get("event") in EVENTS for m in ipr.get()):
                    continue
                deadline = time.monotonic() + self.settle
                while True:  # the rest of the burst
                    left = deadline - time.monotonic()
                    if left <= 0 or not select.select([ipr], [], [], left)[0]:
                        break
                    ipr.get()
                self._bind()
