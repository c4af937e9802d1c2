"""A network host's own health: can it serve its networks right now?

keepalived's ``track_interface``, done with both sides' evidence (rule 3 of
``failover-safety.md``). Each network host's beacon watches, every probe interval:

- its **uplink**: the host's ``public_interface`` has carrier, and its next hop (the
  default route's gateway) answers ICMP;
- its **VM segment** for each network-host network it is a network host of: that
  network's ``bridge_interface`` (the flat uplink, the 802.1Q parent or the VXLAN
  underlay) has carrier.

A lost carrier counts at once (the kernel's word, not a guess); a silent next hop
counts after ``misses`` checks in a row, as a silent peer does. A network is fine again
after ``rise`` good checks. The uplink carries every network's traffic out, so a lost uplink
loses them all. The beacon reports each change of the lost set to the master, signed,
as ``impaired`` (something lost) or ``healthy``. The master hands a network over only
when its owner has lost it **and** a standby has it (``_hanet.failover.handover``): an
owner never gives up on its own evidence, and when both sides lose the same thing
nothing moves.

``Tracker`` is the pure part (counts and transitions); ``Health`` is the thread that
reads the kernel (netlink, ICMP) and feeds it.
"""

from __future__ import annotations

import logging
import time

from . import icmp
from .common import Worker

log = logging.getLogger(__name__)

UPLINK = "uplink"  # the key under which a lost uplink is counted (it loses every network)
IFF_UP, IFF_LOWER_UP = 0x1, 0x10000


class Tracker:
    """Debounces what is bad now into what is *lost*: an item (a network, ``UPLINK``)
    is lost after ``misses`` bad checks in a row (at once when it is ``certain``: a link
    without carrier) and fine after ``rise`` good ones.
    ``since``: when the lost set last changed (``time.time()``); 0 while it never did."""

    def __init__(self, misses, rise):
        self.misses = max(1, int(misses))
        self.rise = max(1, int(rise))
        self.lost = set()
        self.since = 0.0
        self._bad = {}  # item -> bad checks in a row
        self._good = {}  # item -> good checks in a row (while lost)

    def update(self, items, bad, now, certain=()):
        """One check of ``items`` of which ``bad`` failed (``certain`` of them beyond
        doubt); True when the lost set changed."""
        before = set(self.lost)
        for item in items:
            if item in bad:
                self._good.pop(item, None)
                self._bad[item] = self._bad.get(item, 0) + 1
                if self._bad[item] >= self.misses or item in certain:
                    self.lost.add(item)
            else:
                self._bad.pop(item, None)
                if item in self.lost:
                    self._good[item] = self._good.get(item, 0) + 1
                    if self._good[item] >= self.rise:
                        self.lost.discard(item)
                        self._good.pop(item, None)
        self.lost &= set(items)
        if self.lost != before:
            self.since = now
            return True
        return False


def networks_lost(lost, networks):
    """The networks that ``lost`` (items of a Tracker) leaves this host unable to serve."""
    if UPLINK in lost:
        return sorted(networks)
    return sorted(n for n in networks if n in lost)


def link_up(links, ifname):
    """Whether ``ifname`` is administratively up and has carrier in ``links``
    ({ifname: flags}); a link that does not exist is not up."""
    flags = links.get(ifname)
    return flags is not None and bool(flags & IFF_UP) and bool(flags & IFF_LOWER_UP)


