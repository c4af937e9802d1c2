"""hanet_liveness: watch hanet peers (network hosts) by ARP and report transitions.

A probe thread (``_hanet.liveness.Prober``) asks each peer's addresses every
``interval_ms``; a peer is down after ``misses`` silent periods and up again after
``rise`` answered ones. Transitions are fired **at once** by a sender thread, signed
with the minion's key, as a beacon return on the minion's event bus
(``__beacons_return``), which the minion's running process sends to the master on its
own authenticated channel straight away, rather than at Salt's once-a-second beacon
poll. They arrive on the master as::

    salt/beacon/<observer>/hanet_liveness/<peer>/down   {peer, state, detected_at, ...}
    salt/beacon/<observer>/hanet_liveness/<peer>/up

Only transitions are fired. The last known state of each peer is kept under the
minion's root_dir, so that a beacon refresh (which closes and restarts the beacon)
fires nothing unless a peer really changed meanwhile.

On a network host (``orders: true``) the beacon also listens for the master's
``hanet.takeover`` orders and binds at once: on the master's publish channel
(``OrderListener``) and, with ``order_port``, as the master's signed UDP datagram that
precedes the publication (``DirectOrders``); it also computes on every poll what an
order would need (``hanet.prepare``), so that the order only binds. On a standby
(``standby_for``) it probes the gateway it would take over as soon as it reports that
peer down, while the master decides. When a peer it saw down comes back (a healed
partition), a network host announces what it serves again (``hanet.announce``).

hanet's ``hanet.liveness`` state configures this beacon from the pillar; by hand:

.. code-block:: yaml

    beacons:
      hanet_liveness:
        - peers:
            net1: [[br200, 10.20.0.2], [eth0, 203.0.113.21]]
        - interval_ms: 100
        - misses: 3
        - rise: 5
        - orders: true
        - order_port: 4509
        - standby_for:
            net1: [[br200, 10.20.0.1]]
        - supervise: true

With ``supervise: true`` it also restarts dnsmasq and the metadata service when they die
(``_hanet.supervise``) and fires ``hanet/daemon/<minion>/<daemon>/<name>/restarted``.

With ``follow`` (a host with instances on a hardware network served by network hosts:
``[[br300, 172.16.100.2]]``) it follows the MAC that answers for each network's
``dhcp_server`` (``_hanet.follow``), where its instances' floating-IP frames are sent.

Wherever it runs it also binds VM ports as they are plugged (``_hanet.portwatch``: the
anti-spoofing table's dynamic sets, on every link event) and writes the host's metrics
file every few seconds (``hanet.metrics``).

With ``health`` (a network host: ``{uplink: eth0, segments: {shared: eth3}}``) it watches
the host's own uplink (carrier and next hop) and each network's segment link
(``_hanet.health``) and reports, signed like a liveness report, which networks the host
cannot serve now::

    salt/beacon/<host>/hanet_liveness/<host>/impaired   {lost: [network], ...}
    salt/beacon/<host>/hanet_liveness/<host>/healthy    {lost: [], ...}

The master hands such a network to a standby that can serve it.

``clock_offset_s`` (a test hook, seconds) is added to the time stamped on every report:
the lab's hosts share one clock, and this is how a test shows what the master does with
a host whose clock is off (it refuses the report, says why, and the reconcile loop
moves what the report would have).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # Salt's loader injects these
    __opts__: dict = {}
    __salt__: dict = {}
    __context__: dict = {}

log = logging.getLogger(__name__)

__virtualname__ = "hanet_liveness"
CTX = "hanet_liveness.prober"


def __virtual__():
    return __virtualname__


def _lib(name):
    """The ``_hanet.<name>`` library module, found where Salt modules find it: beside
    the directory this module was loaded from (a checkout's ``_modules``, a minion's
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


def masters(opts):
    """Every master this minion is configured for, as ``[(name, ip)]``: with a hot
    multi-master minion (``master: [m1, m2]``) Salt runs the beacons in the first
    master's minion object, whose own ``opts["master"]`` names only m1; the list is in
    the options it was copied from. A name that does not resolve is left out."""
    import socket

    found = None
    cur = opts
    while cur is not None and found is None:
        value = cur.get("master")
        if isinstance(value, (list, tuple)):
            found = list(value)
        cur = getattr(cur, "_parent", None)
    if found is None:
        found = [opts.get("master")] if opts.get("master") else []
    out = []
    for name in found:
        name = str(name)
        if name == opts.get("master") and opts.get("master_ip"):
            out.append((name, opts["master_ip"]))
            continue
        try:
            out.append((name, socket.gethostbyname(name)))
        except OSError:
            log.warning("hanet_liveness: master %s does not resolve; left out", name)
    return out


def master_opts(opts, name, ip):
    """``opts`` for talking to master ``name`` at ``ip`` (its own master_uri: Salt keys
    a sign-in by it)."""
    out = dict(opts)
    out.update(master=name, master_ip=ip, master_uri=f"tcp://{ip}:{opts.get('master_port', 4506)}")
    return out


def _config(config):
    out = {}
    for item in config if isinstance(config, list) else [config]:
        if isinstance(item, dict):
            out.update(item)
    return out


def validate(config):
    cfg = _config(config)
    peers = cfg.get("peers")
    if not isinstance(peers, dict):
        return False, "hanet_liveness: 'peers' must map a peer to [[interface, ip], ...]"
    for name, targets in peers.items():
        if not isinstance(targets, list) or not all(isinstance(t, (list, tuple)) and len(t) == 2 for t in targets):
            return False, f"hanet_liveness: peers:{name} must be a list of [interface, ip]"
    for key in ("orders", "supervise"):
        if key in cfg and not isinstance(cfg[key], bool):
            return False, f"hanet_liveness: {key} must be true or false"
    standby_for = cfg.get("standby_for", {})
    if not isinstance(standby_for, dict) or not all(
        isinstance(t, list) and all(isinstance(x, (list, tuple)) and len(x) == 2 for x in t)
        for t in standby_for.values()
    ):
        return False, "hanet_liveness: standby_for must map a peer to [[bridge, gateway], ...]"
    follow = cfg.get("follow", [])
    if not isinstance(follow, list) or not all(
        isinstance(t, (list, tuple)) and len(t) == 2 and all(isinstance(x, str) for x in t) for t in follow
    ):
        return False, "hanet_liveness: follow must be a list of [bridge, ip]"
    health = cfg.get("health")
    if health is not None and not (
        isinstance(health, dict)
        and isinstance(health.get("uplink", ""), str)
        and isinstance(health.get("segments"), dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in health["segments"].items())
    ):
        return False, "hanet_liveness: health must be {uplink: ifname, segments: {network: ifname}}"
    offset = cfg.get("clock_offset_s", 0)
    if isinstance(offset, bool) or not isinstance(offset, (int, float)):
        return False, "hanet_liveness: clock_offset_s must be a number of seconds"
    for key in ("interval_ms", "misses", "rise", "garp_refresh_s"):
        if key in cfg and (isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < 1):
            return False, f"hanet_liveness: {key} must be a positive integer"
    for key in ("order_port", "report_port"):
        port = cfg.get(key, 0)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            return False, f"hanet_liveness: {key} must be a UDP port (0: none)"
    return True, "valid"


class Sender:
    """Delivers transitions to the master from a thread of its own, so that the probe
    thread never waits. Each is signed with the minion's private key, loaded once, and
    handed to the minion's running process on its local event bus as a beacon return
    (``__beacons_return``), which that process sends to the master at once on its own
    authenticated request channel: no wait for the once-a-second beacon poll, and no
    Salt channel or authentication of our own in this thread (a forked job must never
    inherit a lock that one of our threads holds half-way through Salt's set-up).

    ``lib``: the library modules it uses ({"failover", "arp"}), resolved by the caller
    in the minion's main thread (loader dunders do not resolve in this thread)."""

    def __init__(self, opts, lib, standby_for=None, report_to=()):
        import queue
        import threading

        self.opts = opts
        # [(master ip, port)]: each report also goes there, straight to the engine, first
        self.report_to = list(report_to)
        self._udp = None
        self.failover, self.arp = lib["failover"], lib["arp"]
        # {peer: [(ifname, ip)]}: its gateways and floating IPs, probed right after it is reported down
        self.standby_for = standby_for or {}
        self.prechecked = {}  # gateway -> [probed at, holder MAC or None]
        self._prechecked = threading.Event()  # clear while a precheck is under way
        self._prechecked.set()
        self._queue = queue.Queue()
        self._key = None
        self._bus = None
        self._thread = threading.Thread(target=self._run, name="hanet-liveness-send", daemon=True)
        self._thread.start()

    def submit(self, peer, state, detected_at, targets):
        self._queue.put((peer, state, detected_at, targets))

    def health(self, lost, detected_at):
        """This host's own health changed: it cannot serve ``lost`` (empty: it can serve
        every network again)."""
        self._queue.put(("health", lost, detected_at))

    def event(self, tag, data):
        """Any other event to the master (a daemon restarted), from this thread."""
        self._queue.put(("event", tag, data))

    def stop(self, timeout=2.0):
        self._queue.put(None)
        self._thread.join(timeout)

    def warm(self):
        self._queue.put("warm")

    def _private_key(self):
        import salt.crypt

        if self._key is None:
            self._key = salt.crypt.PrivateKey.from_file(os.path.join(self.opts["pki_dir"], "minion.pem"))
        return self._key

    def _send(self, tag, data):
        import salt.utils.event

        event = {"tag": tag, "data": data, "beacon_name": __virtualname__}
        for attempt in (1, 2):
            if self._bus is None:
                self._bus = salt.utils.event.MinionEvent(self.opts, listen=False)
            try:
                if self._bus.fire_event({"beacons": [event]}, "__beacons_return", timeout=3000):
                    return
                raise RuntimeError("the minion's event bus did not take it")
            except Exception:  # pylint: disable=broad-except  (any trouble: a new bus, once)
                self._close_bus()
                if attempt == 2:
                    raise

    def _close_bus(self):
        if self._bus is not None:
            try:
                self._bus.destroy()
            except Exception:  # pylint: disable=broad-except  (closing a broken bus)
                pass
            self._bus = None
        if self._udp is not None:
            self._udp.close()
            self._udp = None

    def _run(self):
        import threading

        try:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                if item == "warm":
                    try:
                        self._private_key()
                    except (OSError, ValueError) as err:
                        log.debug("hanet_liveness: could not load the minion key: %s", err)
                    continue
                if item[0] == "health":
                    try:
                        self._fire_health(item[1], item[2])
                    except Exception:  # pylint: disable=broad-except  (log it; keep sending)
                        log.exception("hanet_liveness: could not report this host's health")
                    continue
                if item[0] == "event":
                    try:
                        self._send(item[1], item[2])
                    except Exception:  # pylint: disable=broad-except  (log it; keep sending)
                        log.exception("hanet_liveness: could not send %s", item[1])
                    continue
                if item[1] == self.failover.DOWN and self.standby_for.get(item[0]):
                    # probed while the report travels and the master decides: the
                    # order may come back before a probe started after the report ends
                    self._prechecked.clear()
                    threading.Thread(target=self._precheck, args=(item[0],), name="hanet-precheck", daemon=True).start()
                try:
                    self._fire(*item)
                except Exception:  # pylint: disable=broad-except  (log it; keep sending)
                    log.exception("hanet_liveness: could not report %s", item[:2])
        finally:
            self._close_bus()

    def _precheck(self, peer):
        """Duplicate address detection for what this host would take over from ``peer``
        (its gateways and floating IPs), done while the master decides (the takeover
        uses a clear result for a second)."""
        pairs = [(ip, ifname) for ifname, ip in self.standby_for.get(peer, ())]
        try:
            if not pairs:
                return
            try:
                at, found = time.time(), self.arp.probe_many(pairs, self.arp.DAD_TIMEOUT_S, tries=1)
            except OSError as err:
                log.debug("hanet_liveness: cannot probe what %s served: %s", peer, err)
                return
            for ip, _ in pairs:
                self.prechecked[ip] = [at, found.get(ip)]
        finally:
            self._prechecked.set()

    def prechecks(self, wait=0.1):
        """What the prechecks found ({ip: [at, holder]}), once the one under way (if
        any) is done, waiting at most ``wait`` seconds for it."""
        self._prechecked.wait(wait)
        return dict(self.prechecked)

    def _fire_health(self, lost, detected_at):
        fo, me = self.failover, self.opts["id"]
        data = fo.sign(self._private_key(), fo.health_report(me, lost, detected_at))
        self._direct(fo.liveness_tag(me, me, data["state"]), data)
        self._send(fo.liveness_tag(me, me, data["state"]), data)

    def _fire(self, peer, state, detected_at, targets):
        """One transition, signed with this minion's own key, so that the master can
        tell it from an event another minion forged."""
        fo, me = self.failover, self.opts["id"]
        data = fo.sign(self._private_key(), fo.report(me, peer, state, detected_at, targets))
        self._direct(fo.liveness_tag(me, peer, state), data)
        self._send(fo.liveness_tag(me, peer, state), data)

    def _direct(self, tag, data):
        """The signed report, straight to each master's engine (``ha:report_port``): it
        decides on whichever of this and the event comes first (the report's nonce, in
        the record, keeps it to one). Best effort: the event follows anyway."""
        if not self.report_to:
            return
        import socket

        try:
            if self._udp is None:
                self._udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            raw = self.failover.report_datagram(tag, data)
        except (OSError, TypeError, ValueError) as err:
            log.debug("hanet_liveness: no direct report: %s", err)
            return
        for addr in self.report_to:
            try:
                self._udp.sendto(raw, addr)
            except OSError as err:
                log.debug("hanet_liveness: direct report to %s: %s", addr, err)


class Orders:
    """Runs the master's ``hanet.takeover`` and ``hanet.relinquish`` orders for this host
    in the minion's running process (``takeover(..., warm=True)``: bind and announce),
    each jid once, whichever way it came first: the master's publish channel
    (``OrderListener``) or its direct datagram (``DirectOrders``). The minion still
    forks the job of the publication; the job finds the addresses bound and does the rest
    (DHCP, metadata, the ``complete`` event). The two functions are looked up once,
    here, in the main thread: a lookup in the order's thread waits for the loader while
    the main thread handles the same publication (35 ms measured)."""

    FUNS = ("hanet.takeover", "hanet.relinquish")

    def __init__(self, salt_funcs, prechecks=None):
        import threading

        self.salt = salt_funcs
        self.prechecks = prechecks or dict  # () -> the standby's prechecks (Sender.prechecks)
        self._lock = threading.Lock()
        self._seen = []  # the last jids handled
        self._funs = {}
        for name in self.FUNS:
            try:
                self._funs[name] = salt_funcs[name]
            except Exception as err:  # pylint: disable=broad-except  (looked up when needed)
                log.debug("hanet_liveness: %s not loaded yet: %s", name, err)

    def _fun(self, name):
        fun = self._funs.get(name)
        if fun is None:
            fun = self._funs[name] = self.salt[name]
        return fun

    def handle(self, order, heard, via):
        """Run ``order`` (``failover.parse_order``'s) in a thread of its own unless its
        jid was handled. The same order from two masters (the record's compare-and-swap
        keeps a decision to one master, but the reconcile loops of both may re-send an
        unconfirmed one) comes with two jids: both run, and the takeover and the
        relinquish are idempotent by epoch (takeover.Slot: the second finds the first's
        outcome)."""
        import threading

        with self._lock:
            if order["jid"] in self._seen:
                return False
            self._seen[:] = self._seen[-63:] + [order["jid"]]
        threading.Thread(target=self._run, args=(order, heard, via), name="hanet-takeover", daemon=True).start()
        return True

    def _run(self, order, heard, via):
        what = "relinquish" if order.get("fun") == "hanet.relinquish" else "takeover"
        began = time.time()
        try:
            if what == "relinquish":
                got = self._fun("hanet.relinquish")(*order["args"])
            else:
                fun = self._fun("hanet.takeover")
                looked_up = time.time()
                prechecked = self.prechecks()  # the DAD probe under way, if any, done
                got = fun(
                    *order["args"],
                    warm=True,
                    prechecked=prechecked,
                    heard_at=[
                        ("heard", heard),
                        ("thread", began),
                        ("looked_up", looked_up),
                        ("prechecked", time.time()),
                    ],
                    heard_via=via,
                    **order["kwargs"],
                )
            log.info("hanet_liveness: warm %s %s (heard %s): %s", what, order["args"], via, got)
        except Exception as err:  # pylint: disable=broad-except
            log.warning(
                "hanet_liveness: warm %s %s failed (%s); the job will retry", what, order["args"], err, exc_info=True
            )


class DirectOrders:
    """On a network host: the master's direct orders (``ha:order_port``), one UDP
    datagram each, signed with the master's key (``failover.order_datagram``). Only a
    datagram from one of this minion's masters, signed by the master key the minion
    accepted (``minion_master.pub``), addressed to this minion and recent is run; the
    rest is dropped (logged at debug level, at most once a second)."""

    def __init__(self, opts, port, orders, parse, masters_ips, common):
        self.opts = opts
        self.orders = orders
        self.parse = parse  # failover.parse_order_datagram
        self.masters = set(masters_ips)
        self.key_file = os.path.join(opts["pki_dir"], "minion_master.pub")
        self._said = 0.0
        self._udp = common.Datagrams("0.0.0.0", port, self._heard, "hanet-direct-orders").start()

    @property
    def port(self):
        return self._udp.port

    def _heard(self, raw, addr):
        heard, src = time.time(), addr[0]
        if src not in self.masters:
            why = f"from {src}, not a master"
        else:
            order, why = self.parse(raw, self.key_file, self.opts["id"], heard)
            if order is not None:
                self.orders.handle(order, heard, "direct")
                # heard: the master may let the Salt job of it wait
                self._udp.send(json.dumps({"ack": order["jid"]}).encode(), addr)
                return
        if time.monotonic() - self._said > 1.0:
            self._said = time.monotonic()
            log.debug("hanet_liveness: a direct order dropped: %s", why)

    def stop(self, timeout=2.0):
        self._udp.stop(timeout)


class OrderListener:
    """On a network host: hears the master's ``hanet.takeover`` orders for this minion
    on a subscription of its own to the master's publisher (Salt's publish channel,
    signed in with the minion's own key: the same encrypted, master-signed
    publications its job loop receives), and hands them to ``Orders`` at once.

    The subscription runs on an event loop of its own in a thread, with a sign-in of
    its own: a channel that shared the minion's would share its message counter, and
    the minion would then drop every publication this one decrypted first. What Salt
    sets up lazily (its key cache, the minion key) is set up here, in the minion's
    main thread, before the thread starts: a job forked while another thread is half
    way through that set-up would inherit its lock, held, and hang."""

    def __init__(self, opts, orders, parse_order):
        import asyncio
        import threading

        import salt.crypt

        self.opts = opts
        self.orders = orders
        self.parse_order = parse_order
        self._channel = None
        self._loop = asyncio.new_event_loop()
        salt.crypt.AsyncAuth(opts, io_loop=self._loop).get_keys()
        self._thread = threading.Thread(target=self._run, name="hanet-liveness-orders", daemon=True)
        self._thread.start()

    @staticmethod
    def minion_signed_in(opts):
        """Whether the minion has signed in to its master (beacons run once before)."""
        import asyncio

        import salt.crypt

        if not opts.get("master_uri"):
            return False
        try:
            # Salt keeps the credentials of each sign-in by (pki dir, id, master URI, key
            # time): looking there has no side effect. Building an AsyncAuth to ask it
            # would register one in the minion's loop under Salt's own key for that
            # master, which the minion object then re-uses with our options.
            return salt.crypt._auth_singleton_key(opts) in salt.crypt.AsyncAuth.creds_map  # pylint: disable=protected-access
        except AttributeError:  # another Salt: ask an AsyncAuth
            pass
        except Exception:  # pylint: disable=broad-except
            return False
        try:
            return salt.crypt.AsyncAuth(opts, io_loop=asyncio.get_running_loop()).authenticated
        except Exception:  # pylint: disable=broad-except
            return False

    def _run(self):
        import asyncio

        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._connect())
            self._loop.run_forever()
        except Exception as err:  # pylint: disable=broad-except
            log.warning("hanet_liveness: not listening for takeover orders (%s); takeover jobs alone will do", err)
        finally:
            if self._channel is not None:
                try:
                    self._channel.close()
                except Exception:  # pylint: disable=broad-except
                    pass
            self._loop.close()

    async def _connect(self):
        import salt.channel.client

        self._channel = salt.channel.client.AsyncPubChannel.factory(self.opts, io_loop=self._loop)
        await self._channel.connect()
        self._channel.on_recv(self._on_publish)
        log.info("hanet_liveness: listening for takeover orders from %s", self.opts.get("master"))

    async def _on_publish(self, payload):
        heard = time.time()
        order = self.parse_order(payload, self.opts["id"])
        if order is not None:
            self.orders.handle(order, heard, "publication")

    def stop(self, timeout=2.0):
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)


