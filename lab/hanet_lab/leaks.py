"""What a node keeps, counted, to see whether repeated failovers leave anything behind.

Per host: addresses, links and routes (all families), nftables objects (the handles in
``nft -a list ruleset``), processes in its namespace, files under the minion's root_dir,
and the threads and open fds of its long-lived salt-minion processes (the one the lab
started and its direct children, the process manager; job processes are not counted).
Per master the same kernel counts, its processes, the files under ``<cachedir>/hanet``,
and the threads and fds of the ``hanet_failover`` engine process.

A count is the minimum over a few samples, so a job process, a thread or a temporary
file that exists for a moment is not a leak; what stays is. Compare like with like: a
host that was power-cycled has new processes, so take the baseline after a first cycle.
:func:`compare` and :func:`leaks` are pure (unit-tested); :func:`snapshot` reads the lab.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from typing import Optional

ENGINE = "Engine(salt.loaded.ext.engines.hanet_failover)"
RESOURCES = ("addresses", "links", "routes", "nft objects", "processes", "files", "threads", "fds")


@dataclass(frozen=True)
class Row:
    resource: str
    node: str
    baseline: Optional[int]
    after: Optional[int]

    @property
    def leaked(self) -> Optional[int]:
        """How many more there are now (0 when fewer); None when a side is missing."""
        if self.baseline is None or self.after is None:
            return None
        return max(0, self.after - self.baseline)


def compare(baseline: dict, after: dict) -> list[Row]:
    """Rows for every (resource, node) in either snapshot, by node then resource."""
    order = {r: i for i, r in enumerate(RESOURCES)}
    keys = sorted(set(baseline) | set(after), key=lambda k: (k[1], order.get(k[0], len(order)), k[0]))
    return [Row(res, node, baseline.get((res, node)), after.get((res, node))) for res, node in keys]


def leaks(rows: list[Row]) -> list[Row]:
    """The rows that grew, or that cannot be compared (counted on one side only: a
    process that was there is gone, so its threads cannot be told)."""
    return [r for r in rows if r.leaked != 0]


def table(rows: list[Row]) -> str:
    """A markdown table: resource | host | baseline | after N cycles | leaked."""

    def cell(v):
        return "?" if v is None else str(v)

    lines = ["| resource | host | baseline | after | leaked |", "|---|---|---|---|---|"]
    lines += [f"| {r.resource} | {r.node} | {cell(r.baseline)} | {cell(r.after)} | {cell(r.leaked)} |" for r in rows]
    return "\n".join(lines)


def _lines(argv) -> int:
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return sum(1 for line in out.splitlines() if line.strip())


def _files(root) -> int:
    return sum(len(files) for _, _, files in os.walk(root))


def _entries(path) -> Optional[int]:
    try:
        return len(os.listdir(path))
    except OSError:
        return None


def _children(pid) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as fh:
                    if int(fh.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _per_process(pids) -> dict:
    """Threads and fds summed over ``pids`` (None when one of them is gone)."""
    threads = [_entries(f"/proc/{p}/task") for p in pids]
    fds = [_entries(f"/proc/{p}/fd") for p in pids]
    if not pids or None in threads or None in fds:
        return {"threads": None, "fds": None}
    return {"threads": sum(threads), "fds": sum(fds)}


def count(lab, node) -> dict:
    """One sample of ``node`` (a host or the master): {resource: count}."""
    ns = lab.ns(node)
    procs = lab.processes(node)[node]
    out = {
        "addresses": _lines(["ip", "-n", ns, "-o", "addr", "show"]),
        "links": _lines(["ip", "-n", ns, "-o", "link", "show"]),
        "routes": _lines(["ip", "-n", ns, "route", "show", "table", "all"])
        + _lines(["ip", "-n", ns, "-6", "route", "show", "table", "all"]),
        "nft objects": subprocess.run(
            ["ip", "netns", "exec", ns, "nft", "-a", "list", "ruleset"], capture_output=True, text=True, check=True
        ).stdout.count("# handle"),
        "processes": len(procs),
    }
    if node == lab.topology.master.name:
        out["files"] = _files(os.path.join(lab.master_root, "var", "cache", "salt", "master", "hanet"))
        out.update(_per_process([pid for pid, cmd in procs if ENGINE in cmd]))
    else:
        out["files"] = _files(lab.minion_root(node))
        main = [pid for pid, cmd in procs if pid == lab.pids.get(f"salt-minion-{node}")]
        out.update(_per_process(main + [c for m in main for c in _children(m)]))
    return out


def _fd_kind(target: str) -> str:
    """An fd's target, without what differs between two fds of one kind (socket inodes,
    pipe numbers)."""
    for kind in ("socket:", "pipe:", "anon_inode:"):
        if target.startswith(kind):
            return target if kind == "anon_inode:" else kind.rstrip(":")
    return target


def _read(path: str) -> Optional[str]:
    try:
        with open(path, "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None


def details(lab, node) -> dict:
    """What ``count`` counts, item by item, for what can be named: {"processes":
    Counter(command lines), "threads": Counter(thread names), "fds": Counter(fd
    targets)} (threads and fds of the same processes ``count`` sums, named without their
    pids: a host that was power-cycled has new ones)."""
    from collections import Counter

    procs = lab.processes(node)[node]
    out = {"processes": Counter(cmd[:160] for _, cmd in procs), "threads": Counter(), "fds": Counter()}
    if node == lab.topology.master.name:
        pids = [pid for pid, cmd in procs if ENGINE in cmd]
    else:
        main = [pid for pid, cmd in procs if pid == lab.pids.get(f"salt-minion-{node}")]
        pids = main + [c for m in main for c in _children(m)]
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for tid in tids:
            out["threads"][_read(f"/proc/{pid}/task/{tid}/comm") or "?"] += 1
        for fd in fds:
            try:
                out["fds"][_fd_kind(os.readlink(f"/proc/{pid}/fd/{fd}"))] += 1
            except OSError:
                pass
    return out


def grew(baseline_details: dict, after_details: dict) -> list[str]:
    """One line per (node, resource, item) there is more of after than in the baseline:
    what a growing count is made of."""
    lines = []
    for node in sorted(after_details):
        before = baseline_details.get(node, {})
        for res, items in sorted(after_details[node].items()):
            more = items - before.get(res, type(items)())
            for item, n in sorted(more.items()):
                lines.append(f"{node} {res}: +{n} {item}")
    return lines


def snapshot(lab, nodes, samples=3, every=2.0) -> dict:
    """{(resource, node): the least count over ``samples`` samples ``every`` s apart}."""
    best: dict = {}
    for i in range(samples):
        if i:
            time.sleep(every)
        for node in nodes:
            for res, n in count(lab, node).items():
                key = (res, node)
                if key not in best or (n is not None and (best[key] is None or n < best[key])):
                    best[key] = n
    return best
