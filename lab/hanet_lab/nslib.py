"""Network namespace plumbing for the lab, on pyroute2 (no `ip` for links/addresses).

Everything here takes namespace *names* (files under /var/run/netns). Links are
created directly inside their namespaces: a veth is added in one namespace with its
peer placed in another (``peer={'net_ns_fd': other}``), so nothing ever appears in
the machine's root namespace.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from contextlib import contextmanager
from typing import Iterable, Optional

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

NETNS_DIR = "/var/run/netns"


def ns_exists(name: str) -> bool:
    return os.path.exists(os.path.join(NETNS_DIR, name))


def ns_list() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def ns_create(name: str) -> None:
    if ns_exists(name):
        raise FileExistsError(f"network namespace {name} exists")
    netns.create(name)


def ns_remove(name: str) -> None:
    """Unmount and unlink the namespace file (the namespace dies with its last process)."""
    path = os.path.join(NETNS_DIR, name)
    if not os.path.lexists(path):
        return
    try:
        netns.remove(name)
    except FileNotFoundError:
        pass
    if os.path.lexists(path):  # a stale file whose mount is already gone
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def ns_inode(name: str) -> Optional[tuple[int, int]]:
    """(st_dev, st_ino) of the namespace, comparable with /proc/<pid>/ns/net."""
    try:
        st = os.stat(os.path.join(NETNS_DIR, name))
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def pid_netns(pid: int) -> Optional[tuple[int, int]]:
    try:
        st = os.stat(f"/proc/{pid}/ns/net")
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def pids_in(inodes: Iterable[tuple[int, int]], cmdline_marks: Iterable[str] = ()) -> list[int]:
    """Processes whose network namespace is one of ``inodes`` or whose command line
    contains one of ``cmdline_marks`` (never this process)."""
    inodes = {i for i in inodes if i}
    marks = [m for m in cmdline_marks if m]
    me = os.getpid()
    found = []
    for pid in _all_pids():
        if pid == me:
            continue
        if pid_netns(pid) in inodes:
            found.append(pid)
        elif marks:
            cl = cmdline(pid)
            if any(m in cl for m in marks):
                found.append(pid)
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return False


def kill_all(find, grace: float = 2.0, reap=None) -> list[int]:
    """Kill every process ``find()`` returns: SIGTERM, wait up to ``grace`` s, then
    SIGKILL until ``find()`` returns nothing alive. ``reap()`` collects our own
    children. Returns the pids that were signalled."""
    signalled = set()

    def send(sig):
        pids = [p for p in find() if _alive(p)]
        for p in pids:
            try:
                os.kill(p, sig)
                signalled.add(p)
            except ProcessLookupError:
                pass
        return pids

    if send(signal.SIGTERM):
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if reap:
                reap()
            if not any(_alive(p) for p in find()):
                break
            time.sleep(0.05)
    for _ in range(100):  # processes may fork while we kill: repeat until none is left
        if reap:
            reap()
        if not send(signal.SIGKILL):
            break
        time.sleep(0.05)
    if reap:
        reap()
    return sorted(signalled)


def pid_start_time(pid: int) -> Optional[int]:
    """The process's start time in clock ticks since boot (identifies it across pid reuse)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


# --- links -----------------------------------------------------------------------------


@contextmanager
def ipr(ns: str):
    """IPRoute bound to the existing namespace ``ns`` (never creates one)."""
    if not ns_exists(ns):
        raise FileNotFoundError(f"no network namespace {ns}")
    with IPRoute(netns=ns, flags=0) as ip:
        yield ip


def _index(ip: IPRoute, ifname: str) -> int:
    idx = ip.link_lookup(ifname=ifname)
    if not idx:
        raise LookupError(f"no link {ifname}")
    return idx[0]


def link_names(ns: str) -> list[str]:
    with ipr(ns) as ip:
        return sorted(link.get_attr("IFLA_IFNAME") for link in ip.get_links())


def has_link(ns: str, ifname: str) -> bool:
    with ipr(ns) as ip:
        return bool(ip.link_lookup(ifname=ifname))


def lo_up(ns: str) -> None:
    with ipr(ns) as ip:
        ip.link("set", index=_index(ip, "lo"), state="up")


def add_bridge(ns: str, name: str, up: bool = True) -> None:
    """A plain Linux bridge: STP off, forward delay 0, no multicast snooping (a dumb switch)."""
    with ipr(ns) as ip:
        ip.link("add", ifname=name, kind="bridge", br_stp_state=0, br_forward_delay=0, br_mcast_snooping=0)
        if up:
            ip.link("set", index=_index(ip, name), state="up")


