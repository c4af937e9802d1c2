"""hanet_lab command line: ``python -m hanet_lab <command>`` (``./dev lab <command>``).

up [--hosts N | --topology FILE] [--masters N] [--etcd N] [--no-salt] [--no-sync] [--no-vms]
                                               build a lab, leave it running
down [--prefix P ...] [--stale | --all]        tear down labs (default: every recorded lab)
status [--json]                                labs on this machine, their nodes and processes
exec [--prefix P] NODE -- CMD...               run a command in a node's namespace
salt [--prefix P] TGT FUN [ARG|KEY=VALUE ...]  an execution function through the master
run [--prefix P] FUN [ARG|KEY=VALUE ...]       a runner on the master
pillar [--prefix P] FILE                       serve FILE (YAML) as the minions' pillar
plug [--prefix P] VM [--host HOST]             plug a VM into its bridge (the bridge must exist)
dhcp [--prefix P] VM [--client dhclient|udhcpc]  run a DHCP client once in a VM
topology [--hosts N]                           print the default topology as YAML
demo [--hosts N] [--step] [--keep]             a guided tour, then tear down (--keep: leave it up)
measure [--runs N] [--hosts N]                 time up/down, measure daemon PSS
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from . import nslib, state
from .lab import Lab, LabError
from .topology import Topology, default_topology


def _progress(msg: str) -> None:
    print(f"  .. {msg}", flush=True)


def _topology(args) -> Topology:
    if getattr(args, "topology", None):
        return Topology.from_yaml(args.topology)
    return default_topology(
        hosts=args.hosts,
        vms=not getattr(args, "no_vms", False),
        masters=getattr(args, "masters", 1),
        etcd=getattr(args, "etcd", 0),
    )


def _parse_args(items):
    """'a', 'k=v' -> (['a'], {'k': v}); values are YAML-parsed like the salt CLI does."""
    import yaml

    arg, kwarg = [], {}
    for it in items:
        if "=" in it and not it.startswith("=") and it.split("=", 1)[0].isidentifier():
            k, v = it.split("=", 1)
            kwarg[k] = yaml.safe_load(v) if v else ""
        else:
            arg.append(yaml.safe_load(it) if it else it)
    return arg, kwarg


def _dump(obj) -> None:
    import yaml

    print(yaml.safe_dump(obj, default_flow_style=False, sort_keys=False, width=120).rstrip())


def cmd_up(args) -> int:
    lab = Lab(_topology(args), salt=not args.no_salt, sync=not args.no_sync, progress=_progress)
    print(f"hanet lab: building {lab.prefix}", flush=True)
    lab.up()
    lab.detach()
    print()
    print(lab.describe())
    print()
    print(f"state: {state.state_path(lab.prefix)}")
    print(f"up in {lab.timings.get('up', 0):.1f} s; timings: {lab.timings}")
    print("next:  ./dev lab exec compute1 -- ip -br addr")
    print("       ./dev lab salt '*' hanet.links")
    print(f"       ./dev lab down --prefix {lab.prefix}")
    return 0


def cmd_down(args) -> int:
    t0 = time.monotonic()
    if args.prefix:
        results = [state.destroy(p) for p in args.prefix]
    elif args.all:
        results = state.sweep("all")
    elif args.stale:
        results = state.sweep("stale")
    else:
        results = state.sweep("recorded") + state.sweep("stale")
    for r in results:
        print(
            f"removed {r['prefix']}: {len(r['namespaces'])} namespaces, "
            f"{len(r['killed'])} processes, {r['seconds']:.2f} s"
        )
    if not results:
        print("no lab to remove")
    print(f"down in {time.monotonic() - t0:.2f} s")
    return 0


def _status() -> list[dict]:
    out = []
    for prefix in state.all_prefixes():
        st = state.read_state(prefix)
        entry = {"prefix": prefix, "recorded": st is not None}
        if st:
            owner = st.get("owner_pid")
            entry.update(
                {
                    "owner": "detached" if owner is None else owner,
                    "owner_alive": state.owner_alive(st),
                    "up": st.get("up"),
                    "age_s": round(time.time() - st.get("created", time.time())),
                    "rundir": st.get("rundir"),
                }
            )
            nodes = {}
            for node, ns in (st.get("namespaces") or {}).items():
                ino = nslib.ns_inode(ns)
                procs = [nslib.cmdline(p)[:200] for p in nslib.pids_in([ino])] if ino else []
                nodes[node] = {"namespace": ns, "exists": ino is not None, "processes": procs}
            entry["nodes"] = nodes
        else:
            entry["namespaces"] = state.namespaces_of(prefix)
        out.append(entry)
    return out


def _short(cl: str) -> str:
    """A process's short name: the program (or the script/module a python runs)."""
    words = cl.split()
    for i, w in enumerate(words):
        base = os.path.basename(w)
        if w == "-m" and i + 1 < len(words):
            return words[i + 1]
        if w == "-c":
            return "python -c"
        if w.startswith("-") or base.startswith("python") or base in ("ip", "sh", "env"):
            continue
        return base
    return os.path.basename(words[0]) if words else "?"


