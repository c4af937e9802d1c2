"""Daemons supervised by their pid file: the plumbing dnsmasq and the metadata service share.

There is no init system to lean on: hanet starts a daemon with a command that
daemonizes (it outlives the Salt job that started it) and finds it again through the pid
file the daemon writes. A pid is trusted only while its process is alive and its command
line has a *needle* (the option naming that pid file), so a stale pid file whose pid was
reused by another process is never mistaken for ours, and never signalled.

Deadlines are ``time.monotonic()`` values; timeouts are seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

# what reading a pid file may raise that means "no pid" (the caller may widen it)
MISSING = (FileNotFoundError, NotADirectoryError)
EXIT_WAIT = 2.0  # how long a process already going, or killed, is given to finish exiting
POLL = 0.02  # while waiting for a process to exit
PID_POLL = 0.05  # while waiting for a pid file
RETRY_POLL = 0.2  # between attempts to start


def parse_pid(text):
    """The pid in a pid file's ``text`` (None when empty, missing or not a number)."""
    try:
        return int(text.strip()) if text else None
    except ValueError:
        return None


def read_pid(path, errors=MISSING):
    """The pid in the pid file ``path``, or None (no file: one of ``errors`` on reading)."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except errors:
        return None
    return parse_pid(text)


def process_matches(pid, needle):
    """True when ``pid`` is a live (not zombie) process whose command line has ``needle``."""
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as fh:
            stat = fh.read()
        if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return False
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            args = fh.read().split(b"\0")
    except (FileNotFoundError, ProcessLookupError, IndexError, OSError):
        return False
    return needle.encode() in args


def process_gone(pid):
    """True once ``pid`` has finished exiting (no such process, or a zombie).

    Not the same as ``not process_matches``: an exiting process loses its command line
    (its memory) before it closes its files, so its sockets may still be bound then.
    """
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError, IndexError, OSError):
        return True


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read()
    except OSError:
        return b""


def stop_pid(pid, needle, timeout):
    """Terminate our process ``pid`` (only when its command line has ``needle``): SIGTERM,
    then SIGKILL when it is still ours after ``timeout``. True when it was ours and was
    signalled; False when it was not running (or not ours)."""
    if not process_matches(pid, needle):
        # dead, or still exiting (its command line is gone before its sockets are)
        deadline = time.monotonic() + EXIT_WAIT
        while pid and time.monotonic() < deadline and not process_gone(pid) and not _cmdline(pid):
            time.sleep(POLL)
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process_gone(pid):
            return True
        time.sleep(POLL)
    if process_matches(pid, needle):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + EXIT_WAIT
    while time.monotonic() < deadline and not process_gone(pid):
        time.sleep(POLL)
    return True


def stop(pidfile, needle, timeout, errors=MISSING):
    """Stop the daemon of ``pidfile`` (``stop_pid``) and remove the pid file. The pid
    stopped, or None when none of ours was running."""
    pid = read_pid(pidfile, errors)
    stopped = stop_pid(pid, needle, timeout)
    try:
        os.unlink(pidfile)
    except FileNotFoundError:
        pass
    return pid if stopped else None


def launch(cmd, retry_until, retry_if=None, **run_kwargs):
    """Run ``cmd``, a command that daemonizes and exits 0 once its daemon serves, and
    return its ``CompletedProcess``. While it fails (and ``retry_if(proc)``, when given,
    says the failure is worth another try) it is run again until ``retry_until``: a
    predecessor that is still exiting may hold the address or port a moment longer.
    ``run_kwargs`` go to ``common.run`` (stdin is always /dev/null): the supervisor
    starts daemons from a thread of the minion's process."""
    from .common import run

    while True:
        proc = run(cmd, stdin=subprocess.DEVNULL, **run_kwargs)
        if proc.returncode == 0 or (retry_if is not None and not retry_if(proc)) or time.monotonic() > retry_until:
            return proc
        time.sleep(RETRY_POLL)


def wait_for_pid(pidfile, needle, deadline, errors=MISSING):
    """The pid in ``pidfile`` once it names a live process of ours (``needle``), or None
    when none does by ``deadline``."""
    while time.monotonic() < deadline:
        pid = read_pid(pidfile, errors)
        if process_matches(pid, needle):
            return pid
        time.sleep(PID_POLL)
    return None


def lock(paths):
    """The lock that hanet's appliers and its supervisor take around starting and
    stopping a daemon (one for all of them: the applies are sequential anyway)."""
    from .common import FileLock

    return FileLock(paths.run("daemons.lock"))
