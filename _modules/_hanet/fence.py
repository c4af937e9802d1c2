"""Rule 2 of failover safety: an owner cut off from everything stops answering.

An owner whose links to the rest of the world are all gone (a partition, a switch port
that died) cannot know that its network has moved; when the partition heals it would
answer for the gateway and floating IPs beside the new owner. So a network host watches
its own evidence: its peers (the other network hosts, which the liveness prober
already probes), the master, and its next hop. When every peer has been silent for
``misses - 1`` probe periods and neither the master nor the next hop answers, the host
is isolated: ``on_fence()`` drops what it serves (``takeover.fence``), before any
standby can have been ordered to take it over (a standby needs ``misses`` periods to
report the owner and the master's decision on top).

Losing the master alone, or the peers alone, never fences: the owner keeps serving.
A target that cannot be checked (no master address, no default route) is no evidence
of isolation either way, and with neither of them known this never fences. After it
fenced it stays quiet until a peer answers again; the master's order (a takeover)
brings the addresses back.
"""
from __future__ import annotations

import logging

from . import icmp
from .common import Worker

log = logging.getLogger(__name__)


def next_hop():
    """The IPv4 default route's gateway, or None."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        for route in ipr.get_default_routes(family=2):
            gw = route.get_attr("RTA_GATEWAY")
            if gw:
                return gw
    return None


class Fence(Worker):
    """Watches ``prober``'s peers each ``probe.interval_s``; see the module docstring.
    ``targets``: the addresses that stand for the master (and, when ``route`` is true,
    the next hop too, read from the routing table in the watching thread: pyroute2 must
    not run in the minion's main thread, whose event loop is running)."""

    thread_name = "hanet-fence"

    def __init__(self, prober, probe, targets, on_fence, route=True):
        super().__init__()
        self.prober = prober
        self.probe = probe
        self.targets = [t for t in targets if t]
        self.route = route
        self.on_fence = on_fence
        self.fenced = False

    def isolated(self):
        """Whether this host has lost every piece of evidence now."""
        peers = list(self.prober.peers.values())
        if not peers or not self.targets:
            return False
        if any(p.misses < max(1, self.probe.misses - 1) for p in peers):
            return False
        timeout = max(0.02, self.probe.interval_s / 2)
        return all(icmp.check([t], timeout=timeout, tries=1) != icmp.ALIVE for t in self.targets)

    def check(self):
        """One round; True when it fenced now."""
        if self.fenced:
            if any(p.misses == 0 for p in self.prober.peers.values()):
                self.fenced = False  # a peer answers again: armed for the next isolation
            return False
        if not self.isolated():
            return False
        self.fenced = True
        log.warning("hanet fence: no peer, no master, no next hop answers: dropping what this host serves")
        try:
            self.on_fence()
        except Exception:  # pylint: disable=broad-except  (log it; keep watching)
            log.exception("hanet fence: dropping the served addresses failed")
        return True

    def _run(self):
        if self.route:
            try:
                hop = next_hop()
            except OSError as err:
                log.warning("hanet fence: no next hop to watch: %s", err)
                hop = None
            if hop and hop not in self.targets:
                self.targets.append(hop)
        while not self._stop.wait(self.probe.interval_s):
            self.check()
