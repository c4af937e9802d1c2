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

Master configuration (``/etc/salt/master.d/hanet.conf``):

.. code-block:: yaml

    engines_dirs:
      - /srv/hanet/_engines
    engines:
      - hanet_failover:
          workers: 4
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
    for cand in (os.path.join(up, "_modules"), os.path.join(up, "modules"),
                 os.path.join(__opts__["extension_modules"], "modules")):
        if os.path.isdir(os.path.join(cand, "_hanet")):
            if cand not in sys.path:
                sys.path.append(cand)
            break
    return importlib.import_module(f"_hanet.{name}")


def _runner(opts):
    import salt.loader

    runners = salt.loader.runner(opts)
    if "hanet.liveness" not in runners:
        raise RuntimeError("hanet_failover: runner hanet.liveness is not loaded "
                           "(runner_dirs or saltutil.sync_runners on the master)")
    return runners


def _call(fun, tag, data):
    try:
        out = fun(tag=tag, data=data, via="engine")
        if isinstance(out, dict) and out.get("moved"):
            log.warning("hanet_failover: %s -> %s", tag, out)
    except Exception:  # pylint: disable=broad-except  (log it; the engine keeps running)
        log.exception("hanet_failover: handling %s failed", tag)


def _beat(path):
    """Tell the reactor path that the engine is alive (``runner.hanet`` reads the mtime)."""
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(f"{os.getpid()}\n")


def handle(event, runners, pool, failover):
    """Dispatch one master event; returns what it did ("liveness", "prime" or None)."""
    tag, data = event.get("tag", ""), event.get("data")
    if fnmatch.fnmatchcase(tag, failover.LIVENESS_GLOB):
        pool.submit(_call, runners["hanet.liveness"], tag, data)
        return "liveness"
    if any(fnmatch.fnmatchcase(tag, p) for p in failover.PRIME_TAGS):
        pool.submit(_call, runners["hanet.prime"], tag, data)
        return "prime"
    return None


def start(workers=4, stop=None):
    """Run until the master stops the engine (or ``stop``, a threading.Event, is set)."""
    import salt.utils.event

    opts = __opts__
    stop = stop or threading.Event()
    runners = _runner(opts)
    failover = _lib("failover")
    beat = failover.engine_beat(opts["cachedir"])
    os.makedirs(os.path.dirname(beat), exist_ok=True)
    pool = ThreadPoolExecutor(max_workers=int(workers), thread_name_prefix="hanet-failover")
    try:
        with salt.utils.event.get_master_event(opts, opts["sock_dir"], listen=True) as bus:
            pool.submit(_call, runners["hanet.prime"], failover.PRIME_TAG, {})
            log.info("hanet_failover: listening for %s", failover.LIVENESS_GLOB)
            last = 0.0
            while not stop.is_set():
                if time.monotonic() - last >= 1.0:
                    last = time.monotonic()
                    _beat(beat)
                event = bus.get_event(wait=1, full=True)
                if event:
                    handle(event, runners, pool, failover)
    finally:
        pool.shutdown(wait=False)
        try:
            os.unlink(beat)
        except OSError:
            pass
        log.info("hanet_failover: stopped at %s", time.time())