def _warm():
    """Import what a takeover needs in the minion's main process: Salt forks every job
    from it, so ``hanet.takeover`` then starts with them loaded."""
    import importlib

    for name in (
        "_hanet.model",
        "_hanet.desired",
        "_hanet.common",
        "_hanet.links",
        "_hanet.floating",
        "_hanet.dnsmasq",
        "_hanet.metadata",
        "_hanet.arp",
        "_hanet.host",
        "_hanet.failover",
        "_hanet.takeover",
        "pyroute2",
    ):
        try:
            importlib.import_module(name)
        except Exception as err:  # pylint: disable=broad-except
            log.debug("hanet_liveness: could not preload %s: %s", name, err)


def _fork_safe_salt():
    """Make the locks Salt's code takes in this beacon's threads safe across the job
    forks of the minion's main thread. Python 3.11's ``functools.cached_property``
    holds one lock per property, shared by every instance: when the order listener's
    thread signs in again (a new master AES key, after a master restart) it builds
    ``salt.cache.Cache.modules`` under that lock, and a job the main thread forks at
    that moment inherits it held; its own sign-in then waits for it for ever (seen:
    a ``state.apply`` that never answered). Each forked child gets fresh locks
    (``os.register_at_fork``), registered once per process."""
    import functools

    import salt.cache

    cls = salt.cache.Cache
    if getattr(cls, "_hanet_fork_safe", False):
        return
    props = [v for v in vars(cls).values() if isinstance(v, functools.cached_property) and hasattr(v, "lock")]

    def fresh_locks():
        import threading

        for prop in props:
            prop.lock = threading.RLock()

    if props:
        os.register_at_fork(after_in_child=fresh_locks)
    cls._hanet_fork_safe = True


