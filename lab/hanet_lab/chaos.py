"""Failures on demand, and traffic that measures them.

- ``power_off(lab, host)``: a host loses power: every link of its namespace goes down
  and every process in it is SIGKILLed (salt-minion, dnsmasq, metadata service).
- ``power_on(lab, host)``: it boots again: what a reboot loses is gone (hanet's bridges
  and VXLAN links, addresses, the ruleset, ``<root_dir>/run``), its physical links come
  up with their configured addresses and routes, and its salt-minion starts; its own
  start-up (hanet's ``startup_states``) decides what it holds.
- ``cut(lab, host, ifnames)`` / ``mend(...)``: one host's links go down / up (a broken
  cable on that host only).
- ``unplug(lab, host, ifnames)`` / ``replug(...)``: the switch ports of those links go
  down / up: the host sees its carrier go (its addresses and routes stay, as with a
  pulled cable or a dead switch port), and comes back as it was.
- ``block(lab, host, ifnames, spare=())`` / ``unblock(lab, host)``: the switch stops
  forwarding frames between those links of ``host`` and every other port of their
  segments, except the ports of the nodes named in ``spare``: a partition with the
  carrier up (nothing on the host notices but silence), possibly asymmetric (the
  host's uplink still reaches the router, not its peers).
- ``Pinger``: ``ping -D -i 0.01`` from one node to an address, recording every reply's
  timestamp; ``outage()`` is the longest silence between two replies.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time

from . import nslib


def _host(lab, host):
    node = lab.topology.hosts.get(host)
    if node is None:
        raise KeyError(f"no host {host!r} in lab {lab.prefix}")
    return node


def cut(lab, host, ifnames):
    ns = lab.ns(host)
    for ifname in ifnames:
        subprocess.run(["ip", "-n", ns, "link", "set", ifname, "down"], check=True)


def mend(lab, host, ifnames):
    ns = lab.ns(host)
    for ifname in ifnames:
        subprocess.run(["ip", "-n", ns, "link", "set", ifname, "up"], check=True)


def _ports(lab, host, ifnames):
    ports = lab.ports.get(host, {})
    missing = [i for i in ifnames if i not in ports]
    if missing:
        raise KeyError(f"{host} has no switch port for {missing}")
    return [ports[i] for i in ifnames]


def unplug(lab, host, ifnames):
    """The switch ports of ``host``'s ``ifnames`` go down: carrier lost on the host."""
    for port in _ports(lab, host, ifnames):
        subprocess.run(["ip", "-n", lab.switch_ns, "link", "set", port, "down"], check=True)


def replug(lab, host, ifnames):
    for port in _ports(lab, host, ifnames):
        subprocess.run(["ip", "-n", lab.switch_ns, "link", "set", port, "up"], check=True)


def _block_table(host):
    return "chaos_" + re.sub(r"[^A-Za-z0-9_]", "_", host)


def block(lab, host, ifnames, spare=()):
    """The switch drops every frame between ``host``'s ``ifnames`` and the other ports
    of their segments, but the ports of the nodes in ``spare`` (a bridge-family
    nftables table in the switch namespace; the carrier stays up)."""
    nodes = lab.topology.nodes()
    rules = []
    for ifname, port in zip(ifnames, _ports(lab, host, ifnames)):
        seg = nodes[host].links[ifname]
        others = [
            lab.ports[n][i]
            for n, node in sorted(nodes.items())
            if n != host and n not in spare
            for i, s in sorted(node.links.items())
            if s == seg and i in lab.ports.get(n, {})
        ]
        if not others:
            continue
        group = "{ " + ", ".join(f'"{o}"' for o in others) + " }"
        rules += [f'iifname "{port}" oifname {group} drop', f'iifname {group} oifname "{port}" drop']
    table = _block_table(host)
    text = (
        f"table bridge {table} {{\n chain forward {{\n  type filter hook forward priority -10; policy accept;\n"
        + "".join(f"  {r}\n" for r in rules)
        + " }\n}\n"
    )
    subprocess.run(["ip", "netns", "exec", lab.switch_ns, "nft", "-f", "-"], input=text, text=True, check=True)


def unblock(lab, host):
    subprocess.run(
        ["ip", "netns", "exec", lab.switch_ns, "nft", "delete", "table", "bridge", _block_table(host)],
        check=False,
        capture_output=True,
    )


