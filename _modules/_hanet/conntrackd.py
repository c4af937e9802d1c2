"""conntrackd on the network hosts: the connection tracking state of the flows they NAT
(their networks' instances: SNAT to the network's ``snat_address``, floating IPs),
carried to the standbys, so that open connections survive a failover (issue 14 §3).

Every network host runs one conntrackd in FTFW mode (reliable, acknowledged) on the
multicast group of ``ha:conntrack_sync``, on that interface: each sends the entries of
its networks' flows (``Address Accept``: their fixed ranges) to the others, which keep
them in their external cache. A takeover commits that cache into the kernel
(``conntrackd -c``) before it binds the addresses, so the first mid-stream packet finds
its NAT mapping; afterwards the new owner flushes its caches, resyncs from the kernel
and sends the others a bulk update (``after_takeover``), as conntrackd's own
``primary-backup.sh`` does on a VRRP transition. A conntrackd that starts (a host that
comes back, a daemon the beacon's supervisor restarts: ``revive``) asks the others for
their flows at once (``StartupResync``), so its external cache does not start empty.

The daemon runs in the foreground of its own session, started by the state (it outlives
the job) with a pid file hanet writes; its config, lock, control socket and log live
under the minion's ``root_dir``. The applier reads the sync interface's own address,
which the config names (``IPv4_interface``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from typing import Optional

from . import daemon
from .common import Change, read_text, write_atomic

FACET = "conntrackd"
NAME = "conntrackd"  # the supervisor's name for it (supervise.running)
START_WAIT_S = 5.0  # for the control socket of a daemon just started


def files(paths):
    return {
        "conf": paths.state("conntrackd", "conntrackd.conf"),
        "pid": paths.run("conntrackd.pid"),
        "lock": paths.run("conntrackd.lock"),
        "ctl": paths.run("conntrackd.ctl"),
        "log": paths.state("conntrackd", "conntrackd.log"),
    }


def binary():
    return shutil.which("conntrackd") or "/usr/sbin/conntrackd"


def render(sync, paths, local_ip) -> str:
    """The config of ``sync`` (desired.ConntrackSync) for this host (``local_ip``: its
    address on the sync interface). Pure."""
    f = files(paths)
    accept = "\n".join(f"            IPv4_address {c}" for c in sync.accept)
    return f"""# Written by hanet (salt://hanet): conntrackd for the network hosts' failover; do not edit.