class _Running:
    """The probe thread, the sender thread (and the order listener) of one beacon
    configuration."""

    def __init__(self, prober, sender, save, parse_order, supervisor=None):
        self.prober = prober
        self.sender = sender
        self.supervisor = supervisor
        self.fence = None
        self.health = None
        self.metrics = None
        self.refresh = None
        self.ports = None
        self.follow = None
        self.save = save  # writes the peers' view (for hanet.status)
        self.parse_order = parse_order
        self.orders = {}  # master -> its OrderListener, once signed in to it; False: none
        self.dispatch = None  # Orders: runs what the listeners hear (a network host)
        self.direct = None  # DirectOrders (ha:order_port)

    @property
    def alive(self):
        return self.prober.alive

    def stop(self):
        if self.metrics is not None:
            self.metrics.stop()
        if self.refresh is not None:
            self.refresh.stop()
        if self.ports is not None:
            self.ports.stop()
        if self.follow is not None:
            self.follow.stop()
        if self.fence is not None:
            self.fence.stop()
        if self.health is not None:
            self.health.stop()
        self.prober.stop()
        if self.supervisor is not None:
            self.supervisor.stop()
        self.sender.stop()
        for listener in self.orders.values():
            if listener:
                listener.stop()
        if self.direct is not None:
            self.direct.stop()


