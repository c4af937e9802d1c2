#!/usr/bin/env python3
"""Leak count over failover cycles: what every network host and the master keep, before and after N cycles.

One lab (master, compute1, net1, net2, the upstream router) with ``--networks`` network-host
networks (default 8, ``hanet_lab.pillar.standby_pillar``): net1 serves every one, net2
stands by. A cycle (``hanet_lab.cycles``) ends where it began:

- power loss (``--cycles N``): net1 powered off, net2 takes every network over and
  confirms, net1 boots and comes back a standby, every network fails back to net1;
- planned (``--planned N``): ``hanet.evacuate net1``, then every network fails back.

The baseline is counted after one warm-up cycle of each kind run (net1's processes are
then post-boot ones, as after every later power cycle), the second count after the N
cycles; each count is the least of a few samples (``hanet_lab.leaks``). Prints a table
resource | host | baseline | after | leaked and exits 1 if anything grew.

    ./dev bench cycles [--cycles 100] [--planned N] [--networks 8] [--md FILE]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import traceback

from hanet_lab import Lab, cycles, leaks


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(lab, args):
    """(baseline, after) snapshots around the measured cycles."""
    nodes = [lab.topology.master.name, *sorted(lab.topology.hosts)]
    cycles.setup(lab, args.networks)
    kinds = [(cycles.planned_cycle, "planned", args.planned), (cycles.power_cycle, "power loss", args.cycles)]
    kinds = [k for k in kinds if k[2] > 0]
    for fn, name, _ in kinds:
        log(f"warm-up: one {name} cycle")
        fn(lab, args.networks)
    baseline = leaks.snapshot(lab, nodes)
    run.details = {"baseline": {n: leaks.details(lab, n) for n in nodes}}
    for fn, name, n in kinds:
        t0 = time.monotonic()
        for i in range(n):
            fn(lab, args.networks)
            log(f"{name} cycle {i + 1}/{n} done ({(time.monotonic() - t0) / (i + 1):.1f} s per cycle)")
    after = leaks.snapshot(lab, nodes)
    run.details["after"] = {n: leaks.details(lab, n) for n in nodes}
    return baseline, after


def main(argv=None):
    ap = argparse.ArgumentParser(prog="./dev bench cycles", description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=100, help="power-loss cycles (default 100)")
    ap.add_argument("--planned", type=int, default=0, help="planned evacuate/failback cycles (default 0)")
    ap.add_argument("--networks", type=int, default=8, help="network-host networks (default 8)")
    ap.add_argument("--md", help="also write the table (markdown) to this file")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench cycles: needs root (the namespace lab)", file=sys.stderr)
        return 2
    if args.cycles + args.planned <= 0:
        ap.error("no cycles to run")
    log(f"cycles benchmark: {args.planned} planned + {args.cycles} power-loss cycles, {args.networks} networks")
    t_start = time.monotonic()
    lab = None
    try:
        lab = Lab(cycles.topology(), progress=lambda m: None).up()
        log(f"lab {lab.prefix} up in {lab.timings.get('up', 0):.1f} s")
        baseline, after = run(lab, args)
    except (Exception, KeyboardInterrupt) as err:  # noqa: BLE001 - report, clean up, exit non-zero
        log(f"benchmark aborted: {err!r}")
        traceback.print_exc()
        return 1
    finally:
        if lab is not None:
            lab.down()
    rows = leaks.compare(baseline, after)
    bad = leaks.leaks(rows)
    header = (
        f"failover cycles {time.strftime('%Y-%m-%d %H:%M')} on {platform.node()} ({os.cpu_count()} CPUs): "
        f"{args.planned} planned + {args.cycles} power-loss cycles after the warm-up, {args.networks} "
        f"networks, wall time {(time.monotonic() - t_start) / 60:.1f} min"
    )
    text = (
        header
        + "\n\n"
        + leaks.table(rows)
        + "\n\n"
        + (f"{len(bad)} resources grew or could not be compared" if bad else "nothing leaked")
    )
    details = getattr(run, "details", {})
    if bad and "after" in details:  # what the growth is made of (process pids may differ)
        what = leaks.grew(details["baseline"], details["after"])
        text += "\n\nmore after than before (process, thread name, fd target):\n" + (
            "\n".join(f"- {line}" for line in what) or "- (nothing by name: only counts differ)"
        )
    print("\n" + text)
    if args.md:
        with open(args.md, "w") as fh:
            fh.write(text + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