def _summarize(cmdlines) -> str:
    counts = {}
    for cl in cmdlines:
        name = _short(cl)
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{n} x{c}" if c > 1 else n for n, c in counts.items())


def cmd_status(args) -> int:
    labs = _status()
    if args.json:
        print(json.dumps(labs, indent=1))
        return 0
    if not labs:
        print("no lab on this machine")
    for lab in labs:
        if not lab["recorded"]:
            print(f"{lab['prefix']}: LEFTOVER (no state file): {lab['namespaces']} -> `down --stale`")
            continue
        owner = lab["owner"]
        stale = "" if lab["owner_alive"] else "  STALE (owner gone) -> `down --stale`"
        print(
            f"{lab['prefix']}: owner {owner}, {'up' if lab['up'] else 'not up'}, "
            f"{lab['age_s']} s old, {lab['rundir']}{stale}"
        )
        for node, info in lab["nodes"].items():
            mark = "" if info["exists"] else "  (namespace missing)"
            procs = _summarize(info["processes"]) or "-"
            print(f"  {node:<10} {info['namespace']:<22} {procs}{mark}")
    return 0


def cmd_exec(args) -> int:
    lab = Lab.attach(args.prefix)
    cmd = args.cmd[1:] if args.cmd and args.cmd[0] == "--" else args.cmd
    if not cmd:
        cmd = [os.environ.get("SHELL", "/bin/sh")]
    os.execvp("ip", ["ip", "netns", "exec", lab.ns(args.node)] + cmd)
    return 127


def cmd_salt(args) -> int:
    lab = Lab.attach(args.prefix)
    arg, kwarg = _parse_args(args.args)
    _dump(lab.salt(args.tgt, args.fun, arg, kwarg, timeout=args.timeout))
    return 0


def cmd_run(args) -> int:
    lab = Lab.attach(args.prefix)
    arg, kwarg = _parse_args(args.args)
    _dump(lab.salt_run(args.fun, arg, kwarg, timeout=args.timeout))
    return 0


def cmd_pillar(args) -> int:
    lab = Lab.attach(args.prefix)
    lab.set_pillar(args.file)
    print(f"pillar set from {args.file} and refreshed on every minion")
    return 0


def cmd_plug(args) -> int:
    lab = Lab.attach(args.prefix)
    taps = lab.plug_vm(args.vm, host=args.host)
    print(f"{args.vm} plugged: {', '.join(taps)}")
    return 0


def cmd_dhcp(args) -> int:
    lab = Lab.attach(args.prefix)
    _dump(lab.dhcp(args.vm, client=args.client, ifname=args.ifname))
    return 0


def cmd_topology(args) -> int:
    print(_topology(args).to_yaml().rstrip())
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(hosts=args.hosts, pause=args.pause, keep=args.keep)