Sync {{
    Mode FTFW {{
        DisableExternalCache off
        ResendQueueSize 131072
        StartupResync on
    }}
    Multicast {{
        IPv4_address {sync.group}
        Group {sync.port}
        IPv4_interface {local_ip}
        Interface {sync.interface}
        SndSocketBuffer 1249280
        RcvSocketBuffer 1249280
        Checksum on
    }}
}}
General {{
    HashSize 32768
    HashLimit 131072
    LogFile {f["log"]}
    Syslog off
    LockFile {f["lock"]}
    UNIX {{
        Path {f["ctl"]}
    }}
    NetlinkBufferSize 2097152
    NetlinkBufferSizeMaxGrowth 8388608
    Filter From Userspace {{
        Protocol Accept {{
            TCP
            UDP
        }}
        Address Accept {{
{accept}
        }}
    }}
}}
"""


def local_address(ifname) -> Optional[str]:
    """The first IPv4 address of ``ifname`` (None: no such link, or no address)."""
    from .liveness import _own_ip

    return _own_ip(ifname)


def current(paths) -> dict:
    """{"conf": the config's text or None, "pid": the daemon's pid or None}."""
    f = files(paths)
    pid = daemon.read_pid(f["pid"])
    return {"conf": read_text(f["conf"]), "pid": pid if daemon.process_matches(pid, f["conf"]) else None}


def plan(sync, current_, text=None) -> list:
    """``sync``: desired.ConntrackSync or None; ``text``: its rendered config. Pure."""
    running = current_.get("pid") is not None
    if sync is None:
        return [Change(FACET, "stop", "conntrackd", {})] if running or current_.get("conf") else []
    if not running:
        return [Change(FACET, "start", "conntrackd", {"interface": sync.interface, "group": sync.group})]
    if current_.get("conf") != text:
        return [Change(FACET, "restart", "conntrackd", {"interface": sync.interface, "group": sync.group})]
    return []


def _stop(paths):
    f = files(paths)
    daemon.stop(f["pid"], f["conf"], daemon.EXIT_WAIT)
    for leftover in (f["pid"], f["lock"], f["ctl"]):
        try:
            os.unlink(leftover)
        except FileNotFoundError:
            pass


def _start(paths, text):
    from .common import run, spawn

    f = files(paths)
    os.makedirs(os.path.dirname(f["conf"]), exist_ok=True)
    os.makedirs(os.path.dirname(f["pid"]), exist_ok=True)
    write_atomic(f["conf"], text)
    for leftover in (f["lock"], f["ctl"]):  # a daemon killed with the host left them
        try:
            os.unlink(leftover)
        except FileNotFoundError:
            pass
    with open(f["log"], "ab") as log:
        proc = spawn(
            [binary(), "-C", f["conf"]],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            close_fds=True,
        )
    write_atomic(f["pid"], f"{proc.pid}\n")
    deadline = time.monotonic() + START_WAIT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"conntrackd exited with {proc.returncode}; see {f['log']}")
        if os.path.exists(f["ctl"]) and run([binary(), "-C", f["conf"], "-s"], capture_output=True).returncode == 0:
            return proc.pid
        time.sleep(0.05)
    raise RuntimeError(f"conntrackd did not answer on {f['ctl']} within {START_WAIT_S} s; see {f['log']}")


def revive(paths, name=NAME):  # pylint: disable=unused-argument
    """Start conntrackd again with the config hanet wrote, when hanet runs it here (the
    config is there) and its process is gone (``supervise``). It asks its peers for
    their flows at once (``StartupResync``). The new pid, or None."""
    with daemon.lock(paths):
        cur = current(paths)
        if cur["pid"] is not None or not cur["conf"]:
            return None
        return _start(paths, cur["conf"])


def apply(changes, paths, sync=None) -> list:
    """Stop, start or restart the daemon (``plan``'s changes) for ``sync``."""
    done = []
    with daemon.lock(paths):
        for ch in changes:
            if ch.action in ("stop", "restart"):
                _stop(paths)
            if ch.action == "stop":
                try:
                    os.unlink(files(paths)["conf"])
                except FileNotFoundError:
                    pass
            if ch.action in ("start", "restart"):
                ip = local_address(sync.interface)
                if ip is None:
                    raise RuntimeError(f"conntrack sync interface {sync.interface} has no IPv4 address on this host")
                pid = _start(paths, render(sync, paths, ip))
                done.append(f"{ch.action} conntrackd (pid {pid}) on {sync.interface}, group {sync.group}:{sync.port}")
            else:
                done.append("stop conntrackd")
    return done


def desired_text(sync, paths):
    """The config ``sync`` renders to on this host now (None: off, or no address yet)."""
    if sync is None:
        return None
    ip = local_address(sync.interface)
    return render(sync, paths, ip) if ip else None


def _ctl(paths, flag, timeout=5):
    """``conntrackd -C <conf> <flag>``: True when it succeeded (False: no daemon, or it
    failed). Safe in the beacon's threads (``common.run``)."""
    from .common import run

    conf = files(paths)["conf"]
    if not os.path.exists(conf):
        return False
    try:
        return (
            run(
                [binary(), "-C", conf, flag],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=timeout,
            ).returncode
            == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


def commit(paths):
    """Commit the external cache (the peers' flows) into the kernel: before a takeover
    binds its addresses."""
    return _ctl(paths, "-c")


def after_takeover(paths):
    """The new owner's caches from its kernel, sent to the others (``primary-backup.sh``:
    flush, resync, bulk send)."""
    return all(_ctl(paths, flag) for flag in ("-f", "-R", "-B"))


def external(paths):
    """The external cache's entries (``conntrackd -e``), as text lines."""
    from .common import run

    conf = files(paths)["conf"]
    proc = run([binary(), "-C", conf, "-e"], stdin=subprocess.DEVNULL, capture_output=True, timeout=5)
    out = proc.stdout.decode(errors="replace") if isinstance(proc.stdout, bytes) else (proc.stdout or "")
    return [line for line in out.splitlines() if line.strip()]