def add_veth(
    ns: str,
    ifname: str,
    peer_ns: str,
    peer_ifname: str,
    mac: Optional[str] = None,
    peer_mac: Optional[str] = None,
    mtu: Optional[int] = None,
    up: bool = True,
    peer_master: Optional[str] = None,
    peer_alias: Optional[str] = None,
) -> None:
    """A veth pair created inside ``ns`` with its peer moved into ``peer_ns`` at creation.

    ``peer_master``: enslave the peer to that bridge in ``peer_ns`` and bring it up."""
    if not ns_exists(peer_ns):
        raise FileNotFoundError(f"no network namespace {peer_ns}")
    peer = {"ifname": peer_ifname, "net_ns_fd": peer_ns}
    if peer_mac:
        peer["address"] = peer_mac
    if mtu:
        peer["mtu"] = mtu
    kw = {}
    if mac:
        kw["address"] = mac
    if mtu:
        kw["mtu"] = mtu
    with ipr(ns) as ip:
        ip.link("add", ifname=ifname, kind="veth", peer=peer, **kw)
        if up:
            ip.link("set", index=_index(ip, ifname), state="up")
    with ipr(peer_ns) as ip:
        idx = _index(ip, peer_ifname)
        if peer_alias:
            ip.link("set", index=idx, ifalias=peer_alias)
        if peer_master:
            ip.link("set", index=idx, master=_index(ip, peer_master))
        if up or peer_master:
            ip.link("set", index=idx, state="up")


def del_link(ns: str, ifname: str) -> bool:
    with ipr(ns) as ip:
        idx = ip.link_lookup(ifname=ifname)
        if not idx:
            return False
        ip.link("del", index=idx[0])
        return True


def move_link(ns: str, ifname: str, to_ns: str) -> None:
    """Move ``ifname`` from ``ns`` into ``to_ns`` (it arrives down, without a master)."""
    if not ns_exists(to_ns):
        raise FileNotFoundError(f"no network namespace {to_ns}")
    with ipr(ns) as ip:
        ip.link("set", index=_index(ip, ifname), net_ns_fd=to_ns)


def set_master(ns: str, ifname: str, bridge: str, up: bool = True) -> None:
    with ipr(ns) as ip:
        idx = _index(ip, ifname)
        ip.link("set", index=idx, master=_index(ip, bridge))
        if up:
            ip.link("set", index=idx, state="up")


def add_address(ns: str, ifname: str, cidr: str) -> None:
    addr, plen = cidr.split("/")
    with ipr(ns) as ip:
        try:
            ip.addr("add", index=_index(ip, ifname), address=addr, prefixlen=int(plen))
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise


def add_route(ns: str, dst: str, gateway: str) -> None:
    kw = {"gateway": gateway}
    if dst not in ("default", "0.0.0.0/0"):
        kw["dst"] = dst
    else:
        kw["dst"] = "0.0.0.0/0"
    with ipr(ns) as ip:
        try:
            ip.route("add", **kw)
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise


def link_mac(ns: str, ifname: str) -> str:
    with ipr(ns) as ip:
        return ip.get_links(_index(ip, ifname))[0].get_attr("IFLA_ADDRESS")


def addresses(ns: str, ifname: Optional[str] = None) -> list[str]:
    """IPv4 addresses (a.b.c.d/len) in ``ns``, optionally only on ``ifname``."""
    with ipr(ns) as ip:
        kw = {"family": 2}
        if ifname:
            kw["index"] = _index(ip, ifname)
        return [f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}" for a in ip.get_addr(**kw)]


def neighbours(ns: str) -> dict[str, dict]:
    """IPv4 ARP cache: ip -> {mac, state, ifname}."""
    from pyroute2.netlink.rtnl.ndmsg import states

    names_of_state = {v: k for k, v in states.items()}
    with ipr(ns) as ip:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ip.get_links()}
        out = {}
        for n in ip.get_neighbours(family=2):
            dst = n.get_attr("NDA_DST")
            if not dst:
                continue
            out[dst] = {
                "mac": n.get_attr("NDA_LLADDR"),
                "state": names_of_state.get(n["state"], str(n["state"])),
                "ifname": names.get(n["ifindex"]),
            }
        return out


def sysctl(ns: str, key: str, value) -> None:
    """Write a sysctl as seen from inside ``ns`` (net.* sysctls are per namespace)."""
    subprocess.run(
        ["ip", "netns", "exec", ns, "sysctl", "-qw", f"{key}={value}"], check=True, stdout=subprocess.DEVNULL
    )
