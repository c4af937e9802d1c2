"""Shared plumbing of the appliers: where hanet keeps its files, what a change is,
and the record of what hanet made on this host (so that removing something from the
pillar removes it from the host)."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Paths:
    """Every file hanet writes lives under the minion's root_dir (contract §1)."""

    root_dir: str = "/"

    @property
    def state_dir(self):  # durable: configs, host files, leases, the managed record
        return os.path.join(self.root_dir, "var/lib/hanet")

    @property
    def run_dir(self):  # volatile: pid files, sockets
        return os.path.join(self.root_dir, "run/hanet")

    def state(self, *parts):
        return os.path.join(self.state_dir, *parts)

    def run(self, *parts):
        return os.path.join(self.run_dir, *parts)

    def ensure(self):
        os.makedirs(self.state_dir, exist_ok=True)
        os.makedirs(self.run_dir, exist_ok=True)


@dataclass(frozen=True)
class Change:
    """One step of a plan: ``facet`` (links, sysctls, ruleset, dnsmasq, metadata,
    floating), ``action`` (create, delete, set, add, remove, restart, reload, ...),
    ``target`` (what it acts on) and ``detail`` (plain values the applier needs)."""

    facet: str
    action: str
    target: str
    detail: dict = field(default_factory=dict, compare=False, hash=False)

    def __str__(self):
        return f"{self.action} {self.target}"


def read_text(path):
    """The text of ``path``, or None when it cannot be read (missing, a directory)."""
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except OSError:
        return None


def write_atomic(path, text, mode=0o644):
    """Write ``text`` to ``path`` atomically; return True if the content changed."""
    try:
        with open(path, encoding="utf-8") as fh:
            if fh.read() == text:
                return False
    except FileNotFoundError:
        pass
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return True


class Worker:
    """A daemon thread that runs ``_run()`` until ``stop()`` (the beacon's prober,
    supervisor, fence and health watch). ``_run`` waits on ``self._stop``; ``stop``
    sets it and joins the thread for at most ``timeout`` seconds (Salt calls the
    beacon's ``close`` on a refresh: it must not hang)."""

    thread_name = "hanet-worker"

    def __init__(self):
        self._stop = threading.Event()
        self._thread = None

    def _run(self):
        raise NotImplementedError

    def start(self):
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout=2.0):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self):
        return self._thread is not None and self._thread.is_alive()


class Datagrams(Worker):
    """A UDP socket bound to ``(host, port)`` and a thread that hands each datagram to
    ``handle(raw, (src, port))`` (the master's direct orders on a network host, the
    beacons' direct reports on the master). ``wanted``: the port asked for (0: any)."""

    def __init__(self, host, port, handle, name):
        import socket

        super().__init__()
        self.thread_name, self.handle, self.wanted = name, handle, int(port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, int(port)))
        self.sock.settimeout(0.5)

    @property
    def port(self):
        return self.sock.getsockname()[1]

    def _run(self):
        import socket

        while not self._stop.is_set():
            try:
                raw, src = self.sock.recvfrom(65535)
            except socket.timeout:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                time.sleep(0.1)
                continue
            try:
                self.handle(raw, src)
            except Exception:  # pylint: disable=broad-except  (one bad datagram must not end the thread)
                log.exception("%s: a datagram from %s failed", self.thread_name, src)

    def send(self, raw, addr):
        try:
            self.sock.sendto(raw, addr)
        except OSError:
            pass

    def stop(self, timeout=2.0):
        super().stop(timeout)
        self.sock.close()


