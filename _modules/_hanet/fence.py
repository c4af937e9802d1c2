"""Rule 2 of failover safety: an owner cut off from the rest of the cluster stops answering.

An owner that can hear neither its peers (the other network hosts, which the liveness
prober already probes) nor the master cannot know whether its network has moved: the
master moves a network when it and a standby both lose the owner, which is exactly
what this host sees from its side. When every peer has been silent for ``misses - 1``
probe periods and the master does not answer either, ``on_fence()`` drops what the
host serves (``takeover.fence``), before any standby can have been ordered to take it
over (a standby needs ``misses`` periods to report the owner, and the master's
decision comes on top). The new owner's duplicate address detection waits for the
floating IPs to fall silent too (``takeover._dad``).

The next hop does not count as evidence against isolation: an owner that the standbys
and the master lost, and whose uplink still reaches the router (a partition of the
management, VM and public segments that spares the router's port) would otherwise
keep answering for its floating IPs beside the standby that took them over. The next
hop is watched only on a host that knows no master address. The price: when the
master and every standby really are gone at once, the last owner falls silent too
(there is no healthy standby to serve instead, so neither rule is broken); the
master's reconcile loop orders it back when it returns (docs/faults.md).

Losing the master alone, or the peers alone, never fences: the owner keeps serving.
A target that cannot be checked is no evidence of isolation, and with none known this
never fences. After it fenced it stays quiet until a peer answers again; the master's
order (a takeover) brings the addresses back.
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
    ``targets``: the addresses that stand for the master. With none and ``route`` true,
    the next hop stands in, read from the routing table in the watching thread
    (pyroute2 must not run in the minion's main thread, whose event loop is running)."""

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
        log.warning("hanet fence: no peer and no master answers: dropping what this host serves")
        try:
            self.on_fence()
        except Exception:  # pylint: disable=broad-except  (log it; keep watching)
            log.exception("hanet fence: dropping the served addresses failed")
        return True

    def _run(self):
        if self.route and not self.targets:
            try:
                hop = next_hop()
            except OSError as err:
                log.warning("hanet fence: no next hop to watch: %s", err)
                hop = None
            if hop and hop not in self.targets:
                self.targets.append(hop)
        while not self._stop.wait(self.probe.interval_s):
            self.check()
