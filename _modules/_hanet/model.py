"""The pillar model: read the ``hanet`` pillar, apply defaults, validate everything.

Pure Python (netaddr only); importable without Salt. ``load(pillar)`` returns a
``Config`` or raises ``PillarError`` listing **every** problem found, each with its
pillar path (``hanet:instances:web1:nics:0:ip``)::

    from _hanet import model
    cfg = model.load(pillar["hanet"])
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Optional

import netaddr

ROOT = "hanet"

GLOBAL_DEFAULTS = {
    "send_arp_for_ha": False,
    "send_arp_for_ha_count": 3,
    "metadata_host": "127.0.0.1",
    "metadata_port": 8775,
    "dhcp_lease_time": 86400,
    "dhcp_domain": "novalocal",
    "dns_servers": [],
    "dmz_cidr": [],
    "force_snat_range": [],
    "use_single_default_gateway": False,
    "firewall_driver": "nftables",
    "dnsmasq_config_file": "",
    "dnsmasq_user": "",  # "": the distribution's "dnsmasq" user where it exists, else root
    "metrics_textfile_dir": "/var/lib/hanet/metrics",
    "dhcp_checksum_fill": False,
}
HA_DEFAULTS = {
    "probe_interval_ms": None,
    "probe_misses": None,  # None: Probe's defaults
    "garp_refresh_s": 0,
    "order_port": 4509,
    "report_port": 4510,
    "conntrack_sync": None,
}
CONNTRACK_SYNC_KEYS = {"interface", "group", "port"}
TOP_KEYS = set(GLOBAL_DEFAULTS) | {"ha", "networks", "hosts", "instances"}
NETWORK_KEYS = {
    "cidr",
    "bridge",
    "bridge_interface",
    "multi_host",
    "gateway",
    "dhcp_start",
    "mtu",
    "vlan",
    "vxlan",
    "gateway_mode",
    "network_hosts",
    "dns_servers",
    "share_dhcp_address",
    "snat_address",
    "dhcp_server",
}
VXLAN_KEYS = {"vni", "group", "remotes", "port"}
HOST_KEYS = {"public_interface", "routing_source_ip", "networks"}
HOST_NET_KEYS = {"address"}
INSTANCE_KEYS = {"host", "nics", "floating_ips", "uuid", "hostname", "public_keys", "user_data", "availability_zone"}
NIC_KEYS = {"network", "mac", "ip", "port"}
FLOAT_KEYS = {"address", "fixed_ip"}
USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
IFNAME_RE = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")
LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")
HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


class PillarError(ValueError):
    """The pillar is wrong. ``problems`` is a list of (path, message), all of them."""

    def __init__(self, problems):
        self.problems = sorted(set(problems))
        super().__init__(self.render())

    def render(self):
        n = len(self.problems)
        head = f"hanet pillar has {n} problem{'s' if n != 1 else ''}:"
        return "\n".join([head] + [f"  {path}: {msg}" for path, msg in self.problems])


@dataclass(frozen=True)
class Vxlan:
    vni: int
    group: Optional[str] = None
    remotes: tuple = ()
    port: int = 4789


@dataclass(frozen=True)
class Network:
    label: str
    cidr: str
    bridge: str
    bridge_interface: Optional[str]
    multi_host: bool
    gateway: Optional[str]
    dhcp_start: str
    mtu: int = 1500
    vlan: Optional[int] = None
    vxlan: Optional[Vxlan] = None
    gateway_mode: str = "host"
    network_hosts: tuple = ()
    dns_servers: tuple = ()
    share_dhcp_address: bool = False  # multi_host: every host is the gateway, one address
    # network_hosts: the network's outbound SNAT source, bound by its owner on the public
    # interface and moved with the gateway (open connections keep their source); None:
    # each host's routing_source_ip
    snat_address: Optional[str] = None
    # network_hosts with gateway_mode hardware (nova's ``dhcp_server``): the address the
    # owner binds and moves on failover in the gateway's place (the gateway is the
    # router's); dnsmasq and the metadata service listen on it, and the compute hosts
    # send their instances' floating-IP frames to the MAC that answers for it
    dhcp_server: Optional[str] = None

    @property
    def service_address(self):
        """The address a network-host network's owner holds and a failover moves: the
        gateway, or (``gateway_mode: hardware``) the ``dhcp_server``."""
        return self.dhcp_server if self.dhcp_server else self.gateway

    @property
    def service_cidr(self):
        """``service_address`` as it is bound on the bridge ("ip/prefixlen"), or None."""
        a = self.service_address
        return f"{a}/{self.prefixlen}" if a else None

    @property
    def shared_mac(self):
        """share_dhcp_address: the MAC every host's bridge carries with the shared
        gateway, the same on every host (an instance moved to another host keeps a valid
        ARP entry for its gateway); locally administered, derived from the cidr."""
        if not self.share_dhcp_address:
            return None
        digest = hashlib.sha256(f"hanet-shared-gateway {self.cidr}".encode()).digest()
        return ":".join(f"{b:02x}" for b in (0x02,) + tuple(digest[:5]))

    @property
    def net(self):
        return netaddr.IPNetwork(self.cidr)

    @property
    def prefixlen(self):
        return self.net.prefixlen

    @property
    def netmask(self):
        return str(self.net.netmask)

    @property
    def segmented(self):
        return self.vlan is not None or self.vxlan is not None

    @property
    def hardware(self):
        return self.gateway_mode == "hardware"


@dataclass(frozen=True)
class HostNet:
    address: str


@dataclass(frozen=True)
class Host:
    name: str
    public_interface: str
    routing_source_ip: Optional[str]
    networks: dict = field(default_factory=dict)  # label -> HostNet


@dataclass(frozen=True)
class Nic:
    index: int
    network: str
    mac: str
    ip: str
    port: Optional[str] = None  # the host-side interface (tap) of this NIC; None: libvirt's MAC rule


@dataclass(frozen=True)
class FloatingIp:
    address: str
    fixed_ip: str


@dataclass(frozen=True)
class Instance:
    name: str
    host: str
    nics: tuple
    floating_ips: tuple = ()
    uuid: str = ""
    hostname: str = ""
    public_keys: tuple = ()  # (name, key)
    user_data: str = ""
    availability_zone: str = "nova"


@dataclass(frozen=True)
class Probe:
    """How hanet probes its peers (the liveness beacon) and the master its network hosts:
    every ``interval_ms``; a peer is down after ``misses`` silent periods and up again
    after ``rise`` answered ones. The defaults live here and nowhere else."""

    interval_ms: int = 100
    misses: int = 3
    rise: int = 3

    @property
    def interval_s(self):
        return self.interval_ms / 1000.0

    @classmethod
    def of(cls, interval_ms=None, misses=None, rise=None):
        """A Probe from optional settings: a missing one takes its default, and ``rise``
        is never below ``misses`` (coming back takes as long as going)."""
        d = cls()
        misses = misses or d.misses
        return cls(interval_ms=interval_ms or d.interval_ms, misses=misses, rise=rise or max(d.rise, misses))


@dataclass(frozen=True)
class ConntrackSync:
    """``ha:conntrack_sync``: the network hosts' conntrackd (FTFW) talk on multicast
    ``group``:``port`` over ``interface`` (the same name on each network host)."""

    interface: str
    group: str = "225.0.0.50"
    port: int = 3780


@dataclass(frozen=True)
class Ha:
    probe_interval_ms: int = Probe.interval_ms
    probe_misses: int = Probe.misses
    garp_refresh_s: int = 0  # the owner announces what it holds again every so often; 0: never
    # UDP port on the network hosts for the master's signed direct orders; 0: none (the
    # Salt publication alone carries them)
    order_port: int = 4509
    # UDP port on the masters for the beacons' signed liveness reports, sent beside the
    # beacon event; 0: none (the event alone carries them)
    report_port: int = 4510
    # conntrackd between the network hosts (None: off): the flows of their networks
    # carried to the standbys, committed before a takeover binds
    conntrack_sync: Optional["ConntrackSync"] = None

    @property
    def probe(self):
        return Probe.of(self.probe_interval_ms, self.probe_misses)


@dataclass(frozen=True)
class Config:
    send_arp_for_ha: bool
    send_arp_for_ha_count: int
    metadata_host: str
    metadata_port: int
    dhcp_lease_time: int
    dhcp_domain: str
    dns_servers: tuple
    dmz_cidr: tuple
    force_snat_range: tuple
    use_single_default_gateway: bool
    firewall_driver: str
    dnsmasq_config_file: str
    dnsmasq_user: str  # "": the "dnsmasq" user where the host has one (dnsmasq.run_as)
    metrics_textfile_dir: str  # under the minion's root_dir; "" writes no metrics file
    dhcp_checksum_fill: bool  # fill in the UDP checksum of DHCP replies to VMs (iptables' CHECKSUM)
    ha: Ha
    networks: dict  # label -> Network
    hosts: dict  # name -> Host
    instances: dict  # name -> Instance

    def hosts_carrying(self, label):
        """The hosts that need network ``label``'s bridge (``carrying``), computed once
        per Config for every network: the failover decision asks for each network of
        each report (100 reports x 64 networks in bench/decision.py)."""
        got = self.__dict__.get("_carrying")
        if got is None:
            # not functools.cached_property: Python 3.11's holds one lock per property, and
            # a job the minion forks while a beacon thread holds it would wait for ever
            homes = {(i.host, n.network) for i in self.instances.values() for n in i.nics}
            got = {label: frozenset(carrying(self.networks, self.hosts, homes, label)) for label in self.networks}
            object.__setattr__(self, "_carrying", got)
        return got[label]


# --------------------------------------------------------------------------- checks


class _Checker:
    """Collects problems; every reader returns a usable value (or None) and never raises."""

    def __init__(self):
        self.problems = []
        self.declared = {"networks": set(), "hosts": set()}  # named in pillar, valid or not

    def unknown(self, kind, name, path, what):
        """Report a reference to an undeclared network/host (a declared but broken one
        is reported where it is declared, not at every reference)."""
        if name not in self.declared[kind]:
            self.add(path, f"unknown {what} {name!r} (not under {ROOT}:{kind})")

    def add(self, path, msg):
        self.problems.append((path, msg))

    # typed readers -----------------------------------------------------------
    def mapping(self, value, path, required=False):
        if value is None:
            if required:
                self.add(path, "is required")
            return {}
        if not isinstance(value, dict):
            self.add(path, f"must be a mapping, not {_kind(value)}")
            return {}
        bad = [k for k in value if not isinstance(k, str)]
        for k in bad:
            self.add(f"{path}:{k}", "key must be a string")
        return {k: v for k, v in value.items() if isinstance(k, str)}

    def unknown_keys(self, value, allowed, path):
        for key in sorted(set(value) - allowed):
            hint = _close(key, allowed)
            self.add(f"{path}:{key}", "unknown key" + (f" (did you mean {hint}?)" if hint else ""))

    def list(self, value, path):
        if value is None:
            return []
        if not isinstance(value, (list, tuple)):
            self.add(path, f"must be a list, not {_kind(value)}")
            return []
        return list(value)

    def bool(self, value, path):
        if isinstance(value, bool):
            return value
        self.add(path, f"must be true or false, not {value!r}")
        return None

    def int(self, value, path, lo, hi):
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
                value = int(value.strip())
            else:
                self.add(path, f"must be an integer in {lo}..{hi}, not {value!r}")
                return None
        if not lo <= value <= hi:
            self.add(path, f"{value} is out of range {lo}..{hi}")
            return None
        return value

    def str(self, value, path, pattern=None, what="a string"):
        if not isinstance(value, str) or not value:
            self.add(path, f"must be {what}, not {value!r}")
            return None
        if pattern is not None and not pattern.fullmatch(value):
            self.add(path, f"{value!r} is not {what}")
            return None
        return value

    def ip(self, value, path):
        if isinstance(value, str):
            try:
                ip = netaddr.IPAddress(value.strip(), flags=netaddr.INET_PTON)
                if ip.version == 4:
                    return str(ip)
                self.add(path, f"{value!r}: only IPv4 is supported")
                return None
            except (netaddr.AddrFormatError, ValueError, TypeError):
                pass
        self.add(path, f"{value!r} is not an IPv4 address")
        return None

    def cidr(self, value, path):
        if isinstance(value, str) and "/" in value:
            try:
                net = netaddr.IPNetwork(value.strip())
            except (netaddr.AddrFormatError, ValueError, TypeError):
                net = None
            if net is not None:
                if net.version != 4:
                    self.add(path, f"{value!r}: only IPv4 is supported")
                    return None
                if net.ip != net.network:
                    self.add(path, f"{value!r} has host bits set (did you mean {net.cidr}?)")
                    return None
                return str(net.cidr)
        self.add(path, f"{value!r} is not an IPv4 CIDR (like 192.168.0.0/24)")
        return None

    def mac(self, value, path):
        if isinstance(value, str) and re.fullmatch(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}", value):
            mac = value.lower()
            if int(mac[:2], 16) & 1:
                self.add(path, f"{value!r} is a multicast MAC; a NIC needs a unicast one")
                return None
            if mac == "00:00:00:00:00:00":
                self.add(path, f"{value!r} is not a usable MAC")
                return None
            return mac
        self.add(path, f"{value!r} is not a MAC address (like fa:16:3e:00:00:01)")
        return None


def _kind(value):
    return {
        dict: "a mapping",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        type(None): "empty",
    }.get(type(value), type(value).__name__)


def _close(word, options):
    import difflib

    m = difflib.get_close_matches(word, sorted(options), n=1, cutoff=0.75)
    return m[0] if m else None


def _usable(ip, net):
    """ip inside net and neither its network nor broadcast address (for /30 and wider)."""
    a = netaddr.IPAddress(ip)
    n = netaddr.IPNetwork(net)
    if a not in n:
        return "not in"
    if n.prefixlen <= 30 and a in (n.network, n.broadcast):
        return "network or broadcast address of"
    return None


def _in_cidr(c, value, path, cidr):
    """``value`` as an IPv4 address usable in the network's ``cidr`` (None, and a problem
    named by ``path``, when it is not; not checked against a cidr that was invalid)."""
    ip = c.ip(value, path)
    if ip and cidr and (why := _usable(ip, cidr)):
        c.add(path, f"{ip} is {why} the network's cidr {cidr}")
        return None
    return ip


# --------------------------------------------------------------------------- load


def load(pillar):
    """Validate the ``hanet`` pillar value and return a ``Config``; raise PillarError."""
    c = _Checker()
    top = c.mapping(pillar, ROOT, required=True)
    c.unknown_keys(top, TOP_KEYS, ROOT)
    g = dict(GLOBAL_DEFAULTS)
    g.update({k: v for k, v in top.items() if k in GLOBAL_DEFAULTS and v is not None})
    p = lambda k: f"{ROOT}:{k}"  # noqa: E731

    glob = {
        "send_arp_for_ha": c.bool(g["send_arp_for_ha"], p("send_arp_for_ha")),
        "send_arp_for_ha_count": c.int(g["send_arp_for_ha_count"], p("send_arp_for_ha_count"), 0, 100),
        "metadata_host": c.ip(g["metadata_host"], p("metadata_host")),
        "metadata_port": c.int(g["metadata_port"], p("metadata_port"), 1, 65535),
        "dhcp_lease_time": c.int(g["dhcp_lease_time"], p("dhcp_lease_time"), 120, 2**31 - 1),
        "dhcp_domain": c.str(
            g["dhcp_domain"], p("dhcp_domain"), re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$"), "a DNS domain"
        ),
        "dns_servers": tuple(
            x
            for i, v in enumerate(c.list(g["dns_servers"], p("dns_servers")))
            if (x := c.ip(v, f"{p('dns_servers')}:{i}"))
        ),
        "dmz_cidr": tuple(
            x for i, v in enumerate(c.list(g["dmz_cidr"], p("dmz_cidr"))) if (x := c.cidr(v, f"{p('dmz_cidr')}:{i}"))
        ),
        "force_snat_range": tuple(
            x
            for i, v in enumerate(c.list(g["force_snat_range"], p("force_snat_range")))
            if (x := c.cidr(v, f"{p('force_snat_range')}:{i}"))
        ),
        "use_single_default_gateway": c.bool(g["use_single_default_gateway"], p("use_single_default_gateway")),
        "firewall_driver": g["firewall_driver"],
        "dnsmasq_config_file": g["dnsmasq_config_file"],
        "dnsmasq_user": g["dnsmasq_user"],
        "metrics_textfile_dir": g["metrics_textfile_dir"],
        "dhcp_checksum_fill": c.bool(g["dhcp_checksum_fill"], p("dhcp_checksum_fill")),
    }
    if glob["firewall_driver"] not in ("nftables", "iptables"):
        c.add(p("firewall_driver"), f"{glob['firewall_driver']!r} is not nftables or iptables")
    if not isinstance(glob["dnsmasq_config_file"], str):
        c.add(p("dnsmasq_config_file"), f"must be a file path, not {glob['dnsmasq_config_file']!r}")
    elif glob["dnsmasq_config_file"] and not glob["dnsmasq_config_file"].startswith("/"):
        c.add(p("dnsmasq_config_file"), f"{glob['dnsmasq_config_file']!r} must be an absolute path")
    if glob["dnsmasq_user"] != "" and not c.str(
        glob["dnsmasq_user"], p("dnsmasq_user"), USER_RE, "a user name (or '' for the distribution's dnsmasq user)"
    ):
        glob["dnsmasq_user"] = ""
    mdir = glob["metrics_textfile_dir"]
    if not isinstance(mdir, str) or (mdir and not mdir.startswith("/")):
        c.add(p("metrics_textfile_dir"), f"{mdir!r} must be an absolute directory path, or '' (no metrics file)")

    ha_in = c.mapping(top.get("ha"), p("ha"))
    c.unknown_keys(ha_in, set(HA_DEFAULTS), p("ha"))
    ha_v = dict(HA_DEFAULTS, **{k: v for k, v in ha_in.items() if k in HA_DEFAULTS})
    probe = Probe.of(
        c.int(ha_v["probe_interval_ms"], p("ha:probe_interval_ms"), 10, 60000)
        if ha_v["probe_interval_ms"] is not None
        else None,
        c.int(ha_v["probe_misses"], p("ha:probe_misses"), 1, 100) if ha_v["probe_misses"] is not None else None,
    )
    refresh = c.int(ha_v["garp_refresh_s"], p("ha:garp_refresh_s"), 0, 86400)
    order_port = c.int(ha_v["order_port"], p("ha:order_port"), 0, 65535)
    report_port = c.int(ha_v["report_port"], p("ha:report_port"), 0, 65535)
    sync = None
    if ha_v["conntrack_sync"] is not None:
        sync = _conntrack_sync(c, ha_v["conntrack_sync"], p("ha:conntrack_sync"))
    ha = Ha(
        conntrack_sync=sync,
        probe_interval_ms=probe.interval_ms,
        probe_misses=probe.misses,
        garp_refresh_s=refresh or 0,
        order_port=HA_DEFAULTS["order_port"] if order_port is None else order_port,
        report_port=HA_DEFAULTS["report_port"] if report_port is None else report_port,
    )

    raw_networks = c.mapping(top.get("networks"), p("networks"))
    raw_hosts = c.mapping(top.get("hosts"), p("hosts"))
    c.declared = {"networks": set(raw_networks), "hosts": set(raw_hosts)}
    networks = _networks(c, raw_networks)
    hosts = _hosts(c, raw_hosts, networks)
    instances, nics, fips = _instances(c, c.mapping(top.get("instances"), p("instances")), networks, hosts)
    _network_hosts(c, networks, hosts)
    _cross_checks(c, networks, hosts, instances, nics, fips)

    if c.problems:
        raise PillarError(c.problems)
    return Config(ha=ha, networks=networks, hosts=hosts, instances=instances, **glob)


def _networks(c, raw):
    out = {}
    for label, spec in sorted(raw.items()):
        path = f"{ROOT}:networks:{label}"
        if not LABEL_RE.fullmatch(label):
            c.add(
                path,
                "a network label must be letters, digits, '-' or '_' (at most 32), starting with a letter or digit",
            )
            continue
        spec = c.mapping(spec, path, required=True)
        c.unknown_keys(spec, NETWORK_KEYS, path)
        cidr = c.cidr(spec.get("cidr"), f"{path}:cidr")
        bridge = c.str(spec.get("bridge"), f"{path}:bridge", IFNAME_RE, "an interface name (1-15 chars)")
        bif = spec.get("bridge_interface")
        if bif is not None:
            bif = c.str(bif, f"{path}:bridge_interface", IFNAME_RE, "an interface name (1-15 chars)")
        multi_host = c.bool(spec.get("multi_host", False), f"{path}:multi_host")
        share = c.bool(spec.get("share_dhcp_address", False), f"{path}:share_dhcp_address")
        mode = spec.get("gateway_mode", "host")
        if mode not in ("host", "hardware"):
            c.add(f"{path}:gateway_mode", f"{mode!r} is not host or hardware")
            mode = None
        gateway = None
        if spec.get("gateway") is not None:
            gateway = _in_cidr(c, spec.get("gateway"), f"{path}:gateway", cidr)
        elif mode == "hardware":
            c.add(f"{path}:gateway", "is required with gateway_mode: hardware (the router's address)")
        elif multi_host is False:
            c.add(
                f"{path}:gateway", "is required for a network with network_hosts (the address that moves on failover)"
            )
        mtu = c.int(spec.get("mtu", 1500), f"{path}:mtu", 576, 65535) or 1500
        vlan = None
        if spec.get("vlan") is not None:
            vlan = c.int(spec.get("vlan"), f"{path}:vlan", 1, 4094)
        vx = None
        if spec.get("vxlan") is not None:
            vx = _vxlan(c, spec.get("vxlan"), f"{path}:vxlan")
        if spec.get("vlan") is not None and spec.get("vxlan") is not None:
            c.add(path, "vlan and vxlan are exclusive: a network has one segmentation")
        if (spec.get("vlan") is not None or spec.get("vxlan") is not None) and spec.get("bridge_interface") is None:
            c.add(f"{path}:bridge_interface", "is required with vlan or vxlan (the 802.1Q parent / VXLAN underlay)")
        dhcp_start = None
        if cidr:
            net = netaddr.IPNetwork(cidr)
            if net.prefixlen > 29:
                c.add(f"{path}:cidr", f"{cidr} is too small for a VM network (/29 at most)")
            if spec.get("dhcp_start") is not None:
                dhcp_start = _in_cidr(c, spec.get("dhcp_start"), f"{path}:dhcp_start", cidr)
            else:
                base = netaddr.IPAddress(gateway) if gateway else net.network
                dhcp_start = str(base + 1) if base + 1 < net.broadcast else str(net.network + 1)
        nh = []
        if "network_hosts" in spec:
            for i, h in enumerate(c.list(spec.get("network_hosts"), f"{path}:network_hosts")):
                h = c.str(h, f"{path}:network_hosts:{i}", what="a minion id")
                if h:
                    if h in nh:
                        c.add(f"{path}:network_hosts:{i}", f"{h} is listed twice")
                    else:
                        nh.append(h)
        if multi_host is True and nh:
            c.add(
                f"{path}:network_hosts",
                "a multi_host network has no network hosts (every compute host serves its own instances)",
            )
        if multi_host is False and not nh:
            c.add(f"{path}:network_hosts", "is required when multi_host is false (ordered: the first live one serves)")
        dhcp_server = None
        if spec.get("dhcp_server") is not None:
            dhcp_server = _in_cidr(c, spec.get("dhcp_server"), f"{path}:dhcp_server", cidr)
            if dhcp_server and not (mode == "hardware" and multi_host is False):
                c.add(
                    f"{path}:dhcp_server",
                    "is for networks with network_hosts and gateway_mode: hardware "
                    "(elsewhere dnsmasq listens on the gateway, or in multi_host on each host's address)",
                )
                dhcp_server = None
        elif mode == "hardware" and multi_host is False:
            # the owner binds and moves an address of its own: the gateway is the router's
            c.add(
                f"{path}:dhcp_server",
                "is required with gateway_mode: hardware and network_hosts (the address the owner "
                "serves DHCP on and moves on failover; the gateway is the router's)",
            )
        if share and multi_host is False:
            c.add(f"{path}:share_dhcp_address", "is for multi_host networks (every host its instances' gateway)")
        elif share and mode == "hardware":
            c.add(f"{path}:share_dhcp_address", "is for networks whose hosts are the gateway (gateway_mode: host)")
        elif share and spec.get("gateway") is None:
            c.add(f"{path}:gateway", "is required with share_dhcp_address (the address every host uses)")
        snat = None
        if spec.get("snat_address") is not None:
            snat = c.ip(spec.get("snat_address"), f"{path}:snat_address")
            if snat and multi_host is not False:
                c.add(
                    f"{path}:snat_address",
                    "is for networks with network_hosts (the address moves with the gateway; "
                    "a multi_host network's hosts each SNAT to their own)",
                )
                snat = None
            elif snat and mode == "hardware":
                c.add(f"{path}:snat_address", "is for networks whose hosts are the gateway (gateway_mode: host)")
                snat = None
        servers = tuple(
            x
            for i, v in enumerate(c.list(spec.get("dns_servers"), f"{path}:dns_servers"))
            if (x := c.ip(v, f"{path}:dns_servers:{i}"))
        )
        if (
            None in (cidr, bridge, multi_host, mode, dhcp_start)
            or (spec.get("vlan") is not None and vlan is None)
            or (spec.get("vxlan") is not None and vx is None)
            or share is None
        ):
            continue
        out[label] = Network(
            label=label,
            cidr=cidr,
            bridge=bridge,
            bridge_interface=bif,
            multi_host=multi_host,
            gateway=gateway,
            dhcp_start=dhcp_start,
            mtu=mtu,
            vlan=vlan,
            vxlan=vx,
            gateway_mode=mode,
            network_hosts=tuple(nh),
            dns_servers=servers,
            share_dhcp_address=bool(share and multi_host and mode == "host" and gateway),
            snat_address=snat,
            dhcp_server=dhcp_server,
        )
    return out


def _conntrack_sync(c, raw, path):
    spec = c.mapping(raw, path, required=True)
    c.unknown_keys(spec, CONNTRACK_SYNC_KEYS, path)
    ifname = c.str(spec.get("interface"), f"{path}:interface", IFNAME_RE, "an interface name (1-15 chars)")
    group = c.ip(spec.get("group", ConntrackSync.group), f"{path}:group")
    if group and not netaddr.IPAddress(group).is_multicast():
        c.add(f"{path}:group", f"{group} is not a multicast address (224.0.0.0/4)")
        group = None
    port = c.int(spec.get("port", ConntrackSync.port), f"{path}:port", 1, 65535)
    if None in (ifname, group, port):
        return None
    return ConntrackSync(interface=ifname, group=group, port=port)


def _vxlan(c, raw, path):
    spec = c.mapping(raw, path, required=True)
    c.unknown_keys(spec, VXLAN_KEYS, path)
    vni = c.int(spec.get("vni"), f"{path}:vni", 1, 16777215)
    port = c.int(spec.get("port", 4789), f"{path}:port", 1, 65535)
    group = None
    if spec.get("group") is not None:
        group = c.ip(spec.get("group"), f"{path}:group")
        if group and not netaddr.IPAddress(group).is_multicast():
            c.add(f"{path}:group", f"{group} is not a multicast address")
            group = None
    remotes = []
    for i, r in enumerate(c.list(spec.get("remotes"), f"{path}:remotes")):
        r = c.ip(r, f"{path}:remotes:{i}")
        if r:
            remotes.append(r)
    if spec.get("group") is not None and spec.get("remotes"):
        c.add(path, "group and remotes are exclusive: multicast or unicast flooding")
    elif spec.get("group") is None and not spec.get("remotes"):
        c.add(path, "needs a multicast group or a list of remotes")
    if vni is None or port is None:
        return None
    return Vxlan(vni=vni, group=group, remotes=tuple(sorted(set(remotes))), port=port)


def _hosts(c, raw, networks):
    out = {}
    for name, spec in sorted(raw.items()):
        path = f"{ROOT}:hosts:{name}"
        spec = c.mapping(spec, path, required=True)
        c.unknown_keys(spec, HOST_KEYS, path)
        pub = c.str(
            spec.get("public_interface"), f"{path}:public_interface", IFNAME_RE, "an interface name (1-15 chars)"
        )
        rsi = None
        if spec.get("routing_source_ip") is not None:
            rsi = c.ip(spec.get("routing_source_ip"), f"{path}:routing_source_ip")
        nets = {}
        for label, hn in sorted(c.mapping(spec.get("networks"), f"{path}:networks").items()):
            npath = f"{path}:networks:{label}"
            hn = c.mapping(hn, npath, required=True)
            c.unknown_keys(hn, HOST_NET_KEYS, npath)
            if label in networks and networks[label].share_dhcp_address and hn.get("address") is None:
                nets[label] = HostNet(address=networks[label].gateway)  # it may be left out
                continue
            addr = c.ip(hn.get("address"), f"{npath}:address")
            if label not in networks:
                c.unknown("networks", label, npath, "network")
                continue
            net = networks[label]
            if net.share_dhcp_address:
                if addr and addr != net.gateway:
                    c.add(
                        f"{npath}:address",
                        f"network {label} shares its DHCP address: every host uses its gateway "
                        f"{net.gateway} (leave address out)",
                    )
                nets[label] = HostNet(address=net.gateway)  # as every host carrying it
                continue
            if addr and (why := _usable(addr, net.cidr)):
                c.add(f"{npath}:address", f"{addr} is {why} network {label}'s cidr {net.cidr}")
                continue
            if addr and not net.multi_host and addr == net.gateway:
                c.add(
                    f"{npath}:address",
                    f"{addr} is network {label}'s gateway, which moves between "
                    "network hosts; give the host an address of its own",
                )
                continue
            if addr and net.dhcp_server and addr == net.dhcp_server:
                c.add(
                    f"{npath}:address",
                    f"{addr} is network {label}'s dhcp_server, which moves between "
                    "network hosts; give the host an address of its own",
                )
                continue
            if addr and net.hardware and addr == net.gateway:
                c.add(f"{npath}:address", f"{addr} is network {label}'s hardware router")
                continue
            if addr:
                nets[label] = HostNet(address=addr)
        if pub is None:
            continue
        for label, net in sorted(networks.items()):
            if net.share_dhcp_address and net.bridge_interface == pub and net.vlan is None and net.vxlan is None:
                # one NIC: the bridge would carry the host's own addresses with the MAC
                # every host shares, which share_dhcp_address keeps off the uplink
                c.add(
                    f"{path}:public_interface",
                    f"{pub} is the uplink of network {label}, which shares its DHCP address "
                    "(and MAC) on every host: a host's own addresses cannot ride on that bridge",
                )
        out[name] = Host(name=name, public_interface=pub, routing_source_ip=rsi, networks=nets)
    return out


def _instances(c, raw, networks, hosts):
    """Valid instances, plus every valid NIC and floating IP (also of instances that are
    broken elsewhere) as (instance, item) pairs, so that the cross checks see them all."""
    out, all_nics, all_fips = {}, [], []
    ports_seen = {}  # (host, port) -> pillar path: a tap is one NIC's
    for name, spec in sorted(raw.items()):
        path = f"{ROOT}:instances:{name}"
        spec = c.mapping(spec, path, required=True)
        c.unknown_keys(spec, INSTANCE_KEYS, path)
        host = c.str(spec.get("host"), f"{path}:host", what="a minion id")
        if host and host not in hosts:
            c.unknown("hosts", host, f"{path}:host", "host")
        nics = []
        raw_nics = c.list(spec.get("nics"), f"{path}:nics")
        if not raw_nics and "nics" in spec and isinstance(spec.get("nics"), list):
            c.add(f"{path}:nics", "an instance needs at least one NIC")
        elif "nics" not in spec:
            c.add(f"{path}:nics", "is required")
        seen_nets = {}
        for i, nic in enumerate(raw_nics):
            npath = f"{path}:nics:{i}"
            nic = c.mapping(nic, npath, required=True)
            c.unknown_keys(nic, NIC_KEYS, npath)
            label = c.str(nic.get("network"), f"{npath}:network", what="a network label")
            mac = c.mac(nic.get("mac"), f"{npath}:mac")
            ip = c.ip(nic.get("ip"), f"{npath}:ip")
            port = (
                c.str(nic.get("port"), f"{npath}:port", IFNAME_RE, "an interface name (1-15 chars)")
                if "port" in nic
                else None
            )
            if port is not None:
                if (host, port) in ports_seen:
                    c.add(f"{npath}:port", f"port {port} on host {host} is already {ports_seen[(host, port)]}")
                else:
                    ports_seen[(host, port)] = f"{npath}:port"
            all_nics.append((name, i, mac, ip, host, label))
            if label and label not in networks:
                c.unknown("networks", label, f"{npath}:network", "network")
                continue
            if label is None:
                continue
            net = networks[label]
            if label in seen_nets:
                c.add(f"{npath}:network", f"instance {name} already has NIC {seen_nets[label]} on {label}")
            seen_nets.setdefault(label, i)
            if ip and (why := _usable(ip, net.cidr)):
                c.add(f"{npath}:ip", f"{ip} is {why} network {label}'s cidr {net.cidr}")
                ip = None
            elif ip and ip == net.gateway:
                c.add(f"{npath}:ip", f"{ip} is network {label}'s gateway")
                ip = None
            elif ip and ip == net.dhcp_server:
                c.add(f"{npath}:ip", f"{ip} is network {label}'s dhcp_server")
                ip = None
            if host in hosts and net.multi_host and not net.share_dhcp_address and label not in hosts[host].networks:
                c.add(
                    f"{npath}:network",
                    f"host {host} serves multi_host network {label} for this "
                    f"instance but has no address on it "
                    f"(add {ROOT}:hosts:{host}:networks:{label}:address)",
                )
            if mac and ip:
                nics.append(Nic(index=i, network=label, mac=mac, ip=ip, port=port))
        fips = []
        for i, f in enumerate(c.list(spec.get("floating_ips"), f"{path}:floating_ips")):
            fpath = f"{path}:floating_ips:{i}"
            if isinstance(f, str):
                addr, fixed = c.ip(f, fpath), (nics[0].ip if nics and nics[0].index == 0 else None)
            else:
                f = c.mapping(f, fpath, required=True)
                c.unknown_keys(f, FLOAT_KEYS, fpath)
                addr = c.ip(f.get("address"), f"{fpath}:address")
                fixed = (
                    c.ip(f.get("fixed_ip"), f"{fpath}:fixed_ip") if "fixed_ip" in f else (nics[0].ip if nics else None)
                )
                if fixed and fixed not in {n.ip for n in nics} and len(nics) == len(raw_nics):
                    c.add(f"{fpath}:fixed_ip", f"{fixed} is not one of instance {name}'s NIC addresses")
                    fixed = None
            if addr:
                all_fips.append((name, i, addr))
            if addr and fixed:
                fips.append(FloatingIp(address=addr, fixed_ip=fixed))
        hostname = spec.get("hostname", name)
        if not isinstance(hostname, str) or not HOSTNAME_RE.fullmatch(hostname):
            c.add(
                f"{path}:hostname" if "hostname" in spec else path,
                f"{hostname!r} is not a valid hostname (letters, digits, '-'); set hanet:instances:<name>:hostname",
            )
            hostname = None
        keys = c.mapping(spec.get("public_keys"), f"{path}:public_keys")
        for k, v in keys.items():
            if not isinstance(v, str):
                c.add(f"{path}:public_keys:{k}", "must be a key as a string")
        user_data = spec.get("user_data", "")
        if not isinstance(user_data, str):
            c.add(f"{path}:user_data", "must be a string")
        uuid = spec.get("uuid", "")
        if not isinstance(uuid, str):
            c.add(f"{path}:uuid", "must be a string")
        az = spec.get("availability_zone", "nova")
        if not isinstance(az, str):
            c.add(f"{path}:availability_zone", "must be a string")
        if host is None or hostname is None or len(nics) != len(raw_nics):
            continue
        out[name] = Instance(
            name=name,
            host=host,
            nics=tuple(nics),
            floating_ips=tuple(fips),
            uuid=uuid if isinstance(uuid, str) and uuid else _uuid_for(name),
            hostname=hostname,
            public_keys=tuple(sorted((k, v) for k, v in keys.items() if isinstance(v, str))),
            user_data=user_data if isinstance(user_data, str) else "",
            availability_zone=az if isinstance(az, str) else "nova",
        )
    return out, all_nics, all_fips


def _uuid_for(name):
    import uuid

    return str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{name}.instances.hanet"))


def _network_hosts(c, networks, hosts):
    for label, net in networks.items():
        for i, h in enumerate(net.network_hosts):
            path = f"{ROOT}:networks:{label}:network_hosts:{i}"
            if h not in hosts:
                c.unknown("hosts", h, path, "host")
            elif label not in hosts[h].networks:
                c.add(
                    path, f"network host {h} has no address on {label} (add {ROOT}:hosts:{h}:networks:{label}:address)"
                )


def _cross_checks(c, networks, hosts, instances, nics, fips):
    # Overlapping fixed ranges.
    labels = sorted(networks)
    for i, a in enumerate(labels):
        for b in labels[i + 1 :]:
            na, nb = networks[a].net, networks[b].net
            if na.first <= nb.last and nb.first <= na.last:
                c.add(f"{ROOT}:networks:{b}:cidr", f"{nb} overlaps network {a}'s cidr {na}")
    # Bridges are per network.
    seen = {}
    for label in labels:
        br = networks[label].bridge
        if br in seen:
            c.add(f"{ROOT}:networks:{label}:bridge", f"bridge {br} is already network {seen[br]}'s")
        seen.setdefault(br, label)
    # Segment ids: a VLAN id once per parent, a VNI once.
    vlans, vnis = {}, {}
    for label in labels:
        n = networks[label]
        if n.vlan is not None:
            key = (n.bridge_interface, n.vlan)
            if key in vlans:
                c.add(
                    f"{ROOT}:networks:{label}:vlan",
                    f"VLAN {n.vlan} on {n.bridge_interface} is already network {vlans[key]}'s",
                )
            vlans.setdefault(key, label)
        if n.vxlan is not None:
            if n.vxlan.vni in vnis:
                c.add(
                    f"{ROOT}:networks:{label}:vxlan:vni", f"VNI {n.vxlan.vni} is already network {vnis[n.vxlan.vni]}'s"
                )
            vnis.setdefault(n.vxlan.vni, label)
    # A flat uplink can sit in one bridge only, on any host that carries both networks.
    flat = [lab for lab in labels if not networks[lab].segmented and networks[lab].bridge_interface]
    for i, a in enumerate(flat):
        for b in flat[i + 1 :]:
            if networks[a].bridge_interface != networks[b].bridge_interface:
                continue
            homes = {(h, lab) for *_, h, lab in nics}
            both = sorted(carrying(networks, hosts, homes, a) & carrying(networks, hosts, homes, b))
            if both:
                c.add(
                    f"{ROOT}:networks:{b}:bridge_interface",
                    f"uplink {networks[b].bridge_interface} is already in network {a}'s bridge "
                    f"{networks[a].bridge} on host {both[0]}; one uplink fits one bridge",
                )
    # A flat uplink or a segment parent must not be the public interface? (allowed: real sites do it)
    # IPs: unique per network across gateways, host addresses and instances; MACs unique.
    owners = {}  # ip -> path

    def claim(ip, path):
        if ip in owners:
            c.add(path, f"{ip} is already used at {owners[ip]}")
        else:
            owners[ip] = path

    for label in labels:
        n = networks[label]
        if n.gateway and (not n.multi_host or n.hardware or n.share_dhcp_address):
            claim(n.gateway, f"{ROOT}:networks:{label}:gateway")
        if n.dhcp_server:
            claim(n.dhcp_server, f"{ROOT}:networks:{label}:dhcp_server")
    for h in sorted(hosts):
        for label, hn in sorted(hosts[h].networks.items()):
            if not networks[label].share_dhcp_address:  # the shared one is the gateway's
                claim(hn.address, f"{ROOT}:hosts:{h}:networks:{label}:address")
    macs = {}
    for name, index, mac, ip, _host, _label in nics:
        path = f"{ROOT}:instances:{name}:nics:{index}"
        if ip:
            claim(ip, f"{path}:ip")
        if mac in macs:
            c.add(f"{path}:mac", f"{mac} is already used at {macs[mac]}")
        elif mac:
            macs[mac] = f"{path}:mac"
    # Floating IPs: not a fixed address, not in any VM network, unique.
    fseen = {}
    for name, i, addr in fips:
        path = f"{ROOT}:instances:{name}:floating_ips:{i}"
        if addr in owners:
            c.add(path, f"floating IP {addr} is also a fixed IP ({owners[addr]})")
        else:
            for label in labels:
                if netaddr.IPAddress(addr) in networks[label].net:
                    c.add(path, f"floating IP {addr} is inside network {label}'s cidr {networks[label].cidr}")
                    break
        if addr in fseen:
            c.add(path, f"floating IP {addr} is already used at {fseen[addr]}")
        fseen.setdefault(addr, path)
    for h in sorted(hosts):
        rsi = hosts[h].routing_source_ip
        if rsi and rsi in fseen:
            c.add(f"{ROOT}:hosts:{h}:routing_source_ip", f"{rsi} is also a floating IP ({fseen[rsi]})")
    # A moving SNAT address: bound like a floating IP, so it is none of the others.
    rsis = {hosts[h].routing_source_ip: f"{ROOT}:hosts:{h}:routing_source_ip" for h in sorted(hosts)}
    snats = {}
    for label in labels:
        addr = networks[label].snat_address
        if not addr:
            continue
        path = f"{ROOT}:networks:{label}:snat_address"
        clash = owners.get(addr) or fseen.get(addr) or rsis.get(addr) or snats.get(addr)
        inside = [x for x in labels if netaddr.IPAddress(addr) in networks[x].net]
        if clash:
            c.add(path, f"{addr} is already used at {clash}")
        elif inside:
            c.add(path, f"{addr} is inside network {inside[0]}'s cidr {networks[inside[0]].cidr}")
        snats.setdefault(addr, path)


def carrying(networks, hosts, nic_homes, label):
    """Hosts that need network ``label``'s bridge: its addressed hosts, its network
    hosts, and every host with an instance NIC on it (``nic_homes``: (host, label))."""
    names = {h for h, host in hosts.items() if label in host.networks}
    names |= set(networks[label].network_hosts)
    names |= {h for h, lab in nic_homes if lab == label}
    return names
