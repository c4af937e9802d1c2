"""``hanet_lab demo``: a guided tour for a newcomer. Builds a lab, shows what is where,
asks every minion (through the real master) what it sees, shows hanet's desired state
per host when hanet.desired is available, then tears everything down."""
from __future__ import annotations

import json
import textwrap
import time

from .lab import Lab, LabError
from .pillar import lab_pillar
from .topology import default_topology

WIDTH = 78


def section(n: int, title: str, text: str = "") -> None:
    print()
    print("=" * WIDTH)
    print(f" {n}. {title}")
    print("=" * WIDTH)
    if text:
        print(textwrap.fill(textwrap.dedent(text).strip(), WIDTH))
        print()


def _short_error(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else text[:200]


def _print_desired(host: str, d) -> None:
    print(f"--- {host}")
    if not isinstance(d, dict):
        print(f"    (no answer: {_short_error(d)})")
        return
    if "error" in d:
        print("    pillar error: " + _short_error(d["error"]))
        return
    for key, value in d.items():
        if isinstance(value, (list, tuple)):
            print(f"    {key}: {len(value)} item(s)")
            for item in value[:6]:
                print("      - " + _one_line(item))
            if len(value) > 6:
                print(f"      ... {len(value) - 6} more")
        elif isinstance(value, dict):
            print(f"    {key}:")
            for k, v in list(value.items())[:8]:
                print(f"      {k}: {_one_line(v)}")
            if len(value) > 8:
                print(f"      ... {len(value) - 8} more")
        else:
            print(f"    {key}: {value}")


def _one_line(v) -> str:
    s = json.dumps(v, default=str, separators=(", ", ": ")) if not isinstance(v, str) else v
    return s if len(s) <= 100 else s[:97] + "..."


def run_demo(hosts: int = 4, pause: bool = False) -> int:
    hosts = max(hosts, 3)

    def wait():
        if pause:
            input("\n[Enter] to continue ")

    t0 = time.monotonic()
    section(1, "What this is", """
        hanet turns Salt minions into nova-network style hosts: bridges, dnsmasq DHCP,
        NAT and failover. To try it without real machines, this lab builds a small cluster
        out of Linux network namespaces on this one machine: a 'switch' namespace holding
        one bridge per network segment, a salt-master, several hosts each running a real
        salt-minion, an upstream router, and VMs (namespaces with a veth plugged into a
        bridge on their host). Nothing touches the machine's own interfaces, and
        everything is removed at the end.""")
    topo = default_topology(hosts=hosts)
    lab = Lab(topo, progress=lambda m: print(f"  .. {m}", flush=True))
    print(f"Building lab {lab.prefix} ({hosts} hosts + master + router + {len(topo.vms)} VMs)...")
    try:
        with lab:
            section(2, "The topology", """
                Each line below is one network namespace. Hosts are named like the minion ids
                in hanet's example pillar; their interfaces (mgmt0, eth0..eth4) are veths whose
                other end sits in a bridge of the switch namespace, one bridge per segment.""")
            print(lab.describe())
            print()
            t = lab.timings
            print(f"Up in {t['up']:.1f} s (network {t['network']:.1f} s, minions answering "
                  f"{t.get('minions_ping', 0):.1f} s, saltutil.sync_all done {t.get('sync_all', 0):.1f} s).")
            wait()

            section(3, "Every minion is a whole host", """
                The master (in its own namespace) runs hanet.links on every minion. Each minion
                runs inside its host's namespace, so it sees that host's links only: not the
                other hosts', not the switch's bridges, not this machine's real interfaces.""")
            print("$ salt '*' hanet.links")
            links = lab.salt("*", "hanet.links")
            for host in sorted(links):
                print(f"  {host:<10} {' '.join(links[host]) if isinstance(links[host], list) else links[host]}")
            missing = sorted(set(topo.hosts) - set(links))
            if missing:
                print(f"  (no answer from {missing})")
            wait()

            section(4, "The upstream router", """
                The router sits on the public segment (203.0.113.1) and runs a tiny web server;
                GET /whoami answers the source address it saw, which is how tests check SNAT.""")
            ok = lab.ping("compute1", "203.0.113.1")
            print(f"  compute1 pings 203.0.113.1: {'yes' if ok else 'NO'}")
            try:
                print(f"  compute1: GET http://203.0.113.1/whoami -> {lab.http_get('compute1', 'http://203.0.113.1/whoami').strip()}")
            except LabError as e:
                print(f"  GET failed: {e}")
            arp = lab.arp_cache("router")
            for ip, n in sorted(arp.items()):
                print(f"  router's ARP cache: {ip} is at {n['mac']} ({n['state']}, {n['ifname']})")
            wait()

            section(5, "What hanet wants on each host", """
                The lab now serves a pillar that matches its own interface names (the contract's
                example pillar, with a flat hardware-gateway network instead of VLANs, which this
                kernel lacks). hanet.desired computes, from the pillar alone, what each host
                should hold; nothing is changed on the hosts yet.""")
            funcs = lab.functions("hanet")
            print(f"  hanet functions on the minions: {', '.join(funcs) or 'none'}")
            if "hanet.desired" not in funcs:
                print("  hanet.desired is not there yet: skipping this section.")
            else:
                pillar = lab_pillar(topo)
                nets = pillar["hanet"]["networks"]
                print("  networks in the lab pillar:")
                for name, n in nets.items():
                    who = ("every host that lists it (multi_host)" if n.get("multi_host")
                           else f"network hosts {n.get('network_hosts')}")
                    print(f"    {name:<8} {n['cidr']:<16} {n['bridge']} on {n['bridge_interface']}, "
                          f"gateway {n['gateway']} ({n.get('gateway_mode', 'host')}), served by {who}")
                print("  instances: " + ", ".join(
                    f"{i} on {v['host']}" for i, v in pillar["hanet"]["instances"].items()))
                lab.set_pillar(pillar)
                print()
                print("$ salt '*' hanet.desired")
                desired = lab.salt("*", "hanet.desired", timeout=60)
                for host in sorted(topo.hosts):
                    _print_desired(host, desired.get(host, "no answer"))
            wait()

            section(6, "Tear down", """
                Leaving the 'with Lab(...)' block kills every process living in the lab's
                namespaces (salt, dnsmasq, DHCP clients, web servers), deletes the namespaces
                and the run directory. The same happens on an exception, on SIGINT/SIGTERM,
                and 'hanet_lab down --stale' sweeps what a SIGKILLed run left.""")
    finally:
        if "down" in lab.timings:
            print(f"  lab {lab.prefix} removed in {lab.timings['down']:.1f} s; "
                  f"whole demo {time.monotonic() - t0:.1f} s")
    return 0
