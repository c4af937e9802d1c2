"""hanet_failover: the master's fast path for hanet failover (a Salt engine).

``reactor/failover.sls`` hands every ``salt/beacon/<observer>/hanet_liveness/<peer>/<state>``
event to ``runner.hanet.liveness``; the reactor renders the SLS and runs the runner
through a new runner client each time, which costs a noticeable part of the failover
time before the runner's first line (docs/failover.md). This engine listens on the master's event bus itself, keeps the runner module
loaded (its pillar cache, its local client, its imports), and calls the very same
``hanet.liveness`` in a worker thread as soon as the event arrives. The decision
(signature, freshness, replay, peer, second opinion, record, takeover) is the runner's
(and, inside it, ``_hanet.failover``'s); the engine only removes the wait in front of it.

Both paths see the same event. While the engine runs it touches
``<cachedir>/hanet/engine.beat`` every second and the reactor path leaves liveness events
to it, so each is handled and reported once; should both act anyway (the engine stalled
for seconds), the runner's durable record remembers which path took each event (its
nonce) and the other returns quietly. Without the engine (not configured, or dead) the
reactor path does everything on its own, only slower.

It also warms the runner when it starts, when a minion starts and after every hanet
highstate (``hanet/prime``), so that the first failover after a master restart is as
fast as the others, and it keeps the master's own watch of the network hosts running
(an ICMP echo to each every half probe interval, ``_hanet.icmp.Watch``): when a report
comes in, the master's second opinion is then already known and nobody waits for it.

It writes the master's metrics file every few seconds (``runner.hanet.metrics``,
docs/metrics.md).

And it runs the reconcile loop (``runner.hanet.reconcile``, every ``reconcile_interval``
seconds): the record against the master's watch and what the network hosts say they
hold. One-shot events are the fast path; the loop makes a failover happen, or finish,
when one was lost: a report sent while the master was down, an order lost or failed, a
decision saved by a master that died before publishing it, a partitioned owner that
came back still holding a gateway. ``hanet/failover/<network>/complete`` events confirm
a move in the record (``runner.hanet.outcome``); a move not confirmed is ordered again.

Master configuration (``/etc/salt/master.d/hanet.conf``):

.. code-block:: yaml

    engines_dirs:
      - /srv/hanet/_engines
    engines:
      - hanet_failover:
          workers: 4
          reconcile_interval: 1     # seconds between reconcile rounds (0: none)
"""

from __future__ import annotations

import fnmatch
import importlib
import logging
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # Salt's loader injects these
    __opts__: dict = {}

log = logging.getLogger(__name__)

__virtualname__ = "hanet_failover"


def __virtual__():
    return __virtualname__


def _lib(name):
    """The ``_hanet.<name>`` library module, found where Salt modules find it: beside
    the directory this module was loaded from (a checkout's ``_modules``, a master's
    synced ``extmods/modules``), or in ``<extension_modules>/modules``."""
    up = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for cand in (
        os.path.join(up, "_modules"),
        os.path.join(up, "modules"),
        os.path.join(__opts__["extension_modules"], "modules"),
    ):
        if os.path.isdir(os.path.join(cand, "_hanet")):
            if cand not in sys.path:
                sys.path.append(cand)
            break
    return importlib.import_module(f"_hanet.{name}")


def _runner(opts):
    import salt.loader

    runners = salt.loader.runner(opts)
    if "hanet.liveness" not in runners:
        raise RuntimeError(
            "hanet_failover: runner hanet.liveness is not loaded (runner_dirs or saltutil.sync_runners on the master)"
        )
    return runners


def _call(fun, tag, data, via="engine"):
    try:
        out = fun(tag=tag, data=data, via=via)
        if isinstance(out, dict) and out.get("moved"):
            log.warning("hanet_failover: %s -> %s", tag, out)
        return out
    except Exception:  # pylint: disable=broad-except  (log it; the engine keeps running)
        log.exception("hanet_failover: handling %s failed", tag)
        return None


# While the reports also come straight (``Hearing``), their events wait this long: the
# datagram, sent before its event, is handled alone (one verification, one decision in the
# CPU at the moment that counts), and the event still decides, this much later, if it
# was lost.
EVENT_DEFER_S = 0.05


class Hearing:
    """The beacons' reports sent straight here (``ha:report_port``, UDP), beside their
    beacon events: each goes to ``hanet.liveness`` at once (``via="direct"``), which
    verifies it as it does the event's; the event, arriving later, finds the report's
    nonce taken by the other path and returns quietly (``failover.Record.handle``).

    The listener is kept in step with the pillar: every successful prime
    (the first, and each one a minion's start or a hanet highstate asks for) and every
    reconcile round (each second) gives ``ha:report_port``; the listener starts on it,
    moves when it changes, stops at 0. Until one succeeds (a master that knows no minion
    yet), the events carry every report."""

    def __init__(self, host, submit, parse, common):
        self.host, self.submit, self.parse, self.common = host, submit, parse, common
        self.reports = None
        self._lock = threading.Lock()

    def follow(self, out):
        if not (isinstance(out, dict) and out.get("result") and "report_port" in out):
            return
        port = int(out["report_port"] or 0)
        with self._lock:
            if self.reports is not None and self.reports.wanted == port:
                return
            self._close()
            if not port:
                return
            try:
                self.reports = self.common.Datagrams(self.host, port, self._heard, "hanet-reports").start()
                log.info("hanet_failover: hearing direct reports on UDP port %s", port)
            except OSError as err:  # the events still carry every report
                log.warning("hanet_failover: no direct reports on UDP port %s: %s", port, err)

    def _heard(self, raw, _addr):
        got = self.parse(raw)
        if got is not None:
            self.submit(*got)

    def _close(self):
        if self.reports is not None:
            self.reports.stop()
            self.reports = None

    def stop(self):
        with self._lock:
            self._close()


