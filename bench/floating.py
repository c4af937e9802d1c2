#!/usr/bin/env python3
"""1,000 floating IPs on one host: hanet vs Salt's built-in states, side by side.

A lab with a salt-master, one host (compute1, a real salt-minion in its namespace) and the
upstream router on the public segment. The pillar has one multi_host network (10.0.0.0/20
on br100) with ``--count`` instances on compute1 (default 1,000), each with a floating IP
from 198.18.0.0/21 (the router routes that range on-link out of its eth0, so it ARPs for
each address and the host must answer).

Each approach runs on a clean host, wall clock around ``salt compute1 state.apply ...``
through the master (what an operator waits for):

- hanet      ``state.apply hanet`` (send_arp_for_ha on: 3 GARPs per bound address)
- built-in   ``state.apply bench.floating_builtin`` (bench/floating_builtin.sls): the way a
             user would without hanet: per floating IP ``cmd.run ip addr add`` (``unless``
             it is there) + one GARP (``arping -U``, onchanges) and four ``iptables.append``
             (DNAT in PREROUTING and OUTPUT, SNAT, hairpin MASQUERADE); once
             ``sysctl.present``, a FORWARD accept and a ``file.managed`` record

measured for each: the first apply; the time from the start of the first apply until the
router reaches the *last* floating IP (``arping`` from the router, polled every ~0.1 s);
the no-op re-apply (the same pillar again: hanet must report zero changes). Prints a
table with the ratios built-in / hanet.

    ./dev bench floating [--count 1000] [--json FILE]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import platform
import sys
import threading
import time

from hanet_lab import Lab
from hanet_lab.topology import Host, Master, Router, Topology

HOST = "compute1"
FIP_NET = ipaddress.ip_network("198.18.0.0/21")
FIXED_NET = ipaddress.ip_network("10.0.0.0/20")


def topology() -> Topology:
    host = Host(
        name=HOST,
        links={"mgmt0": "mgmt", "eth0": "public", "eth1": "seg-private"},
        addresses={"mgmt0": ["192.0.2.11/24"], "eth0": ["203.0.113.11/24"]},
        gateway="203.0.113.1",
    )
    master = Master(name="master", links={"mgmt0": "mgmt"}, addresses={"mgmt0": ["192.0.2.1/24"]})
    router = Router(name="router", links={"eth0": "public"}, addresses={"eth0": ["203.0.113.1/24"]}, http_port=0)
    topo = Topology(
        segments=["mgmt", "public", "seg-private"],
        master=master,
        hosts={HOST: host},
        routers={"router": router},
        vms={},
    )
    topo.validate()
    return topo


def pairs(count):
    fips = list(FIP_NET.hosts())[10 : 10 + count]
    fixed = list(FIXED_NET.hosts())[9 : 9 + count]
    return [(str(f), str(x)) for f, x in zip(fips, fixed)]


def hanet_pillar(count):
    insts = {}
    for i, (fip, fixed) in enumerate(pairs(count)):
        insts[f"vm{i:04d}"] = {
            "host": HOST,
            "floating_ips": [fip],
            "nics": [{"network": "private", "mac": f"fa:16:3e:10:{i // 256:02x}:{i % 256:02x}", "ip": fixed}],
        }
    return {
        "hanet": {
            "send_arp_for_ha": True,
            "networks": {
                "private": {
                    "cidr": str(FIXED_NET),
                    "bridge": "br100",
                    "bridge_interface": "eth1",
                    "multi_host": True,
                    "gateway": "10.0.0.1",
                }
            },
            "hosts": {
                HOST: {
                    "public_interface": "eth0",
                    "routing_source_ip": "203.0.113.11",
                    "networks": {"private": {"address": "10.0.0.2"}},
                }
            },
            "instances": insts,
        }
    }


def builtin_pillar(count, root):
    return {
        "bench_floating": {
            "interface": "eth0",
            "cidr": str(FIXED_NET),
            "root": root,
            "floating": [{"address": f, "fixed_ip": x} for f, x in pairs(count)],
        }
    }


def apply(lab, sls, timeout=3600):
    t0 = time.monotonic()
    ret = lab.salt(HOST, "state.apply", [sls], timeout=timeout).get(HOST)
    wall = time.monotonic() - t0
    if not isinstance(ret, dict):
        raise RuntimeError(f"state.apply {sls} failed: {str(ret)[:2000]}")
    bad = {k: v.get("comment") for k, v in ret.items() if v.get("result") is False}
    if bad:
        raise RuntimeError(f"state.apply {sls}: {len(bad)} failed: {json.dumps(bad)[:2000]}")
    changed = sum(1 for v in ret.values() if v.get("changes"))
    return t0, wall, changed, len(ret)


class Reach:
    """Polls ``arping`` from the router to ``ip`` until it answers; ``at``: when it did."""

    def __init__(self, lab, ip):
        self.lab, self.ip, self.at = lab, ip, None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop.is_set():
            cp = self.lab.exec("router", ["arping", "-q", "-c", "1", "-w", "0.1", "-I", "eth0", self.ip], timeout=10)
            if cp.returncode == 0:
                self.at = time.monotonic()
                return

    def wait(self, timeout):
        self.thread.join(timeout)
        self.stop.set()
        return self.at


def holds(lab, ip):
    return any(a.split("/")[0] == ip for a in lab.addresses(HOST, "eth0"))


def clean_builtin(lab, count):
    script = [
        "iptables -t nat -F PREROUTING",
        "iptables -t nat -F OUTPUT",
        "iptables -t nat -F POSTROUTING",
        "iptables -F FORWARD",
    ]
    lab.exec(HOST, " ; ".join(script))
    batch = "".join(f"address del {f}/32 dev eth0\n" for f, _ in pairs(count))
    lab.exec(HOST, ["ip", "-force", "-batch", "-"], input=batch)


def run_one(lab, name, sls, pillar, count):
    last = pairs(count)[-1][0]
    lab.set_pillar(pillar)
    assert not holds(lab, last), f"{name}: not a clean host"
    reach = Reach(lab, last)
    t0, first, changed, nstates = apply(lab, sls)
    at = reach.wait(60)
    _, noop, noop_changed, _ = apply(lab, sls)
    if name == "hanet" and noop_changed:
        raise RuntimeError(f"hanet no-op apply changed {noop_changed} state(s)")
    return {
        "first": first,
        "reach": (at - t0) if at else None,
        "noop": noop,
        "states": nstates,
        "first_changed": changed,
        "noop_changed": noop_changed,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    lab = Lab(topology(), progress=lambda m: print(f"  .. {m}", file=sys.stderr, flush=True))
    rows = {}
    with lab:
        lab.exec("router", "ip route add 198.18.0.0/21 dev eth0")
        root = os.path.join(lab.minion_root(HOST), "bench")
        print(f"hanet: {args.count} floating IPs ...", file=sys.stderr, flush=True)
        rows["hanet"] = run_one(lab, "hanet", "hanet", hanet_pillar(args.count), args.count)
        lab.set_pillar({"hanet": {"networks": {}, "hosts": {}, "instances": {}}})
        apply(lab, "hanet")
        assert not holds(lab, pairs(args.count)[-1][0]), "hanet left an address"
        print("built-in states ...", file=sys.stderr, flush=True)
        rows["builtin"] = run_one(
            lab, "builtin", "bench.floating_builtin", builtin_pillar(args.count, root), args.count
        )
        clean_builtin(lab, args.count)
    print(report(rows, args.count))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"count": args.count, "rows": rows}, f, indent=1)
    return 0


def _s(v):
    return "-" if v is None else f"{v:.1f} s" if v >= 10 else f"{v:.2f} s"


def report(rows, count):
    h, b = rows["hanet"], rows["builtin"]
    cpu = platform.processor() or platform.machine()
    lines = [
        f"{count} floating IPs on one host ({os.cpu_count()} vCPU {cpu}, kernel {platform.release()})",
        "",
        "| | hanet | built-in states | built-in / hanet |",
        "|---|---|---|---|",
    ]
    for key, label in (
        ("first", "first apply"),
        ("reach", "router reaches the last floating IP (from apply start)"),
        ("noop", "no-op re-apply"),
    ):
        ratio = f"{b[key] / h[key]:.1f}x" if h[key] and b[key] else "-"
        lines.append(f"| {label} | {_s(h[key])} | {_s(b[key])} | {ratio} |")
    lines.append(f"| states in the run | {h['states']} | {b['states']} | |")
    lines.append(
        f"| states changed: first / no-op | {h['first_changed']} / {h['noop_changed']} | "
        f"{b['first_changed']} / {b['noop_changed']} | |"
    )
    ok = h["noop"] and b["noop"] and b["noop"] / h["noop"] >= 10
    lines += [
        "",
        f"target: hanet's no-op re-apply at least 10x faster than the built-in way's: {'met' if ok else 'NOT met'}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