def _real(dunder):
    """The object behind a loader dunder (``__salt__``, ``__opts__``): the dunder itself
    resolves through the loader's context, which the beacon's own threads do not have."""
    value = getattr(dunder, "value", None)
    return value() if callable(value) else dunder


def _start(cfg):
    opts = _real(__opts__)
    lib = {
        name: _lib(name)
        for name in (
            "liveness",
            "failover",
            "arp",
            "common",
            "model",
            "supervise",
            "fence",
            "health",
            "metrics",
            "portwatch",
            "ruleset",
            "follow",
        )
    }
    _warm()
    _fork_safe_salt()
    liveness, paths = lib["liveness"], lib["common"].Paths(root_dir=opts.get("root_dir", "/"))
    known = liveness.known_states(paths)
    holder = {}
    master_ips = [ip for _, ip in masters(opts) if ip] or ([opts["master_ip"]] if opts.get("master_ip") else [])
    report_to = [(ip, int(cfg["report_port"])) for ip in master_ips] if cfg.get("report_port") else []
    sender = Sender(
        opts,
        lib,
        {peer: [tuple(t) for t in targets] for peer, targets in (cfg.get("standby_for") or {}).items()},
        report_to,
    )
    sender.warm()

    def save():
        own = holder["health"].snapshot() if holder.get("health") is not None else None
        if holder["prober"].peers or own is not None:  # a host that only supervises has no view
            liveness.save_view(paths, opts["id"], holder["prober"].view(), own)

    def on_change(peer, state, detected_at, initial):
        if initial and known.get(peer, liveness.UP) == state:
            save()
            return  # nothing changed since the beacon last ran (a refresh, a restart)
        log.warning("hanet_liveness: peer %s is %s", peer, state)
        targets = [f"{i}:{a}" for i, a in holder["prober"].peers[peer].targets]
        sender.submit(peer, state, detected_at + skew, targets)
        save()
        if state == liveness.UP and not initial and announce is not None:
            # a peer is back (a healed partition): the owner says again who holds what
            import threading

            threading.Thread(target=announce, name="hanet-announce", daemon=True).start()

    skew = float(cfg.get("clock_offset_s") or 0)  # a test hook (module docstring)
    announce = None
    if cfg.get("orders"):
        salt_announce = _real(__salt__)

        def announce():
            try:
                got = salt_announce["hanet.announce"]()
                if got:
                    log.warning("hanet_liveness: a peer is back: announced %s again", ", ".join(got))
            except Exception:  # pylint: disable=broad-except  (log it; the beacon goes on)
                log.exception("hanet_liveness: announcing again failed")

    peers = {name: [tuple(t) for t in targets] for name, targets in cfg["peers"].items()}
    probe = lib["model"].Probe.of(cfg.get("interval_ms"), cfg.get("misses"), cfg.get("rise"))
    holder["prober"] = liveness.Prober(peers, on_change, probe)
    supervisor = None
    if cfg.get("supervise"):

        def restarted(kind, name, pid):
            lib["metrics"].host_store(paths).add("hanet_daemon_restarts_total", {"daemon": kind, "name": name})
            sender.event(
                lib["supervise"].restarted_tag(opts["id"], kind, name),
                {"host": opts["id"], "daemon": kind, "name": name, "pid": pid, "at": time.time()},
            )

        supervisor = lib["supervise"].Supervisor(paths, restarted).start()
    fence = None
    if cfg.get("orders"):  # a network host: rule 2, an isolated owner stops answering
        salt_funcs = _real(__salt__)
        # every master: an owner that still hears one of them is not isolated
        fence = lib["fence"].Fence(
            holder["prober"],
            probe,
            [ip for _, ip in masters(opts)] or [opts.get("master_ip")],
            lambda: log.warning("hanet_liveness: fenced: %s", salt_funcs["hanet.fence"]()),
        )
    health_cfg = cfg.get("health")
    if health_cfg:  # a network host: can it serve its networks? (rule 3: hand over)

        def on_health(lost, at):
            sender.health(lost, at + skew)
            save()

        view = liveness.read_view(paths).get("health")
        holder["health"] = lib["health"].Health(
            health_cfg.get("uplink") or None,
            health_cfg.get("segments") or {},
            probe,
            on_health,
            known=view.get("lost") if isinstance(view, dict) else None,
        )
    running = _Running(
        holder["prober"].start(), sender, save=save, parse_order=lib["failover"].parse_order, supervisor=supervisor
    )
    if cfg.get("orders"):
        running.dispatch = Orders(_real(__salt__), sender.prechecks)
        if cfg.get("order_port"):
            try:
                running.direct = DirectOrders(
                    opts,
                    cfg["order_port"],
                    running.dispatch,
                    lib["failover"].parse_order_datagram,
                    master_ips,
                    lib["common"],
                )
            except OSError as err:  # the publication still brings every order
                log.warning("hanet_liveness: no direct orders on UDP port %s: %s", cfg["order_port"], err)
    running.fence = fence.start() if fence is not None else None
    running.health = holder["health"].start() if holder.get("health") is not None else None
    # the periodic threads use the library only: a job the minion forks while one of them
    # is inside Salt's loader would inherit its locks held (a state.apply that never ends)
    hostlib = _lib("host")
    running.metrics = lib["metrics"].Writer(lambda: hostlib.beacon_metrics(opts["id"], paths)).start()
    # VM ports bound when plugged (and unbound when unplugged), not at the next apply
    running.ports = lib["portwatch"].PortWatch(lambda: lib["ruleset"].bind_ports(paths)).start()
    if cfg.get("follow"):
        # a hardware network's owner (network hosts): the MAC its instances' floating-IP
        # frames are readdressed to, followed through failovers
        running.follow = (
            lib["follow"]
            .Follow(paths, [tuple(t) for t in cfg["follow"]], lambda macs: lib["ruleset"].bind_owners(paths, macs))
            .start()
        )
    if cfg.get("orders") and cfg.get("garp_refresh_s"):
        # ha:garp_refresh_s: the owner says again who holds its gateways and floating IPs
        # (one round), before a switch's MAC table or a neighbour's ARP cache forgets it
        running.refresh = (
            lib["metrics"]
            .Writer(lambda: hostlib.beacon_announce(opts["id"], paths), float(cfg["garp_refresh_s"]), first=False)
            .start()
        )
    return running