class _Overlay:
    """The runner loader with a few functions replaced (it stays lazy)."""

    def __init__(self, base, over):
        self.base, self.over = base, over

    def __getitem__(self, name):
        return self.over[name] if name in self.over else self.base[name]

    def __contains__(self, name):
        return name in self.over or name in self.base


def _steering(fun, hearing):
    """``hanet.prime`` or ``hanet.reconcile`` as the engine calls it: its answer also
    steers the listener."""

    def call(*args, **kwargs):
        out = fun(*args, **kwargs)
        hearing.follow(out)
        return out

    return call


def _beat(path):
    """Tell the reactor path that the engine is alive (``runner.hanet`` reads the mtime)."""
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(f"{os.getpid()}\n")


def handle(event, runners, pool, failover, defer=0.0):
    """Dispatch one master event; returns what it did ("liveness", "prime", "outcome"
    or None). ``defer``: seconds a liveness event waits before it is handled (while the
    beacons' reports also come straight here: the datagram, sent first, gets them)."""
    tag, data = event.get("tag", ""), event.get("data")
    if fnmatch.fnmatchcase(tag, failover.LIVENESS_GLOB):
        if defer > 0:
            later = threading.Timer(defer, pool.submit, (_call, runners["hanet.liveness"], tag, data))
            later.daemon = True
            later.start()
        else:
            pool.submit(_call, runners["hanet.liveness"], tag, data)
        return "liveness"
    if any(fnmatch.fnmatchcase(tag, p) for p in failover.PRIME_TAGS):
        pool.submit(_call, runners["hanet.prime"], tag, data)
        return "prime"
    if (failover.parse_failover_tag(tag) or (None, None))[1] == "complete":
        pool.submit(_call, runners["hanet.outcome"], tag, data)
        return "outcome"
    return None


def _reconcile_loop(fun, stop, interval, ready):
    """Run ``hanet.reconcile`` every ``interval`` seconds once ``ready`` (the first
    prime: the master's watch runs) is done, one round at a time."""
    ready.result()
    while not stop.wait(interval):
        try:
            fun()
        except Exception:  # pylint: disable=broad-except  (log it; try again next round)
            log.exception("hanet_failover: reconcile round failed")


def start(workers=4, reconcile_interval=1.0, stop=None):
    """Run until the master stops the engine (or ``stop``, a threading.Event, is set).
    ``reconcile_interval``: seconds between rounds of the reconcile loop (0: none)."""
    import salt.utils.event

    opts = __opts__
    stop = stop or threading.Event()
    runners = _runner(opts)
    failover = _lib("failover")
    beat = failover.engine_beat(opts["cachedir"])
    os.makedirs(os.path.dirname(beat), exist_ok=True)
    pool = ThreadPoolExecutor(max_workers=int(workers), thread_name_prefix="hanet-failover")
    loop = None
    hearing = Hearing(
        opts.get("interface") or "0.0.0.0",
        lambda tag, data: pool.submit(_call, runners["hanet.liveness"], tag, data, "direct"),
        failover.parse_report_datagram,
        _lib("common"),
    )
    runners = _Overlay(
        runners,
        {name: _steering(runners[name], hearing) for name in ("hanet.prime", "hanet.reconcile")},
    )
    writer = _lib("metrics").Writer(runners["hanet.metrics"]).start() if "hanet.metrics" in runners else None
    try:
        with salt.utils.event.get_master_event(opts, opts["sock_dir"], listen=True) as bus:
            primed = pool.submit(_call, runners["hanet.prime"], failover.PRIME_TAG, {})
            if float(reconcile_interval) > 0:
                loop = threading.Thread(
                    target=_reconcile_loop,
                    name="hanet-reconcile",
                    daemon=True,
                    args=(runners["hanet.reconcile"], stop, float(reconcile_interval), primed),
                )
                loop.start()
            log.info("hanet_failover: listening for %s", failover.LIVENESS_GLOB)
            last = 0.0
            while not stop.is_set():
                if time.monotonic() - last >= 1.0:
                    last = time.monotonic()
                    _beat(beat)
                event = bus.get_event(wait=1, full=True)
                if event:
                    handle(event, runners, pool, failover, EVENT_DEFER_S if hearing.reports is not None else 0.0)
    finally:
        stop.set()
        hearing.stop()
        if writer is not None:
            writer.stop()
        if loop is not None:
            loop.join(5)
        pool.shutdown(wait=False)
        try:
            os.unlink(beat)
        except OSError:
            pass
        log.info("hanet_failover: stopped at %s", time.time())
