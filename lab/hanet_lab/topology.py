"""The lab's topology: what namespaces exist and how they are wired.

A topology is plain data: segments (L2 broadcast domains, one bridge each in the
switch namespace), a salt master, hosts (salt minions), routers and VMs. It can be
built in Python (:func:`default_topology`, the dataclasses) or loaded from YAML::

    segments: [mgmt, public, seg-private]
    master: {name: master, links: {mgmt0: mgmt}, addresses: {mgmt0: 192.0.2.1/24}}
    hosts:
      compute1:
        links: {mgmt0: mgmt, eth0: public, eth1: seg-private}
        addresses: {mgmt0: 192.0.2.11/24, eth0: 203.0.113.11/24}
        gateway: 203.0.113.1            # default route (optional)
    routers:
      router:
        links: {eth0: public}
        addresses: {eth0: 203.0.113.1/24}
    vms:
      web1: {host: compute1, bridge: br100, mac: 'fa:16:3e:00:00:01'}
      # several NICs:  web2: {host: compute1, nics: [{bridge: br100, mac: ...}, {bridge: br200, mac: ...}]}
    # optional: more salt masters (hot multi-master: every minion signs in to all) and
    # etcd members (then every master keeps the failover record in etcd)
    extra_masters:
      master2: {links: {mgmt0: mgmt}, addresses: {mgmt0: 192.0.2.2/24}}
    etcd:
      etcd1: {links: {eth0: mgmt}, addresses: {eth0: 192.0.2.31/24}}

Addresses use documentation ranges: management 192.0.2.0/24, public 203.0.113.0/24,
the VXLAN underlay / trunk segment 198.51.100.0/24.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Optional

IFNAMSIZ = 15  # usable characters in a Linux interface name
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


class TopologyError(ValueError):
    """The topology description is inconsistent."""


def _addr_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


@dataclass
class Node:
    """A namespace wired to segments: ``links`` maps a local ifname to a segment."""

    name: str
    links: dict[str, str] = field(default_factory=dict)
    addresses: dict[str, list[str]] = field(default_factory=dict)
    gateway: Optional[str] = None  # default route
    routes: list[dict] = field(default_factory=list)  # [{dst: 10.0.0.0/8, via: 1.2.3.4}]
    macs: dict[str, str] = field(default_factory=dict)  # optional fixed MACs per ifname

    def __post_init__(self):
        self.links = dict(self.links or {})
        self.addresses = {k: _addr_list(v) for k, v in (self.addresses or {}).items()}
        self.routes = [dict(r) for r in (self.routes or [])]
        self.macs = {k: str(v).lower() for k, v in (self.macs or {}).items()}

    def first_address(self, ifname: str) -> Optional[str]:
        """The first address (no prefix length) on ``ifname``, or None."""
        addrs = self.addresses.get(ifname) or []
        return addrs[0].split("/")[0] if addrs else None


@dataclass
class Master(Node):
    name: str = "master"
    opts: dict = field(default_factory=dict)  # extra salt-master options


@dataclass
class Host(Node):
    """A salt minion: its name is the minion id."""

    opts: dict = field(default_factory=dict)  # extra salt-minion options (keep hanet-agnostic)


@dataclass
class Router(Node):
    """An upstream (and optionally hardware) router: forwarding on, HTTP on ``http_port``."""

    http_port: int = 80
    forwarding: bool = True


@dataclass
class Nic:
    bridge: str
    mac: str
    ifname: str = "eth0"
    mtu: Optional[int] = None

    def __post_init__(self):
        self.mac = str(self.mac).lower()


@dataclass
class VM:
    """A VM: a namespace whose NICs are veths plugged into bridges inside ``host``."""

    name: str
    host: str
    nics: list[Nic] = field(default_factory=list)

    def __post_init__(self):
        self.nics = [n if isinstance(n, Nic) else Nic(**n) for n in self.nics]
        for i, nic in enumerate(self.nics):
            if nic.ifname == "eth0" and i > 0 and any(n.ifname == "eth0" for n in self.nics[:i]):
                nic.ifname = f"eth{i}"

    @property
    def bridge(self) -> str:
        return self.nics[0].bridge

    @property
    def mac(self) -> str:
        return self.nics[0].mac

    def tap(self, index: int = 0) -> str:
        """The name of the host-side veth of NIC ``index`` (inside the host namespace)."""
        return f"tap-{self.name}" if index == 0 else f"tap-{self.name}-{index}"


@dataclass
class Topology:
    segments: list[str] = field(default_factory=list)
    master: Optional[Master] = None
    hosts: dict[str, Host] = field(default_factory=dict)
    routers: dict[str, Router] = field(default_factory=dict)
    vms: dict[str, VM] = field(default_factory=dict)
    extra_masters: dict[str, Master] = field(default_factory=dict)  # after ``master``, same config
    etcd: dict[str, Node] = field(default_factory=dict)  # etcd members (first address: client URL)

    # -- construction -------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict) -> "Topology":
        data = dict(data or {})
        unknown = set(data) - {"segments", "master", "hosts", "routers", "router", "vms", "extra_masters", "etcd"}
        if unknown:
            raise TopologyError(f"unknown topology keys: {sorted(unknown)}")
        master = data.get("master")
        if master is not None and not isinstance(master, Master):
            master = Master(**master)
        routers = {}
        if data.get("router"):
            r = data["router"]
            r = r if isinstance(r, Router) else Router(**{"name": "router", **r})
            routers[r.name] = r
        for name, r in (data.get("routers") or {}).items():
            routers[name] = r if isinstance(r, Router) else Router(**{"name": name, **(r or {})})
        hosts = {
            name: h if isinstance(h, Host) else Host(**{"name": name, **(h or {})})
            for name, h in (data.get("hosts") or {}).items()
        }
        vms = {}
        for name, v in (data.get("vms") or {}).items():
            if isinstance(v, VM):
                vms[name] = v
                continue
            v = dict(v)
            if "nics" not in v:
                v["nics"] = [{k: v.pop(k) for k in ("bridge", "mac", "mtu") if k in v}]
            vms[name] = VM(**{"name": name, **v})
        extra = {
            name: m if isinstance(m, Master) else Master(**{"name": name, **(m or {})})
            for name, m in (data.get("extra_masters") or {}).items()
        }
        etcd = {
            name: e if isinstance(e, Node) else Node(**{"name": name, **(e or {})})
            for name, e in (data.get("etcd") or {}).items()
        }
        topo = cls(
            segments=list(data.get("segments") or []),
            master=master,
            hosts=hosts,
            routers=routers,
            vms=vms,
            extra_masters=extra,
            etcd=etcd,
        )
        topo.validate()
        return topo

    @classmethod
    def from_yaml(cls, path_or_text: str) -> "Topology":
        import os

        import yaml

        text = path_or_text
        if "\n" not in path_or_text and os.path.exists(path_or_text):
            with open(path_or_text) as f:
                text = f.read()
        return cls.from_dict(yaml.safe_load(text))

    def to_dict(self) -> dict:
        def clean(obj):
            d = dataclasses.asdict(obj)
            return {k: v for k, v in d.items() if v not in (None, [], {})}

        out = {"segments": list(self.segments)}
        if self.master:
            out["master"] = clean(self.master)
        out["hosts"] = {n: {k: v for k, v in clean(h).items() if k != "name"} for n, h in self.hosts.items()}
        out["routers"] = {n: {k: v for k, v in clean(r).items() if k != "name"} for n, r in self.routers.items()}
        out["vms"] = {
            n: {
                "host": v.host,
                "nics": [{k: x for k, x in dataclasses.asdict(nic).items() if x is not None} for nic in v.nics],
            }
            for n, v in self.vms.items()
        }
        if self.extra_masters:
            out["extra_masters"] = {
                n: {k: v for k, v in clean(m).items() if k != "name"} for n, m in self.extra_masters.items()
            }
        if self.etcd:
            out["etcd"] = {n: {k: v for k, v in clean(e).items() if k != "name"} for n, e in self.etcd.items()}
        return out

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    # -- queries --------------------------------------------------------------------
    def nodes(self) -> dict[str, Node]:
        """Every wired node (master, hosts, routers) by name; VMs are separate."""
        out: dict[str, Node] = {}
        if self.master:
            out[self.master.name] = self.master
        out.update(self.extra_masters)
        out.update(self.etcd)
        out.update(self.hosts)
        out.update(self.routers)
        return out

    def masters(self) -> list[Master]:
        """Every salt master: ``master`` first (the lab's default for salt calls), then
        ``extra_masters``."""
        return ([self.master] if self.master else []) + list(self.extra_masters.values())

    @property
    def router(self) -> Optional[Router]:
        return self.routers.get("router") or next(iter(self.routers.values()), None)

    def validate(self) -> None:
        problems = []
        names = list(self.nodes()) + list(self.vms)
        seen = set()
        for n in names:
            if n in seen:
                problems.append(f"node name {n!r} used twice")
            seen.add(n)
            if not _NAME_RE.match(n) or len(n) > 40:
                problems.append(f"bad node name {n!r}")
            if n in ("switch", "sw"):
                problems.append(f"node name {n!r} is reserved for the switch")
        for s in self.segments:
            if len(s) > IFNAMSIZ or not _NAME_RE.match(s):
                problems.append(f"segment {s!r}: must be a valid interface name (<= {IFNAMSIZ} chars)")
        if len(set(self.segments)) != len(self.segments):
            problems.append("duplicate segment names")
        for node in self.nodes().values():
            for ifname, seg in node.links.items():
                if seg not in self.segments:
                    problems.append(f"{node.name}.{ifname}: unknown segment {seg!r}")
                if len(ifname) > IFNAMSIZ or not _NAME_RE.match(ifname) or ifname == "lo":
                    problems.append(f"{node.name}: bad interface name {ifname!r}")
            for ifname, addrs in node.addresses.items():
                if ifname not in node.links:
                    problems.append(f"{node.name}: address on unknown interface {ifname!r}")
                for a in addrs:
                    try:
                        ipaddress.ip_interface(a)
                        if "/" not in a:
                            raise ValueError
                    except ValueError:
                        problems.append(f"{node.name}.{ifname}: bad address {a!r} (want a.b.c.d/len)")
            for ifname, mac in node.macs.items():
                if not _MAC_RE.match(mac):
                    problems.append(f"{node.name}.{ifname}: bad MAC {mac!r}")
        if self.hosts and not self.master:
            problems.append("hosts need a master")
        for m in self.masters():
            if not m.addresses:
                problems.append(f"the master {m.name} needs an address")
        if self.extra_masters and not self.master:
            problems.append("extra_masters need a master")
        for e in self.etcd.values():
            if not e.addresses:
                problems.append(f"etcd member {e.name} needs an address")
        macs = {}
        for vm in self.vms.values():
            if vm.host not in self.hosts and vm.host not in self.routers:
                problems.append(f"vm {vm.name}: unknown host {vm.host!r}")
            if not vm.nics:
                problems.append(f"vm {vm.name}: no NICs")
            for i, nic in enumerate(vm.nics):
                if not _MAC_RE.match(nic.mac):
                    problems.append(f"vm {vm.name}: bad MAC {nic.mac!r}")
                if nic.mac in macs:
                    problems.append(f"vm {vm.name}: MAC {nic.mac} also used by {macs[nic.mac]}")
                macs[nic.mac] = vm.name
                if len(vm.tap(i)) > IFNAMSIZ:
                    problems.append(f"vm {vm.name}: name too long for its tap {vm.tap(i)!r} (<= {IFNAMSIZ})")
                if len(nic.bridge) > IFNAMSIZ:
                    problems.append(f"vm {vm.name}: bad bridge name {nic.bridge!r}")
        if problems:
            raise TopologyError("; ".join(problems))


# --- the default lab ---------------------------------------------------------------------

DEFAULT_HOSTS = ["compute1", "compute2", "net1", "net2"]
_HOST_OCTET = {"compute1": 11, "compute2": 12, "net1": 21, "net2": 22}

#: segments of the default topology and what they carry
DEFAULT_SEGMENTS = {
    "mgmt": "management: salt master <-> minions (192.0.2.0/24)",
    "public": "public: hosts' eth0 and the upstream router (203.0.113.0/24)",
    "seg-private": "eth1 on every host: flat VM network(s) (bridge_interface eth1)",
    "seg-trunk": "eth2 on every host: VLAN trunk / VXLAN underlay (198.51.100.0/24)",
    "seg-shared": "eth3 on every host: a second flat VM network (bridge_interface eth3)",
    "seg-hw": "eth4 on every host and the router: flat VM network with a hardware gateway",
}

#: default VMs: name -> (host, bridge, mac)
DEFAULT_VMS = {
    "web1": ("compute1", "br100", "fa:16:3e:00:00:01"),
    "db1": ("compute2", "br100", "fa:16:3e:00:00:02"),
    "app1": ("compute1", "br200", "fa:16:3e:00:01:01"),
    "hw1": ("compute2", "br300", "fa:16:3e:00:02:01"),
}


def host_names(n: int) -> list[str]:
    """compute1, compute2, net1, net2, then compute3, compute4, ..."""
    names = DEFAULT_HOSTS[:n]
    i = 3
    while len(names) < n:
        names.append(f"compute{i}")
        i += 1
    return names


def default_topology(
    hosts: int = 4, vms: bool = True, hardware_router: bool = True, masters: int = 1, etcd: int = 0
) -> Topology:
    """``masters`` masters + ``hosts`` hosts (compute1, compute2, net1, net2, compute3...) + router + VMs.

    Host ``X`` (last octet 11, 12, 21, 22, then 13, 14, ...) gets mgmt0 192.0.2.X/24,
    eth0 203.0.113.X/24 (default route via the router 203.0.113.1), eth1 on seg-private,
    eth2 198.51.100.X/24 on seg-trunk, eth3 on seg-shared, eth4 on seg-hw. The router has
    eth0 203.0.113.1/24 and (``hardware_router``) eth1 172.16.100.1/24 on seg-hw.
    ``masters`` > 1: master2, master3, ... on mgmt (192.0.2.2, .3, ...); ``etcd`` members
    etcd1, etcd2, ... each in its own namespace on mgmt (192.0.2.31, .32, ...).
    """
    if not 1 <= masters <= 9 or not 0 <= etcd <= 9:
        raise TopologyError("masters: 1..9, etcd: 0..9")
    segments = list(DEFAULT_SEGMENTS)
    master = Master(name="master", links={"mgmt0": "mgmt"}, addresses={"mgmt0": ["192.0.2.1/24"]})
    used = set(_HOST_OCTET.values())
    hs = {}
    next_octet = 13
    for name in host_names(hosts):
        octet = _HOST_OCTET.get(name)
        if octet is None:
            while next_octet in used:
                next_octet += 1
            octet = next_octet
            used.add(octet)
        hs[name] = Host(
            name=name,
            links={
                "mgmt0": "mgmt",
                "eth0": "public",
                "eth1": "seg-private",
                "eth2": "seg-trunk",
                "eth3": "seg-shared",
                "eth4": "seg-hw",
            },
            addresses={
                "mgmt0": [f"192.0.2.{octet}/24"],
                "eth0": [f"203.0.113.{octet}/24"],
                "eth2": [f"198.51.100.{octet}/24"],
            },
            gateway="203.0.113.1",
        )
    router = Router(name="router", links={"eth0": "public"}, addresses={"eth0": ["203.0.113.1/24"]})
    if hardware_router:
        router.links["eth1"] = "seg-hw"
        router.addresses["eth1"] = ["172.16.100.1/24"]
    vmd = {}
    if vms:
        for name, (host, bridge, mac) in DEFAULT_VMS.items():
            if host in hs:
                vmd[name] = VM(name=name, host=host, nics=[Nic(bridge=bridge, mac=mac)])
    extra = {
        f"master{i}": Master(name=f"master{i}", links={"mgmt0": "mgmt"}, addresses={"mgmt0": [f"192.0.2.{i}/24"]})
        for i in range(2, masters + 1)
    }
    members = {
        f"etcd{i}": Node(name=f"etcd{i}", links={"eth0": "mgmt"}, addresses={"eth0": [f"192.0.2.{30 + i}/24"]})
        for i in range(1, etcd + 1)
    }
    topo = Topology(
        segments=segments,
        master=master,
        hosts=hs,
        routers={"router": router},
        vms=vmd,
        extra_masters=extra,
        etcd=members,
    )
    topo.validate()
    return topo
