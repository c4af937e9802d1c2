#!/usr/bin/env python3
"""VM ports bound at plug time: plug -> bound and plug -> first DHCP answer, the port watch against an apply after the plug.

One lab (master, compute1, compute2), hanet applied with web2 in the pillar but not
running. Each trial unplugs web2, then plugs it (a veth with libvirt's tap MAC into br100,
as a hypervisor does) and measures, side by side in the same run:

- ``port watch``: nothing else is done. plug -> bound (web2's (MAC, IP) appears in the
  anti-spoofing table's dynamic set, polled every 2 ms) and plug -> lease (udhcpc in web2,
  started at once: its first DISCOVER may go out before the binding and be dropped);
- ``apply after plug``: what binding cost before the port watch: plug, then
  ``state.apply hanet`` on compute1, then udhcpc (plug -> lease).

    ./dev bench plug [--trials 10]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import traceback

from hanet_lab import Lab, default_topology
from hanet_lab.pillar import lab_pillar
from hanet_lab.topology import VM, Nic

WEB2 = {"host": "compute1", "nics": [{"network": "private", "mac": "fa:16:3e:00:00:03", "ip": "192.168.0.12"}]}
BOUND = "fa:16:3e:00:00:03 . 192.168.0.12"


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def bound(lab):
    out = lab.exec("compute1", "nft list table bridge hanet", check=True).stdout
    return BOUND in out.split("br100_dpairs", 1)[1].split("}", 1)[0]


def apply(lab, tgt):
    res = lab.salt(tgt, "state.apply", ["hanet"], timeout=240)
    bad = {m: [k for k, v in r.items() if v["result"] is False] for m, r in res.items() if isinstance(r, dict)}
    want = set(lab.topology.hosts) if tgt == "*" else ({tgt} if isinstance(tgt, str) else set(tgt))
    if set(res) != want or any(bad.values()):
        raise RuntimeError(f"state.apply failed: {res}")


def trial_watch(lab):
    lab.unplug_vm("web2")
    time.sleep(0.5)
    t0 = time.monotonic()
    lab.plug_vm("web2")
    t_bound = None
    while time.monotonic() - t0 < 5:
        if bound(lab):
            t_bound = time.monotonic() - t0
            break
        time.sleep(0.002)
    lab.dhcp("web2", "udhcpc")
    return t_bound


def trial_watch_lease(lab):
    lab.unplug_vm("web2")
    time.sleep(0.5)
    t0 = time.monotonic()
    lab.plug_vm("web2")
    lab.dhcp("web2", "udhcpc")
    return time.monotonic() - t0


def trial_apply(lab):
    lab.unplug_vm("web2")
    time.sleep(0.5)
    t0 = time.monotonic()
    lab.plug_vm("web2")
    apply(lab, "compute1")
    lab.dhcp("web2", "udhcpc")
    return time.monotonic() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(prog="./dev bench plug", description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=10)
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench plug: needs root (the namespace lab)", file=sys.stderr)
        return 2
    t = default_topology(hosts=2)
    t.vms["web2"] = VM(name="web2", host="compute1", nics=[Nic(bridge="br100", mac=WEB2["nics"][0]["mac"])])
    t.validate()
    lab = None
    rows = {"plug -> bound (port watch)": [], "plug -> lease (port watch)": [], "plug -> lease (apply after plug)": []}
    try:
        lab = Lab(t, progress=lambda m: None).up()
        log(f"lab {lab.prefix} up")
        p = lab_pillar(lab.topology)
        p["hanet"]["instances"]["web2"] = copy.deepcopy(WEB2)
        lab.set_pillar(p)
        apply(lab, "*")
        for i in range(args.trials):
            b = trial_watch(lab)
            rows["plug -> bound (port watch)"].append(b)
            rows["plug -> lease (port watch)"].append(trial_watch_lease(lab))
            rows["plug -> lease (apply after plug)"].append(trial_apply(lab))
            log(
                f"trial {i + 1}: bound {b if b is None else round(b, 4)} s; lease "
                f"{rows['plug -> lease (port watch)'][-1]:.3f} s (watch) vs "
                f"{rows['plug -> lease (apply after plug)'][-1]:.3f} s (apply)"
            )
    except (Exception, KeyboardInterrupt) as err:  # noqa: BLE001 - report, clean up, exit non-zero
        log(f"benchmark aborted: {err!r}")
        traceback.print_exc()
        return 1
    finally:
        if lab is not None:
            lab.down()
    print(f"\nVM port binding at plug time, {args.trials} trials, {os.cpu_count()} CPUs (seconds)\n")
    print("| measure | p50 | min | max |")
    print("|---|---|---|---|")
    for name, vals in rows.items():
        got = [v for v in vals if v is not None]
        missing = len(vals) - len(got)
        if not got:
            print(f"| {name} | - | - | - |")
            continue
        extra = f" ({missing} never)" if missing else ""
        print(f"| {name}{extra} | {statistics.median(got):.4f} | {min(got):.4f} | {max(got):.4f} |")
    w, a = rows["plug -> lease (port watch)"], rows["plug -> lease (apply after plug)"]
    print(f"\nlease after plug, port watch / apply after plug: {statistics.median(w) / statistics.median(a):.2f}x")
    return 0 if all(v is not None for v in rows["plug -> bound (port watch)"]) else 1


if __name__ == "__main__":
    sys.exit(main())
