"""Rule 2 of failover safety: an owner cut off from the rest of the cluster stops answering.

An owner that can hear neither its peers (the other network hosts, which the liveness
prober already probes) nor the master cannot know whether its network has moved: the
master moves a network when it and a standby both lose the owner, which is exactly
what this host sees from its side. When every peer has been silent for ``misses - 1``
probe periods and the master does not answer either, ``on_fence()`` drops what the
host serves (``takeover.fence``), before any standby can have been ordered to take it
over: a standby needs ``misses`` periods to report the owner, but its probes run on a
schedule of their own, so at worst its report comes as early as this verdict. The
check follows each verdict at once (``Prober.judged``), the master's ICMP check takes
at most a quarter period, and a takeover binds no earlier than ``guard_s`` after the
first report (``takeover._fence_wait``): the margin does not hang on how long the
master's decision takes. The new owner's duplicate address detection waits for the
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


# How long the fence's check of the master may take: a LAN answers ICMP within a
# millisecond; every millisecond here is one the standby's takeover waits for
# (takeover.fence_guard_s).
def icmp_timeout(probe):
    return max(0.02, probe.interval_s / 4)


# What the fence needs after its check to fall silent (the unbind, its netlink messages
# and the conntrack flush, and the thread's wake-up), in the lab 0.01-0.02 s
UNBIND_S = 0.05


def guard_s(probe):
    """How long after a standby's detection of the owner the owner may still answer
    before rule 2 silences it, at worst. The owner's fence counts ``misses - 1`` periods
    on its own probes; a standby reports after ``misses`` on its own: with both
    schedules' phases at their worst the fence's verdict comes when the earliest report
    does, and its check of the master and the unbind follow. A takeover (not a planned
    one) binds no earlier than this after ``detected_at``."""
    return icmp_timeout(probe) + UNBIND_S


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
    """Watches ``prober``'s peers right after each of its verdicts (``Prober.judged``);
    see the module docstring.
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
        timeout = icmp_timeout(self.probe)
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
        judged = getattr(self.prober, "judged", None)
        while not self._stop.is_set():
            if judged is None:  # a prober without verdict events: a schedule of its own
                if self._stop.wait(self.probe.interval_s):
                    return
            else:  # right after each period's verdict
                if not judged.wait(self.probe.interval_s):
                    continue
                judged.clear()
                if self._stop.is_set():
                    return
            self.check()
