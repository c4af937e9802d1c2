"""Rule 2 of failover safety: an owner cut off from the rest of the cluster stops answering.

An owner that can hear neither its peers (the other network hosts, which the liveness
prober already probes) nor the master cannot know whether its network has moved: the
master moves a network when it and a standby both lose the owner, which is exactly
what this host sees from its side. When every peer has been silent for ``misses - 1``
probe periods and the master does not answer either, ``on_fence()`` drops what the
host serves (``takeover.fence``), before any standby can have been ordered to take it
over: a standby needs ``misses`` periods to report the owner, but its probes run on a
schedule of their own, so at worst its report comes as early as this verdict. The
check follows each verdict at once (``Prober.judged``), and comes every
``echo_period`` while every peer is gone; it asks nothing then: the master is watched
all along (``icmp.Silence``, four echoes in each ``master_window``), so the check knows
at once whether the master fell silent. A takeover binds no earlier than
``guard_s`` after the first report (``takeover._fence_wait``), the time the unbind
takes. The margin does not hang on how long the master's decision takes. The new
owner's duplicate address detection waits for the floating IPs to fall silent too
(``takeover._dad``).

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


def master_window(probe):
    """How long the master must have been silent for the fence to count it gone: half a
    period (four echoes, ``echo_period``). The fence's verdict comes at the earliest
    ``misses - 1.5`` periods after the owner was cut off (the verdict of a round sent
    right after the cut, half a period later, then ``misses - 2`` more): with ``misses``
    2 or more a master lost in the same cut has been silent that long. A master lost
    later than the peers (the links fail one after the other) is counted gone half a
    period after it fell silent (the fence checks every ``echo_period`` while the peers
    are gone), before the master itself can call the owner dead: its watch needs two
    rounds of half a period and then its own 0.05 s check (``runner._second_opinion``).
    A healthy master answers every echo within a millisecond, so several echoes in a row
    went unanswered."""
    return probe.interval_s / 2


def echo_period(probe):
    """How often the fence's watch of the master sends an echo (four in each window);
    also the time an echo has to be answered before it counts as unanswered, and how
    often the fence checks while every peer is gone."""
    return master_window(probe) / 4


# What the fence needs after its verdict to fall silent (the unbind, its netlink
# messages and the conntrack flush, and the thread's wake-up), in the lab 0.01-0.02 s
UNBIND_S = 0.05


def guard_s(probe):
    """How long after a standby's detection of the owner the owner may still answer
    before rule 2 silences it, at worst. The owner's fence counts ``misses - 1`` periods
    on its own probes; a standby reports after ``misses`` on its own: with both
    schedules' phases at their worst the fence's verdict comes when the earliest report
    does, knowing already whether the master answers (``master_window``); the unbind
    follows. With ``misses`` 1 the fence counts what a standby counts (one period), and
    its verdict may come a period after the standby's: that period is added. A takeover
    (not a planned one) binds no earlier than this after ``detected_at``."""
    return UNBIND_S + (probe.interval_s if probe.misses < 2 else 0.0)


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
        self.watch = None  # icmp.Silence of the targets, once the thread runs
        self._said_dead = False

    def peers_gone(self):
        """Whether every peer has been silent ``misses - 1`` periods (none known: no)."""
        peers = list(self.prober.peers.values())
        return bool(peers) and all(p.misses >= max(1, self.probe.misses - 1) for p in peers)

    def isolated(self):
        """Whether this host has lost every piece of evidence now."""
        if not self.targets or not self.peers_gone():
            return False
        watch = self.watch
        if watch is None:
            return False
        if not watch.alive:
            if not self._said_dead:
                self._said_dead = True
                log.warning(
                    "hanet fence: the watch of the master %s is not running: this host never fences", self.targets
                )
            return False
        window, grace = master_window(self.probe), echo_period(self.probe)
        return all(watch.silent(t, window, grace) for t in self.targets)

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
        if not self.targets:
            log.warning("hanet fence: no master address and no next hop known: this host never fences")
            return
        self.watch = icmp.Silence(self.targets, echo_period(self.probe)).start()
        try:
            self._watch_verdicts()
        finally:
            self.watch.stop()

    def _watch_verdicts(self):
        judged = getattr(self.prober, "judged", None)
        while not self._stop.is_set():
            # right after each of the prober's verdicts, and every echo period while
            # every peer is gone (the master may fall silent after them)
            armed = not self.fenced and self.peers_gone()
            wait = echo_period(self.probe) if armed else self.probe.interval_s
            if judged is None:  # a prober without verdict events: a schedule of its own
                if self._stop.wait(wait):
                    return
            elif judged.wait(wait):
                judged.clear()
            elif not armed:
                continue
            if self._stop.is_set():
                return
            self.check()