def beacon(config):
    """Start the probe thread on the first poll; later polls only keep the peers' view
    (for ``hanet.status``) fresh. Transitions are fired by the thread itself."""
    cfg = _config(config)
    key = json.dumps(cfg, sort_keys=True, default=str)
    cur = __context__.get(CTX)
    if cur is not None and (cur[0] != key or not cur[1].alive):
        cur[1].stop()
        cur = None
    if cur is None:
        cur = (key, _start(cfg))
        __context__[CTX] = cur
    running = cur[1]
    if cfg.get("orders"):
        # what an order would need, computed ahead in this (the main) thread, so that the
        # order's takeover only binds; nothing to do while the pillar and record are
        # unchanged
        try:
            _real(__salt__)["hanet.prepare"]()
        except Exception as err:  # pylint: disable=broad-except  (the takeover computes it then)
            log.debug("hanet_liveness: hanet.prepare: %s", err)
        # a subscription per master (hot multi-master: either may decide and order), each
        # once the minion has signed in to that master
        opts = _real(__opts__)
        for name, ip in masters(opts):
            if name in running.orders:
                continue
            mopts = master_opts(opts, name, ip)
            if not OrderListener.minion_signed_in(mopts):
                continue
            try:
                running.orders[name] = OrderListener(mopts, running.dispatch, running.parse_order)
            except Exception as err:  # pylint: disable=broad-except  (the job path still works)
                running.orders[name] = False  # takeover jobs alone will do
                log.warning("hanet_liveness: cannot listen for takeover orders from %s: %s", name, err)
    running.save()
    return []


def close(config):  # pylint: disable=unused-argument
    """Stop the probe thread (Salt calls this when beacons are refreshed or removed)."""
    cur = __context__.pop(CTX, None)
    if cur is not None:
        cur[1].stop()
