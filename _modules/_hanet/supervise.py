"""Keep hanet's daemons running between applies.

There is no init system to restart dnsmasq, the metadata service or conntrackd when one
dies, and a highstate may be hours away: a host whose dnsmasq was killed would answer no
DHCP until then, one whose conntrackd died would lose its open connections in the next
failover. ``Supervisor`` runs in the minion's running process (the ``hanet_liveness``
beacon starts it with ``supervise: true``) and checks every ``interval`` whether each
daemon hanet runs here is still alive; one it saw running that is now dead is started
again at once with the same command line and files (leases kept), and
``on_restart(daemon, name, pid)`` is called so that the beacon can tell the master. A
daemon it never saw running (a record left from before a reboot, on a host that may no
longer serve that network) is left to the next apply, and a failed restart is tried
again only after ``RETRY_S``; a daemon that keeps dying is restarted after a growing
delay (``backoff``), so that a crash loop costs neither the CPU nor, with conntrackd,
its peers' full resyncs. The appliers and the supervisor take the
same lock (``daemon.lock``), so a planned restart or stop is never undone.
"""

from __future__ import annotations

import logging

from . import conntrackd, dnsmasq, metadata
from .common import Worker

log = logging.getLogger(__name__)

INTERVAL_S = 0.2


def restarted_tag(minion, daemon, name):
    """``hanet/daemon/<minion>/<daemon>/<name>/restarted``."""
    return f"hanet/daemon/{minion}/{daemon}/{name}/restarted"


RETRY_S = 5.0  # after a failed restart, the next attempt waits this long
# A daemon that keeps dying: the second restart within CRASH_WINDOW_S waits BACKOFF_S
# after the one before, each further one twice as long, at most BACKOFF_MAX_S
CRASH_WINDOW_S, BACKOFF_S, BACKOFF_MAX_S = 60.0, 0.5, 30.0


def backoff(restarts):
    """How long the ``restarts``-th restart within ``CRASH_WINDOW_S`` waits after the one
    before: the first, none."""
    return 0.0 if restarts < 2 else min(BACKOFF_MAX_S, BACKOFF_S * 2 ** (restarts - 2))


def running(paths):
    """{(daemon, name): pid or None}: every daemon hanet runs here by its records, with
    its pid when its process lives."""
    out = {("dnsmasq", label): cur["pid"] if cur["alive"] else None for label, cur in dnsmasq.current(paths).items()}
    cur = metadata.current(paths)
    if cur:
        out[("metadata", metadata.NAME)] = cur["pid"] if cur.get("alive") else None
    cur = conntrackd.current(paths)
    if cur["conf"]:  # hanet runs it here (ha:conntrack_sync)
        out[("conntrackd", conntrackd.NAME)] = cur["pid"]
    return out


REVIVE = {"dnsmasq": dnsmasq.revive, "metadata": metadata.revive, "conntrackd": conntrackd.revive}


class Supervisor(Worker):
    """Restarts a daemon it has seen running and then finds dead (only those: a record
    left from before a reboot, or a daemon an apply could not start, is the appliers'
    business, not a restart loop's)."""

    thread_name = "hanet-supervise"

    def __init__(self, paths, on_restart, interval=INTERVAL_S):
        super().__init__()
        self.paths = paths
        self.on_restart = on_restart
        self.interval = float(interval)
        self._seen = {}  # (daemon, name) -> pid last seen alive
        self._retry_at = {}  # (daemon, name) -> monotonic time of the next attempt
        self._restarts = {}  # (daemon, name) -> monotonic times of its recent restarts

    def check(self):
        """One round: [(daemon, name, new pid)] for every daemon started again."""
        import time

        out = []
        now = running(self.paths)
        # stopped on purpose: forgotten, with its restart history (started again later,
        # by a takeover or an apply, it is a new daemon: no backoff from before)
        self._seen = {k: v for k, v in self._seen.items() if k in now}
        self._retry_at = {k: v for k, v in self._retry_at.items() if k in now}
        self._restarts = {k: v for k, v in self._restarts.items() if k in now}
        for key, pid in sorted(now.items()):
            if pid:
                self._seen[key] = pid
                continue
            if key not in self._seen or time.monotonic() < self._retry_at.get(key, 0.0):
                continue
            try:
                new = REVIVE[key[0]](self.paths, key[1])
            except (OSError, RuntimeError, ValueError) as err:
                self._retry_at[key] = time.monotonic() + RETRY_S
                log.warning("hanet supervise: could not restart %s %s: %s", key[0], key[1], err)
                continue
            if new:
                self._seen[key] = new
                out.append((key[0], key[1], new))
                at = time.monotonic()
                recent = [t for t in self._restarts.get(key, ()) if at - t < CRASH_WINDOW_S] + [at]
                self._restarts[key] = recent
                self._retry_at[key] = at + backoff(len(recent) + 1)
        for kind, name, pid in out:
            log.warning("hanet supervise: %s %s had died; started again (pid %s)", kind, name, pid)
            try:
                self.on_restart(kind, name, pid)
            except Exception:  # pylint: disable=broad-except  (a report must not stop the checks)
                log.exception("hanet supervise: reporting the restart failed")
        return out

    def _run(self):
        while not self._stop.wait(self.interval):
            self.check()
