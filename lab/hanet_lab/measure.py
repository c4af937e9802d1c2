"""``hanet_lab measure``: lab up/down times and daemon memory (PSS), as quoted in lab/README.md."""

from __future__ import annotations

import json
import os
import statistics
import time

from .lab import Lab
from .topology import default_topology


def _node_pss(mem: dict, node: str, include_gateway: bool = False) -> int:
    return sum(p["pss_kib"] for p in mem[node]["processes"] if include_gateway or not p["gateway"])


def measure(runs: int = 3, hosts: int = 4, settle: float = 5.0) -> dict:
    rows = []
    for i in range(runs):
        topo = default_topology(hosts=hosts)
        lab = Lab(topo)
        t0 = time.monotonic()
        lab.up()
        up = time.monotonic() - t0
        time.sleep(settle)  # let the daemons finish their start-up work
        mem = lab.memory()
        one, every = [], []
        first_host = next(iter(topo.hosts))
        for _ in range(20):
            t = time.monotonic()
            lab.salt(first_host, "test.ping")
            one.append(time.monotonic() - t)
            t = time.monotonic()
            lab.salt("*", "test.ping")
            every.append(time.monotonic() - t)
        master = topo.master.name
        gw = [p for p in mem[master]["processes"] if p["gateway"]]
        row = {
            "run": i + 1,
            "up_s": round(up, 2),
            "timings": dict(lab.timings),
            "master_pss_mib": round(_node_pss(mem, master) / 1024, 1),
            "master_processes": sum(1 for p in mem[master]["processes"] if not p["gateway"]),
            "gateway_pss_mib": round(sum(p["pss_kib"] for p in gw) / 1024, 1),
            "minion_pss_mib": {h: round(_node_pss(mem, h) / 1024, 1) for h in topo.hosts},
            "minion_processes": {h: len(mem[h]["processes"]) for h in topo.hosts},
            "router_pss_mib": round(_node_pss(mem, "router") / 1024, 1),
            "ping_one_median_ms": round(statistics.median(one) * 1000),
            "ping_all_median_ms": round(statistics.median(every) * 1000),
        }
        t1 = time.monotonic()
        lab.down()
        row["down_s"] = round(time.monotonic() - t1, 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    minions = [v for r in rows for v in r["minion_pss_mib"].values()]
    summary = {
        "runs": runs,
        "hosts": hosts,
        "vms": len(default_topology(hosts=hosts).vms),
        "cpus": os.cpu_count(),
        "up_s": [r["up_s"] for r in rows],
        "down_s": [r["down_s"] for r in rows],
        "up_median_s": statistics.median(r["up_s"] for r in rows),
        "down_median_s": statistics.median(r["down_s"] for r in rows),
        "minions_ping_s": [r["timings"].get("minions_ping") for r in rows],
        "sync_all_done_s": [r["timings"].get("sync_all") for r in rows],
        "master_pss_mib": [r["master_pss_mib"] for r in rows],
        "minion_pss_mib_range": [min(minions), max(minions)],
        "gateway_pss_mib": [r["gateway_pss_mib"] for r in rows],
        "ping_one_median_ms": [r["ping_one_median_ms"] for r in rows],
        "ping_all_median_ms": [r["ping_all_median_ms"] for r in rows],
    }
    print(json.dumps(summary, indent=1))
    return summary