def power_off(lab, host):
    """Links down and every process of the host killed, as in a power loss. Returns
    the time (epoch) it happened."""
    node = _host(lab, host)
    at = time.time()
    # Freeze first: with power gone nothing on the host runs while its links go down
    # one by one (a live VRRP daemon would see its link drop and hand over at once with
    # a priority-0 advert, which a host that lost power never sends).
    procs = [pid for plist in lab.processes(host).values() for pid, _ in plist]
    for pid in procs:
        try:
            os.kill(pid, signal.SIGSTOP)
        except OSError:
            pass
    cut(lab, host, list(node.links))
    for pid in procs + [pid for plist in lab.processes(host).values() for pid, _ in plist]:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    deadline = time.monotonic() + 5
    while any(lab.processes(host).values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    lab.reap()  # no zombie of ours left to look alive (lab.Lab.reap)
    return at


def _reboot_kernel_state(lab, host):
    """Forget what a reboot forgets: non-physical links, extra addresses, the ruleset."""
    node = _host(lab, host)
    ns = lab.ns(host)
    physical = set(node.links) | {"lo"}
    out = subprocess.run(["ip", "-n", ns, "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        name = line.split(":", 2)[1].strip().split("@")[0]
        if name not in physical:
            subprocess.run(["ip", "-n", ns, "link", "del", name], capture_output=True)
    for ifname in node.links:
        subprocess.run(["ip", "-n", ns, "addr", "flush", "dev", ifname], capture_output=True)
    subprocess.run(["ip", "netns", "exec", ns, "nft", "flush", "ruleset"], capture_output=True)
    for ifname, addrs in node.addresses.items():
        for a in addrs:
            nslib.add_address(ns, ifname, a)


def power_on(lab, host, wait=True, timeout=60):
    """Boot the host again (see the module docstring); with ``wait``, until its minion
    answers test.ping."""
    node = _host(lab, host)
    _reboot_kernel_state(lab, host)
    shutil.rmtree(os.path.join(lab.minion_root(host), "run"), ignore_errors=True)
    mend(lab, host, list(node.links))
    ns = lab.ns(host)
    if node.gateway:
        nslib.add_route(ns, "default", node.gateway)
    for r in node.routes:
        nslib.add_route(ns, r["dst"], r["via"])
    lab.start_minion(host)
    if not wait:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if lab.salt(host, "test.ping", timeout=3).get(host) is True:
                return
        except Exception:  # pylint: disable=broad-except
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{host}'s minion did not come back within {timeout} s")


def power_on_started(lab, host, timeout=120):
    """``power_on``, then wait until the host's start-up apply of hanet has run its
    last state (it fires ``hanet/prime``): a minion that answers is not yet a host
    whose bridges, ruleset and beacon are back."""
    with lab.events() as ev:
        power_on(lab, host)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = ev.wait("hanet/prime", timeout=max(0.1, deadline - time.monotonic()))
            if got is not None and (got.get("data") or {}).get("id") == host:
                return
    raise TimeoutError(f"{host}'s start-up apply did not end within {timeout} s")


# an echo reply ("64 bytes from ...: icmp_seq=N ttl=..."), not an ICMP error about the
# echo ("From 10.20.0.2 icmp_seq=N Destination Net Unreachable"), which ping prints with
# the same sequence number
_REPLY = re.compile(r"^\[(\d+\.\d+)\] \d+ bytes from .*icmp_seq=(\d+)")


class Pinger:
    """``ping -D -n -i <interval>`` from ``node`` to ``target``, replies recorded."""

    def __init__(self, lab, node, target, interval=0.01):
        self.lab, self.node, self.target, self.interval = lab, node, target, interval
        self.path = os.path.join(lab.rundir, f"ping-{node}-{target}-{os.getpid()}-{time.time_ns()}.log")
        self.proc = None
        self.started = None

    def start(self):
        fh = open(self.path, "wb")
        self.proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.lab.ns(self.node),
                "ping",
                "-D",
                "-n",
                "-i",
                str(self.interval),
                "-W",
                "1",
                self.target,
            ],
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        fh.close()
        self.started = time.time()
        return self

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self

    def replies(self):
        out = []
        with open(self.path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                m = _REPLY.match(line)
                if m:
                    out.append((float(m.group(1)), int(m.group(2))))
        return out

    def outage(self, after=None):
        """(longest gap between consecutive replies in seconds, when it began, lost
        probes), considering replies from ``after`` on (epoch) if given."""
        rs = self.replies()
        if after is not None:
            before = [r for r in rs if r[0] < after]
            rs = ([before[-1]] if before else []) + [r for r in rs if r[0] >= after]
        if len(rs) < 2:
            return None, None, None
        gaps = [(b[0] - a[0], a[0]) for a, b in zip(rs, rs[1:])]
        gap, began = max(gaps)
        seqs = [s for _, s in rs]
        lost = (max(seqs) - min(seqs) + 1) - len(set(seqs))
        return gap, began, lost

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
