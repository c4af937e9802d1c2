"""Lab bookkeeping on this machine: state files, and tearing labs down from them.

Every lab writes ``/run/hanet-lab/<prefix>.json`` *before* it creates anything, so
a namespace, a run directory or a process that carries a lab prefix but has no state
file is a leftover and may be swept. A state file names the process that owns the lab
(``owner_pid`` + its start time); ``owner_pid: null`` means detached (``hanet_lab up``),
kept until ``down``. A lab whose owner has died (SIGKILL, power cut of a test run) is
*stale*.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import time
from typing import Optional

from . import nslib

STATE_DIR = os.environ.get("HANET_LAB_STATE_DIR", "/run/hanet-lab")
RUN_BASE = os.environ.get("HANET_LAB_TMP", "/tmp")
PREFIX_RE = re.compile(r"^hl-[0-9a-f]{6}$")
NS_RE = re.compile(r"^(hl-[0-9a-f]{6})-")
RUNDIR_RE = re.compile(r"^hanet-lab-(hl-[0-9a-f]{6})$")


def rundir_for(prefix: str) -> str:
    return os.path.join(RUN_BASE, f"hanet-lab-{prefix}")


def state_path(prefix: str) -> str:
    return os.path.join(STATE_DIR, f"{prefix}.json")


def new_prefix() -> str:
    taken = set(all_prefixes())
    while True:
        p = "hl-" + secrets.token_hex(3)
        if p not in taken:
            return p


def write_state(prefix: str, data: dict) -> None:
    os.makedirs(STATE_DIR, exist_ok=True)
    path = state_path(prefix)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def read_state(prefix: str) -> Optional[dict]:
    try:
        with open(state_path(prefix)) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def remove_state(prefix: str) -> None:
    try:
        os.unlink(state_path(prefix))
    except FileNotFoundError:
        pass


def recorded_prefixes() -> list[str]:
    try:
        names = os.listdir(STATE_DIR)
    except FileNotFoundError:
        return []
    return sorted(n[:-5] for n in names if n.endswith(".json") and PREFIX_RE.match(n[:-5]))


def all_prefixes() -> list[str]:
    """Every lab prefix that leaves a trace here: state files, namespaces, run dirs."""
    found = set(recorded_prefixes())
    for ns in nslib.ns_list():
        m = NS_RE.match(ns)
        if m:
            found.add(m.group(1))
    try:
        for d in os.listdir(RUN_BASE):
            m = RUNDIR_RE.match(d)
            if m:
                found.add(m.group(1))
    except FileNotFoundError:
        pass
    return sorted(found)


def owner_alive(st: dict) -> bool:
    pid = st.get("owner_pid")
    if pid is None:
        return True  # detached: lives until `down`
    start = nslib.pid_start_time(pid)
    return start is not None and (st.get("owner_start") in (None, start))


def namespaces_of(prefix: str) -> list[str]:
    return [ns for ns in nslib.ns_list() if ns.startswith(prefix + "-")]


def destroy(prefix: str, reap=None, grace: float = 1.0) -> dict:
    """Remove everything lab ``prefix`` made: processes in its namespaces (and any whose
    command line names its run dir), the namespaces, the run dir, the state file.
    Works from the state file or, without one, from the names alone. Idempotent."""
    if not PREFIX_RE.match(prefix):
        raise ValueError(f"not a lab prefix: {prefix!r}")
    t0 = time.monotonic()
    st = read_state(prefix) or {}
    rundir = st.get("rundir") or rundir_for(prefix)
    names = set(namespaces_of(prefix)) | {
        ns for ns in (st.get("namespaces") or {}).values() if ns.startswith(prefix + "-")
    }
    inodes = {nslib.ns_inode(ns) for ns in names}
    marks = [rundir.rstrip("/") + "/"]

    def find():
        return nslib.pids_in(inodes, marks)

    killed = nslib.kill_all(find, grace=grace, reap=reap)
    for ns in sorted(names):
        nslib.ns_remove(ns)
    if os.path.isdir(rundir):
        shutil.rmtree(rundir, ignore_errors=True)
    remove_state(prefix)
    return {"prefix": prefix, "killed": killed, "namespaces": sorted(names), "seconds": round(time.monotonic() - t0, 3)}


def sweep(mode: str = "stale", reap=None) -> list[dict]:
    """Tear down labs. ``mode``: ``recorded`` (every lab with a state file), ``stale``
    (labs whose owner died, and traces without a state file), ``all`` (both)."""
    out = []
    recorded = set(recorded_prefixes())
    for prefix in all_prefixes():
        st = read_state(prefix) if prefix in recorded else None
        if mode == "recorded":
            take = st is not None
        elif mode == "stale":
            take = st is None or not owner_alive(st)
        elif mode == "all":
            take = True
        else:
            raise ValueError(mode)
        if take:
            out.append(destroy(prefix, reap=reap))
    return out