class Health(Worker):
    """The thread that checks this host's uplink and segments each ``probe.interval_s``
    and calls ``on_change(networks_lost, since)`` when the set of networks it cannot
    serve differs from what was last reported (``known``: the last report before a
    restart). pyroute2 runs in this thread only (never in the
    minion's main thread, whose event loop is running)."""

    thread_name = "hanet-health"

    def __init__(self, uplink, segments, probe, on_change, known=None, next_hop=True):
        super().__init__()
        self.uplink = uplink  # ifname or None
        self.segments = dict(segments)  # network -> ifname (its bridge_interface) or None
        self.probe = probe
        self.on_change = on_change
        self.next_hop = next_hop
        self.hop = None
        self.tracker = Tracker(probe.misses, probe.rise)
        self.reported = sorted(known or ())  # what was last reported (before a restart too)
        self._checks = 0

    @property
    def networks(self):
        return sorted(self.segments)

    def snapshot(self):
        """{"lost": [network], "since": time of the last change} (for the beacon's view)."""
        return {"lost": networks_lost(self.tracker.lost, self.networks), "since": self.tracker.since}

    def bad_now(self, links, hop_ok):
        """(bad, certain): the items that fail this check, from ``links`` ({ifname:
        flags}) and the next hop's answer (True, False, or None: no next hop to ask), and
        those of them whose link has no carrier."""
        bad, certain = set(), set()
        if self.uplink and not link_up(links, self.uplink):
            certain.add(UPLINK)
        elif self.uplink and hop_ok is False:
            bad.add(UPLINK)
        for net, ifname in self.segments.items():
            if ifname and not link_up(links, ifname):
                certain.add(net)
        return bad | certain, certain

    def check(self, links, hop_ok, now=None):
        """One check; calls ``on_change`` when the networks this host cannot serve differ
        from what it last reported. Nothing is reported before ``max(misses, rise)``
        checks after a start: until then a fresh tracker knows too little."""
        now = time.time() if now is None else now
        self._checks += 1
        items = ([UPLINK] if self.uplink else []) + self.networks
        bad, certain = self.bad_now(links, hop_ok)
        self.tracker.update(items, bad, now, certain)
        after = networks_lost(self.tracker.lost, self.networks)
        if self._checks < max(self.tracker.misses, self.tracker.rise) or after == self.reported:
            return
        self.reported = after
        self._report(after, now)

    def _report(self, lost, now):
        if lost:
            log.warning("hanet health: cannot serve %s (%s)", ", ".join(lost), self._why())
        else:
            log.warning("hanet health: every network servable again")
        try:
            self.on_change(lost, now)
        except Exception:  # pylint: disable=broad-except  (a failing report must not stop the checks)
            log.exception("hanet health: reporting the change failed")

    def _why(self):
        t = self.tracker
        return (
            ", ".join(
                sorted(
                    "uplink " + str(self.uplink) if i == UPLINK else f"{i} link {self.segments.get(i)}" for i in t.lost
                )
            )
            or "-"
        )

    def _links(self, ipr):
        """{ifname: flags} of the watched links only (a dump of every link, parsed in
        Python every probe interval, competed with a takeover for the minion's CPU); a
        link that does not exist is left out."""
        from pyroute2.netlink.exceptions import NetlinkError

        out = {}
        for name in {self.uplink, *self.segments.values()} - {None, ""}:
            try:
                msg = ipr.link("get", ifname=name)[0]
            except NetlinkError:
                continue  # no such link: not up
            out[name] = msg["flags"]
        return out

    def _run(self):
        from pyroute2 import IPRoute

        from .fence import next_hop

        if self.next_hop and self.uplink:
            try:
                self.hop = next_hop()
            except OSError as err:
                log.warning("hanet health: no next hop to watch: %s", err)
        timeout = max(0.02, self.probe.interval_s / 2)
        with IPRoute() as ipr:
            while not self._stop.wait(self.probe.interval_s):
                try:
                    links = self._links(ipr)
                except OSError as err:
                    log.warning("hanet health: cannot read the links: %s", err)
                    continue
                hop_ok = None  # no next hop, or no verdict: no evidence either way
                if self.hop and link_up(links, self.uplink):
                    seen = icmp.check([self.hop], timeout=timeout, tries=1)
                    hop_ok = None if seen is None else seen == icmp.ALIVE
                self.check(links, hop_ok)