def cmd_measure(args) -> int:
    from .measure import measure

    measure(runs=args.runs, hosts=args.hosts)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="hanet_lab",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    sub = p.add_subparsers(dest="command", required=True)

    def topo_opts(sp):
        sp.add_argument("--hosts", type=int, default=4, help="hosts in the default topology (default 4)")
        sp.add_argument("--topology", help="a topology YAML file instead of the default")
        sp.add_argument("--no-vms", action="store_true", help="default topology without VMs")
        sp.add_argument(
            "--masters", type=int, default=1, help="salt masters (default 1; 2: hot multi-master, every minion on both)"
        )
        sp.add_argument(
            "--etcd",
            type=int,
            default=0,
            help="etcd members, each in its own namespace (default 0: the file record; "
            "3: the masters keep the failover record in etcd)",
        )

    def prefix_opt(sp):
        sp.add_argument("--prefix", help="the lab (default: the only one running)")

    sp = sub.add_parser("up", help="build a lab and leave it running")
    topo_opts(sp)
    sp.add_argument("--no-salt", action="store_true", help="namespaces only: no master, no minions")
    sp.add_argument("--no-sync", action="store_true", help="skip saltutil.sync_all")
    sp.set_defaults(func=cmd_up)

    sp = sub.add_parser("down", help="tear labs down")
    sp.add_argument("--prefix", action="append", help="only this lab (repeatable)")
    g = sp.add_mutually_exclusive_group()
    g.add_argument(
        "--stale", action="store_true", help="only labs whose owner process died and leftovers without a state file"
    )
    g.add_argument(
        "--all",
        action="store_true",
        help="everything carrying a lab prefix (hl-xxxxxx-), recorded or not, running or not",
    )
    sp.set_defaults(func=cmd_down)

    sp = sub.add_parser("status", help="labs on this machine")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_status)

    sp = sub.add_parser("exec", help="run a command in a node's namespace")
    prefix_opt(sp)
    sp.add_argument("node")
    sp.add_argument("cmd", nargs=argparse.REMAINDER)
    sp.set_defaults(func=cmd_exec)

    sp = sub.add_parser("salt", help="run an execution function through the master")
    prefix_opt(sp)
    sp.add_argument("--timeout", type=float, default=60)
    sp.add_argument("tgt")
    sp.add_argument("fun")
    sp.add_argument("args", nargs="*")
    sp.set_defaults(func=cmd_salt)

    sp = sub.add_parser("run", help="run a runner on the master")
    prefix_opt(sp)
    sp.add_argument("--timeout", type=float, default=120)
    sp.add_argument("fun")
    sp.add_argument("args", nargs="*")
    sp.set_defaults(func=cmd_run)

    sp = sub.add_parser("pillar", help="serve a YAML file as the pillar")
    prefix_opt(sp)
    sp.add_argument("file")
    sp.set_defaults(func=cmd_pillar)

    sp = sub.add_parser("plug", help="plug a VM into its bridge")
    prefix_opt(sp)
    sp.add_argument("vm")
    sp.add_argument("--host")
    sp.set_defaults(func=cmd_plug)

    sp = sub.add_parser("dhcp", help="run a DHCP client once in a VM")
    prefix_opt(sp)
    sp.add_argument("vm")
    sp.add_argument("--client", default="dhclient", choices=["dhclient", "udhcpc"])
    sp.add_argument("--ifname", default="eth0")
    sp.set_defaults(func=cmd_dhcp)

    sp = sub.add_parser("topology", help="print the default topology as YAML")
    topo_opts(sp)
    sp.set_defaults(func=cmd_topology)

    sp = sub.add_parser("demo", help="a guided tour of the lab and hanet, then tear down")
    sp.add_argument("--hosts", type=int, default=4)
    sp.add_argument("--pause", "--step", action="store_true", help="wait for Enter between sections")
    sp.add_argument(
        "--keep",
        action="store_true",
        help="leave the lab up at the end (poke around with ./dev lab exec; remove it with ./dev lab down)",
    )
    sp.set_defaults(func=cmd_demo)

    sp = sub.add_parser("measure", help="time up/down and measure daemon memory (PSS)")
    sp.add_argument("--runs", type=int, default=3)
    sp.add_argument("--hosts", type=int, default=4)
    sp.set_defaults(func=cmd_measure)

    args = p.parse_args(argv)
    if os.geteuid() != 0 and args.command not in ("topology",):
        print("hanet_lab: needs root (network namespaces, netlink)", file=sys.stderr)
        return 1
    try:
        return args.func(args)
    except LabError as e:
        print(f"hanet_lab: {e}", file=sys.stderr)
        return 1
