"""Floating IPs on this host: each as /32 on its public interface, announced with
gratuitous ARP when bound; when unbound (removed or moved), the address goes and so do
its conntrack entries, so that no flow keeps using the old host's NAT.

The NAT for floating IPs (DNAT in, SNAT out, hairpin) is part of the ruleset; this
facet holds the addresses.
"""

from __future__ import annotations

import os
import socket
import subprocess

from .common import Change

FACET = "floating"


def current(managed_names, desired, ipr=None):
    """{address: interface} for the /32s on public interfaces that hanet bound (named
    in the managed record) or that the desired state (FloatingIp tuple) names."""
    from pyroute2 import IPRoute

    own = ipr is None
    ipr = ipr or IPRoute()
    try:
        wanted = {f.address for f in desired}
        names = {}
        for link in ipr.get_links():
            names[link["index"]] = link.get_attr("IFLA_IFNAME")
        out = {}
        for a in ipr.get_addr(family=2):
            ifname = names.get(a["index"])
            addr = a.get_attr("IFA_ADDRESS")
            if a["prefixlen"] == 32 and (addr in managed_names or addr in wanted):
                out[addr] = ifname
        return out
    finally:
        if own:
            ipr.close()


def plan(desired, current):
    """``desired``: FloatingIp tuple; ``current``: {address: interface}. Pure."""
    want = {f.address: f.public_interface for f in desired}
    changes = []
    for addr in sorted(set(current) - set(want)):
        changes.append(Change(FACET, "unbind", addr, {"interface": current[addr]}))
    for addr in sorted(want):
        if current.get(addr) == want[addr]:
            continue
        if addr in current:  # on the wrong interface
            changes.append(Change(FACET, "unbind", addr, {"interface": current[addr]}))
        changes.append(Change(FACET, "bind", addr, {"interface": want[addr]}))
    return changes


def flush_conntrack(address):
    """Drop conntrack entries that NAT to or from ``address`` (ignores 'no entries').

    This also runs in threads of the minion's running process (the beacon's warm
    relinquish, the fence), which Salt forks every job from. A child started the usual
    way leaves a pipe (exec status, output) whose write end a job forked at that moment
    inherits and keeps: the thread then waits for that pipe's end as long as the job
    lives, holding the takeover slot the job is waiting for (seen: a deadlock). So the
    child is started with posix_spawn (an absolute path, no pipe: its output goes to
    /dev/null) and only waited for."""
    import shutil

    exe = shutil.which("conntrack") or "/usr/sbin/conntrack"
    for args in (["-D", "--orig-dst", address], ["-D", "--reply-dst", address]):
        try:
            subprocess.run(
                [exe, *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                close_fds=False,
                timeout=10,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return  # no conntrack tool, or it hangs: the entries time out on their own


def apply(changes, managed, garp_count=0):
    """Bind and unbind floating IPs (``plan``'s changes), all addresses in one netlink
    batch (``addrbatch``: 1,000 in milliseconds, where one request at a time took 0.6 s),
    then the unbound addresses' conntrack entries. The managed record follows what was
    done, also when a later address fails."""
    import errno

    from . import addrbatch, arp

    if not changes:
        return []
    index = {}  # if_nametoindex: a link dump parsed by pyroute2 took 5-25 ms
    for name in sorted({ch.detail["interface"] for ch in changes}):
        try:
            index[name] = socket.if_nametoindex(name)
        except OSError:
            raise RuntimeError(f"public interface {name} does not exist") from None
    ops = [("add" if ch.action == "bind" else "del", index[ch.detail["interface"]], ch.target, 32) for ch in changes]
    done, bound, gone = [], [], []
    names = managed.get(FACET)
    try:
        codes = addrbatch.change(ops)
        failed = []
        for ch, code in zip(changes, codes):
            if ch.action == "bind":
                if code not in (0, errno.EEXIST):
                    failed.append(f"bind {ch.target} on {ch.detail['interface']}: {os.strerror(code)}")
                    continue
                names.add(ch.target)
                bound.append(ch)
            else:
                if code not in (0, errno.EADDRNOTAVAIL, errno.ENODEV):
                    failed.append(f"unbind {ch.target} on {ch.detail['interface']}: {os.strerror(code)}")
                    continue
                names.discard(ch.target)
                gone.append(ch.target)
            done.append(f"{ch.action} {ch.target} on {ch.detail['interface']}")
    finally:
        managed.set(FACET, names)
    for address in gone:  # once every address is silent: flows through them end
        flush_conntrack(address)
    if garp_count and bound:
        # every address's first announcement before any repeat, in one send per round:
        # one arp.garp() per address, each with its own rounds, scales with the count
        # (docs/floating-ips.md); also when another address failed (the next apply sees
        # these bound and would never announce them)
        arp.garp_many([(ch.target, ch.detail["interface"]) for ch in bound], garp_count)
    if failed:
        raise RuntimeError("; ".join(failed))
    return done
