#!/usr/bin/env python3
"""state.apply hanet on one host with 16 networks and 1,000 instances: first, no-op, add one.

A lab with 1 salt-master and 1 host (compute1, a real salt-minion in its namespace). The
pillar has ``--networks`` multi_host networks (default 16), each a VXLAN segment
(``vx<vni>`` on the trunk eth2, unicast remote 198.51.100.12, a peer compute host's
underlay address: the usual way to carry many networks over one NIC when 802.1Q is not
available; ``--uplinks hostonly`` gives bridges without an uplink instead), and
``--instances`` instances on compute1 (default 1,000) spread round robin over them.

Each run measures, wall clock around ``salt compute1 state.apply hanet`` through the
master (what an operator waits for). The pillar file is rewritten without a
``saltutil.refresh_pillar``, as an operator edits pillar on the master: ``state.apply``
compiles the minion's pillar afresh from the master anyway, so that cost is measured:

- first apply   from a clean host: 16 bridges + VXLAN links + addresses, ruleset, 16 dnsmasq
- no-op         the same pillar again: must report zero changes
- add one       one more instance: must change only dnsmasq, by SIGHUP (same pid)
- empty SLS     ``state.apply bench.empty`` (one ``test.nop``, same big pillar): what Salt
                itself costs per state run (pillar compile on the master, transfer,
                state compiler, return)
- remove all    an empty hanet pillar (informational: removes everything again)

plus each hanet state's own ``duration`` as Salt reports it. The figure per step is the
median over ``--runs`` runs (default 3). Prints a table with the targets beside them.

    ./dev bench apply [--runs 3] [--networks 16] [--instances 1000] [--uplinks vxlan|hostonly] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from hanet_lab import Lab
from hanet_lab.topology import Host, Master, Topology

HOST = "compute1"
TARGETS = {"first": 15.0, "noop": 5.0, "add": 3.0}  # seconds, issue 3
STEPS = [
    ("first", "first apply"),
    ("noop", "no-op re-apply"),
    ("add", "add one instance"),
    ("empty", "empty SLS (salt only)"),
    ("remove", "remove everything"),
]


def topology() -> Topology:
    host = Host(
        name=HOST,
        links={"mgmt0": "mgmt", "eth0": "public", "eth2": "seg-trunk"},
        addresses={"mgmt0": ["192.0.2.11/24"], "eth0": ["203.0.113.11/24"], "eth2": ["198.51.100.11/24"]},
    )
    master = Master(name="master", links={"mgmt0": "mgmt"}, addresses={"mgmt0": ["192.0.2.1/24"]})
    topo = Topology(segments=["mgmt", "public", "seg-trunk"], master=master, hosts={HOST: host}, routers={}, vms={})
    topo.validate()
    return topo


def pillar(networks: int, instances: int, uplinks: str = "vxlan") -> dict:
    nets, insts = {}, {}
    for n in range(networks):
        label = f"net{n:02d}"
        spec = {"cidr": f"10.128.{n}.0/24", "bridge": f"br{100 + n}", "multi_host": True, "gateway": f"10.128.{n}.1"}
        if uplinks == "vxlan":
            spec.update(bridge_interface="eth2", vxlan={"vni": 5000 + n, "remotes": ["198.51.100.12"]})
        nets[label] = spec
    for i in range(instances):
        n, k = i % networks, i // networks
        name = f"vm{i:04d}"
        insts[name] = {
            "host": HOST,
            "nics": [
                {
                    "network": f"net{n:02d}",
                    "mac": f"fa:16:3e:{n:02x}:{k // 256:02x}:{k % 256:02x}",
                    "ip": f"10.128.{n}.{10 + k}",
                }
            ],
        }
    host = {
        "public_interface": "eth0",
        "routing_source_ip": "203.0.113.11",
        "networks": {label: {"address": f"10.128.{n}.2"} for n, label in enumerate(nets)},
    }
    return {"hanet": {"networks": nets, "hosts": {HOST: host}, "instances": insts}}


def _states(ret) -> dict:
    if not isinstance(ret, dict):
        raise RuntimeError(f"state.apply failed: {ret}")
    bad = {k: v.get("comment") for k, v in ret.items() if not v.get("result")}
    if bad:
        raise RuntimeError(f"state.apply had failures: {json.dumps(bad, indent=1)[:3000]}")
    return ret


def apply(lab, sls="hanet", timeout=300):
    t0 = time.monotonic()
    ret = lab.salt(HOST, "state.apply", [sls], timeout=timeout).get(HOST)
    wall = time.monotonic() - t0
    ret = _states(ret)
    per_state = {v["__id__"]: v.get("duration", 0.0) / 1000 for v in ret.values()}
    changed = {v["__id__"]: v["changes"] for v in ret.values() if v.get("changes")}
    return wall, per_state, changed


def dnsmasq_pids(lab) -> dict:
    # hanet.status is a plain call: it reads the minion's in-memory pillar, so refresh it
    # (state.apply compiled its own; this is outside the timings)
    lab.salt(HOST, "saltutil.refresh_pillar", kwarg={"wait": True}, timeout=60)
    st = lab.salt(HOST, "hanet.status", timeout=60)[HOST]
    return {net: (v.get("dnsmasq") or {}).get("pid") for net, v in st["networks"].items()}


EMPTY = {"hanet": {"networks": {}, "hosts": {}, "instances": {}}}


def clean(lab):
    """Make compute1 a clean host (an empty hanet pillar applied), then check it is."""
    lab.set_pillar(EMPTY, refresh=False)
    wall, per_state, _ = apply(lab)
    links = [n for n in lab.links(HOST) if n.startswith(("br1", "vx"))]
    procs = [c for _, c in lab.processes(HOST).get(HOST, []) if "dnsmasq" in c]
    assert not links and not procs, f"left behind after removal: {links} {procs}"
    return wall, per_state


def one_run(lab, args, i) -> dict:
    big = pillar(args.networks, args.instances, args.uplinks)
    row = {"run": i}
    clean(lab)
    lab.set_pillar(big, refresh=False)
    row["first"], row["first_states"], ch = apply(lab)
    pids = dnsmasq_pids(lab)
    assert len([p for p in pids.values() if p]) == args.networks, f"dnsmasq pids: {pids}"
    row["noop"], row["noop_states"], ch = apply(lab)
    assert not ch, f"no-op apply reported changes: {json.dumps(ch)[:2000]}"
    # one more instance on the first network
    k = args.instances // args.networks + 1
    big["hanet"]["instances"]["vmnew"] = {
        "host": HOST,
        "nics": [{"network": "net00", "mac": f"fa:16:3e:ff:{k // 256:02x}:{k % 256:02x}", "ip": "10.128.0.250"}],
    }
    lab.set_pillar(big, refresh=False)
    row["add"], row["add_states"], ch = apply(lab)
    # a new instance needs its DHCP host entry (SIGHUP), its anti-spoofing pair (ruleset) and
    # its metadata record; nothing else may change, and no dnsmasq restarts
    assert set(ch) <= {"hanet-dnsmasq", "hanet-ruleset", "hanet-metadata"}, (
        f"adding one instance changed {sorted(ch)}: {json.dumps(ch)[:2000]}"
    )
    dn = ch.get("hanet-dnsmasq", {}).get("dnsmasq", [])
    assert len(dn) == 1 and "SIGHUP" in dn[0] and "net00" in dn[0], f"dnsmasq changes: {dn}"
    after = dnsmasq_pids(lab)
    assert after == pids, f"dnsmasq pids changed: {pids} -> {after}"
    row["add_changes"] = {k: v for c in ch.values() for k, v in c.items()}
    row["dnsmasq_pid_net00"] = (pids["net00"], after["net00"])
    row["empty"], _, _ = apply(lab, "bench.empty")
    row["remove"], row["remove_states"] = clean(lab)
    return row


def hardware() -> str:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    salt = subprocess.run(
        [sys.executable, "-c", "import salt.version; print(salt.version.__version__)"], capture_output=True, text=True
    ).stdout.strip()
    return (
        f"{os.cpu_count()} vCPU {cpu}, {mem:.0f} GiB, kernel {platform.release()}, "
        f"Python {platform.python_version()}, salt {salt}"
    )


def report(rows, args) -> str:
    med = {k: statistics.median(r[k] for r in rows) for k, _ in STEPS}
    out = [
        f"state.apply hanet on {HOST}: {args.networks} networks ({args.uplinks}), "
        f"{args.instances} instances; median of {len(rows)} run(s)",
        "",
    ]
    out.append(f"| {'step':<24} | {'median':>8} | {'runs':<24} | {'target':>7} | result |")
    out.append(f"|{'-' * 26}|{'-' * 10}|{'-' * 26}|{'-' * 9}|--------|")
    for key, title in STEPS:
        runs = ", ".join(f"{r[key]:.2f}" for r in rows)
        tgt = TARGETS.get(key)
        res = ("pass" if med[key] <= tgt else "MISS") if tgt else ""
        out.append(
            f"| {title:<24} | {med[key]:>6.2f} s | {runs:<24} | {('≤ %g s' % tgt) if tgt else '':>7} | {res:<6} |"
        )
    out += ["", "hanet states' own durations (median, s), as Salt reports them:", ""]
    ids = list(rows[0]["first_states"])
    out.append(f"| {'state':<16} | {'first':>7} | {'no-op':>7} | {'add one':>7} | {'remove':>7} |")
    out.append(f"|{'-' * 18}|{'-' * 9}|{'-' * 9}|{'-' * 9}|{'-' * 9}|")
    for sid in ids + ["(sum)"]:
        vals = []
        for step in ("first", "noop", "add", "remove"):
            if sid == "(sum)":
                vals.append(statistics.median(sum(r[f"{step}_states"].values()) for r in rows))
            else:
                vals.append(statistics.median(r[f"{step}_states"].get(sid, 0.0) for r in rows))
        out.append(f"| {sid:<16} | " + " | ".join(f"{v:>7.2f}" for v in vals) + " |")
    r0 = rows[-1]
    out += ["", "add one instance, changes reported (last run):"]
    out += [f"  {facet}: {line}" for facet, lines in r0["add_changes"].items() for line in lines]
    out += [
        f"dnsmasq net00 pid before/after: {r0['dnsmasq_pid_net00'][0]} / "
        f"{r0['dnsmasq_pid_net00'][1]} (every dnsmasq pid unchanged, asserted in every run)",
        f"hardware: {hardware()}",
    ]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="./dev bench apply", description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--networks", type=int, default=16)
    ap.add_argument("--instances", type=int, default=1000)
    ap.add_argument("--uplinks", choices=("vxlan", "hostonly"), default="vxlan")
    ap.add_argument("--json", help="also write every run's figures to this file")
    ap.add_argument(
        "--prefix",
        help="use a running lab (./dev lab up --topology FILE, FILE from --print-topology) instead of building one",
    )
    ap.add_argument("--print-topology", action="store_true", help="print the lab topology as YAML")
    args = ap.parse_args(argv)
    if args.networks > 200 or args.instances > args.networks * 230:
        ap.error("at most 200 networks and 230 instances per network (one /24 each)")
    if args.print_topology:
        print(topology().to_yaml())
        return 0
    t0 = time.monotonic()
    rows = []
    progress = lambda m: print(f"  .. {m}", file=sys.stderr, flush=True)  # noqa: E731
    lab = Lab.attach(args.prefix) if args.prefix else Lab(topology(), progress=progress)
    with contextlib.nullcontext(lab) if args.prefix else lab:
        if args.prefix:
            lab.sync()  # the checkout may have changed since that lab synced
        for i in range(1, args.runs + 1):
            row = one_run(lab, args, i)
            rows.append(row)
            print(
                f"run {i}: first {row['first']:.2f} s, no-op {row['noop']:.2f} s, "
                f"add one {row['add']:.2f} s, empty SLS {row['empty']:.2f} s, "
                f"remove {row['remove']:.2f} s",
                file=sys.stderr,
                flush=True,
            )
    text = report(rows, args)
    print(text)
    print(f"\n(whole benchmark {time.monotonic() - t0:.0f} s, {time.strftime('%Y-%m-%d')})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "rows": rows, "hardware": hardware()}, fh, indent=1)
    med = {k: statistics.median(r[k] for r in rows) for k in TARGETS}
    return 0 if all(med[k] <= TARGETS[k] for k in TARGETS) else 1


if __name__ == "__main__":
    sys.exit(main())