class FileLock:
    """An exclusive lock on ``path`` (a lock file), for a read-modify-write of a file
    that several processes of this host may change at once (a state run, the takeover
    job and the beacon's warm takeover of another network)."""

    def __init__(self, path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self._fh = open(path, "w", encoding="utf-8")

    def __enter__(self):
        fcntl.flock(self._fh, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self._fh, fcntl.LOCK_UN)
        self._fh.close()


class Managed:
    """What hanet made on this host, per facet: a JSON file under the state dir.

    Appliers add what they create and drop what they remove, so that an apply can
    remove things the pillar no longer names without touching anything else. ``set``
    writes what this applier changed since it read the record (its additions and
    removals), merged under a lock into what is on disk then: two takeovers of
    different networks at once each keep the other's entries.
    """

    def __init__(self, paths: Paths):
        self.path = paths.state("managed.json")
        self.lock = paths.state("managed.lock")
        self.data = self._load()
        self._mine: dict = {}  # facet -> what this applier last wrote (the base of its next delta)

    def _load(self):
        try:
            with open(self.path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (FileNotFoundError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, facet):
        return set(self.data.get(facet, []))

    def set(self, facet, names):
        names = set(names)
        base = self._mine.get(facet, self.get(facet))
        with FileLock(self.lock):
            disk = self._load()
            now = (set(disk.get(facet, [])) - (base - names)) | (names - base)
            disk[facet] = sorted(now)
            write_atomic(self.path, json.dumps(disk, indent=1, sort_keys=True) + "\n")
            self.data = disk
            self._mine[facet] = names


# --------------------------------------------------------------------------- child processes

# Held while a child process is being created, and by every os.fork() of this process
# before it forks (os.register_at_fork): see run().
_SPAWNING = threading.RLock()


def _forget_half_imports():
    """In a forked child: drop the modules another thread of the parent was importing
    at the fork. Such a module is in ``sys.modules`` half-executed, and its import lock
    is held by a thread the child does not have: the child's first import of it would
    wait for ever (a Salt job forked while a beacon thread imported something lazily).
    The child imports it afresh instead."""
    import importlib._bootstrap as bootstrap  # pylint: disable=import-outside-toplevel

    locks = bootstrap._module_locks  # pylint: disable=protected-access
    me = threading.get_ident()  # the thread that forked: its own import, if any, goes on
    for name, mod in list(sys.modules.items()):
        spec = getattr(mod, "__spec__", None)
        if spec is None or not getattr(spec, "_initializing", False):
            continue
        ref = locks.get(name)
        lock = ref() if ref is not None else None
        if lock is None or getattr(lock, "owner", None) in (None, me):
            continue
        sys.modules.pop(name, None)
        locks.pop(name, None)


def _after_fork_in_child():
    _SPAWNING.release()
    try:
        _forget_half_imports()
    except Exception:  # pylint: disable=broad-except  (never break a fork)
        pass


os.register_at_fork(before=_SPAWNING.acquire, after_in_parent=_SPAWNING.release, after_in_child=_after_fork_in_child)


def spawn(cmd, **popen_kwargs):
    """``subprocess.Popen(cmd, ...)`` under the lock that every fork of this process takes
    first (see ``run``): for a long-lived child (conntrackd in the foreground), also when
    a thread of the minion's process starts it (the beacon's supervisor)."""
    with _SPAWNING:
        return subprocess.Popen(cmd, **popen_kwargs)


def run(cmd, timeout=None, input=None, capture_output=False, **popen_kwargs):  # noqa: A002
    """``subprocess.run(cmd, ...)`` without ``check``, safe in a thread of the minion's
    process (the beacon's supervisor restarting dnsmasq, a warm takeover, the port watch
    binding VM ports with ``nft -f -``).

    Creating a child opens pipes (the exec-status pipe; a captured stdout) whose write
    ends only the child should keep. A Salt job forked by the main thread in that moment
    inherits them too, and this thread then waits for the job to exit, while it may
    hold a lock the job waits for (it happened with conntrack, ``floating.py``). So the
    child is created under a lock that every fork of this process takes first: a fork
    waits the few milliseconds until the child has exec'd. ``input`` is not fed through
    a pipe (a job forked later would keep its write end, and the child would never see
    the end of its input) but from an unlinked temporary file."""
    if capture_output:
        popen_kwargs["stdout"] = popen_kwargs["stderr"] = subprocess.PIPE
    feed = None
    if input is not None:
        feed = tempfile.TemporaryFile()
        feed.write(input.encode() if isinstance(input, str) else input)
        feed.flush()
        feed.seek(0)
        popen_kwargs["stdin"] = feed
    try:
        proc = spawn(cmd, **popen_kwargs)
    finally:
        if feed is not None:
            feed.close()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
