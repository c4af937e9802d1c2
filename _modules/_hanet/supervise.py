"""Keep hanet's daemons running between applies.

There is no init system to restart dnsmasq or the metadata service when one dies, and a
highstate may be hours away: a host whose dnsmasq was killed would answer no DHCP
until then. ``Supervisor`` runs in the minion's running process (the ``hanet_liveness``
beacon starts it with ``supervise: true``) and checks every ``interval`` whether each
daemon hanet runs here is still alive; a dead one is started again at once with the
same command line and files (leases kept), and ``on_restart(daemon, name, pid)`` is
called so that the beacon can tell the master. The appliers and the supervisor take the
same lock (``daemon.lock``), so a planned restart or stop is never undone.
"""
from __future__ import annotations

import logging
import threading

from . import dnsmasq, metadata

log = logging.getLogger(__name__)

INTERVAL_S = 0.2


def restarted_tag(minion, daemon, name):
    """``hanet/daemon/<minion>/<daemon>/<name>/restarted``."""
    return f"hanet/daemon/{minion}/{daemon}/{name}/restarted"


class Supervisor:
    def __init__(self, paths, on_restart, interval=INTERVAL_S):
        self.paths = paths
        self.on_restart = on_restart
        self.interval = float(interval)
        self._stop = threading.Event()
        self._thread = None

    def check(self):
        """One round: [(daemon, name, new pid)] for every daemon started again."""
        out = []
        for kind, revive in (("dnsmasq", dnsmasq.revive), ("metadata", metadata.revive)):
            try:
                out += [(kind, name, pid) for name, pid in revive(self.paths)]
            except (OSError, RuntimeError, ValueError) as err:
                log.warning("hanet supervise: could not restart %s: %s", kind, err)
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

    def start(self):
        self._thread = threading.Thread(target=self._run, name="hanet-supervise", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout=2.0):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self):
        return self._thread is not None and self._thread.is_alive()
