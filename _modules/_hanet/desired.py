"""Desired host state: what one minion must hold, computed purely from the model.

Every type here is a frozen dataclass of plain values (strings, ints, tuples), so a
desired state compares with ``==``, hashes, and turns into JSON with ``to_dict``. The
appliers (``links``, ``ruleset``, ``dnsmasq``, ``metadata``) read the host's current
state into the same shapes, and the planners compare the two.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from .model import HostNet, Probe


@dataclass(frozen=True)
class Segment:
    """The link enslaved to a bridge when the network is segmented (VLAN or VXLAN)."""

    kind: str  # "vlan" | "vxlan"
    name: str  # vlan101, vx5102
    parent: str  # bridge_interface: the 802.1Q parent or the VXLAN underlay device
    vlan_id: Optional[int] = None
    vni: Optional[int] = None
    group: Optional[str] = None  # VXLAN multicast group
    remotes: tuple = ()  # VXLAN unicast remotes (head-end replication via FDB entries)
    port: int = 4789
    mtu: int = 1500


@dataclass(frozen=True)
class Bridge:
    """A Linux bridge for one network on this host.

    ``uplink`` is the interface enslaved to it: the flat interface itself, or the
    ``segment``'s link name when the network is VLAN/VXLAN segmented, or None for a
    host-only bridge. ``addresses`` are "ip/prefixlen" strings in order: the host's own
    address first, then (on the active network host) the network's gateway.
    STP is off, forward delay 0, and the bridge MAC is pinned to the uplink's, or to
    ``shared_mac`` when set (share_dhcp_address: the MAC of the gateway every host holds).
    """

    name: str
    network: str
    uplink: Optional[str]
    segment: Optional[Segment] = None
    mtu: int = 1500
    addresses: tuple = ()
    # addresses that move between hosts (the gateway of a network-host network): an
    # apply binds one only after duplicate address detection finds nobody holding it
    guarded: tuple = ()
    shared_mac: Optional[str] = None


@dataclass(frozen=True)
class DhcpHost:
    mac: str
    hostname: str  # fully qualified: web1.novalocal
    ip: str
    default_route: bool = True  # False: this NIC gets no router (use_single_default_gateway)


@dataclass(frozen=True)
class Dnsmasq:
    """One dnsmasq for one served network (nova-network's flags)."""

    network: str  # label: also the dnsmasq tag
    bridge: str
    listen_address: str  # the address dnsmasq binds (own address, or the gateway when it moves)
    range_start: str
    netmask: str
    lease_time: int
    lease_max: int
    domain: str
    router: Optional[str]  # the router option handed out (None: no router option)
    dns_servers: tuple = ()
    conf_file: str = ""  # dnsmasq_config_file pass-through
    user: str = ""  # dnsmasq_user: "" for the host's "dnsmasq" user, else root (dnsmasq.run_as)
    mtu: Optional[int] = None  # handed out as option 26 when not 1500
    hosts: tuple = ()  # DhcpHost entries, only the instances this host serves
    # (ip, fqdn, short name) of every instance NIC on the network, on whatever host: its
    # DNS answers for all of them (nova's update_dns_entries), not only for its leases
    names: tuple = ()

    def options_key(self):
        """Everything that needs a restart when it changes (hosts and names only need SIGHUP)."""
        return dataclasses.replace(self, hosts=(), names=())


@dataclass(frozen=True)
class Snat:
    """SNAT of a fixed range to ``source`` out of ``out_interface``."""

    network: str
    cidr: str
    source: Optional[str]  # routing_source_ip; None: masquerade with the interface's address
    out_interface: str
    exempt: tuple = ()  # destinations not SNATed: dmz_cidr, the fixed range, metadata host
    force: tuple = ()  # force_snat_range: always SNATed (also on hardware-gateway networks)
    all_destinations: bool = True  # False (hardware gateway): only ``force`` destinations


@dataclass(frozen=True)
class Metadata:
    """169.254.169.254:80 -> metadata_host:metadata_port for VMs on ``bridges``."""

    bridges: tuple
    host: str  # 127.0.0.1: REDIRECT to the local service; else DNAT
    port: int
    local_service: bool  # run hanet's metadata service on this host


@dataclass(frozen=True)
class PortGuard:
    """Anti-spoofing for one bridge: what VM ports may send.

    Frames entering ``bridge`` through any port other than ``trusted_ports`` (the
    uplink / segment link) must come from a (mac, ip) pair in ``pairs``; DHCP server
    replies from VM ports are dropped; ARP replies/announcements must claim the sender's
    own IP. ``dhcp_isolated``: DHCP does not cross the trusted ports (multi_host).

    Each pair is bound to its own port: a frame entering through a VM port must carry
    that port's NIC's (mac, ip). ``ports`` names the port of the NICs whose pillar says
    ``port:``; the others are found at apply time by libvirt's rule (the host-side tap
    carries the guest MAC with the first octet ``fe``, ``fa`` when the guest's is ``fe``).
    A VM port that is no NIC's may send nothing.
    """

    bridge: str
    trusted_ports: tuple
    pairs: tuple  # ((mac, ip), ...)
    dhcp_isolated: bool
    ports: tuple = ()  # ((mac, port), ...): the pillar's ``port`` of a NIC, where given
    # ((ip, mac), ...) that stay on this host (share_dhcp_address: the gateway every host
    # holds): no ARP for the ip and no frame from or to the mac crosses the trusted ports
    local_only: tuple = ()
    # Hardware-gateway networks (nova's ebtables redirect, the seed's "hybrid" option): IP
    # frames from these VM addresses (the fixed IPs whose floating IP this host holds) to
    # destinations outside ``routed_exempt`` go to this host's IP stack instead of the
    # hardware router, where the floating IP's SNAT applies; so do frames from any VM of
    # the bridge to ``routed_force`` (force_snat_range)
    routed_from: tuple = ()
    routed_force: tuple = ()
    routed_exempt: tuple = ()  # the network's range, dmz_cidr, the metadata host
    # the VMs' metadata requests (169.254.169.254:80) go to this host's IP stack too, where
    # the ruleset hands them to the metadata service: the hardware router needs no recipe
    routed_metadata: bool = False
    # a hardware network with network hosts: those frames go to the owner instead (the
    # MAC that answers for this address, its dhcp_server, which the beacon's owner watch
    # keeps in the bridge table, ``_hanet.follow``), which routes them the same way
    routed_via: Optional[str] = None

    @property
    def routed(self):
        """Some frames of this bridge's VMs are taken off it (to this host or the owner)."""
        return bool(self.routed_from or self.routed_force or self.routed_metadata)


@dataclass(frozen=True)
class FloatingIp:
    address: str
    fixed_ip: str
    instance: str
    network: str
    public_interface: str
    cidr: str = ""  # the fixed network's range (hairpin: VMs on it reach the floating IP)


@dataclass(frozen=True)
class InstanceRecord:
    """What the metadata service tells an instance about itself (found by source IP)."""

    name: str
    uuid: str
    hostname: str  # fully qualified
    ips: tuple  # every fixed IP of the instance (on this host's networks)
    public_keys: tuple = ()  # (name, key)
    user_data: str = ""
    availability_zone: str = "nova"


@dataclass(frozen=True)
class Ruleset:
    """Everything the NAT/filter ruleset holds on this host, driver-independent."""

    driver: str  # nftables | iptables
    table: str  # the table (nftables) / chain prefix (iptables) hanet owns
    snat: tuple = ()  # Snat
    metadata: Optional[Metadata] = None
    forward_bridges: tuple = ()  # bridges whose VM traffic the host forwards
    service_bridges: tuple = ()  # bridges where DHCP/DNS input is accepted
    guards: tuple = ()  # PortGuard
    floating: tuple = ()  # FloatingIp
    # bridges whose DHCP replies to VMs get their UDP checksum filled in (dhcp_checksum_fill)
    checksum_fill: tuple = ()
    # ((bridge, public link), ...): hardware-gateway bridges whose frames the host routes
    # (PortGuard.routed_*): what it forwards from them may leave only by the public link
    routed: tuple = ()
    # networks' moving SNAT addresses (snat_address): a TCP packet to one that opens no
    # connection the host knows is dropped, not answered with a reset (a flow the old
    # owner SNATed, before conntrackd or the instance's next packet makes it known here)
    snat_addresses: tuple = ()


@dataclass(frozen=True)
class ConntrackSync:
    """conntrackd on a network host (``ha:conntrack_sync``): the flows of ``accept``
    (the fixed ranges of the networks it serves or stands by for) shared with the other
    network hosts on multicast ``group``:``port`` over ``interface``."""

    interface: str
    group: str
    port: int
    accept: tuple = ()


@dataclass(frozen=True)
class HostState:
    host: str
    bridges: tuple = ()  # Bridge
    sysctls: tuple = ()  # (key, value)
    ruleset: Ruleset = field(default_factory=lambda: Ruleset(driver="nftables", table="hanet"))
    dnsmasqs: tuple = ()  # Dnsmasq
    metadata: Optional[Metadata] = None
    floating_ips: tuple = ()  # FloatingIp
    roles: tuple = ()  # (network, role): serving | standby | member
    instances: tuple = ()  # InstanceRecord for the instances this host serves (metadata service)
    garp_count: int = 0  # gratuitous ARPs per address (re)bound here; 0: send_arp_for_ha is off
    liveness: tuple = ()  # (peer, ((ifname, ip), ...)): network hosts this host watches
    conntrack_sync: Optional[ConntrackSync] = None  # conntrackd (network hosts, ha:conntrack_sync)
    probe: Probe = field(default_factory=Probe)  # how this host probes the peers in ``liveness``
    standby_for: tuple = ()  # (peer, ((ifname, ip), ...)): the gateways and floating IPs it would take over
    orders: bool = False  # a network host of a network-host network: takeover orders come here
    garp_refresh_s: int = 0  # an owner re-announces its gateways and floating IPs this often (0: never)
    order_port: int = 0  # where the master's direct orders come (ha:order_port; 0: none)
    report_port: int = 0  # where the masters hear the beacon's reports directly (ha:report_port; 0: none)
    # what this network host watches of its own links (``_hanet.health``): its uplink, and
    # the segment link (bridge_interface) of each network-host network it is a network host of
    health_uplink: str = ""
    health_segments: tuple = ()  # (network, ifname or "")
    # ((bridge, ip), ...): the dhcp_servers whose owner's MAC this host's frames are
    # readdressed to (PortGuard.routed_via): the beacon learns it (``_hanet.follow``)
    follow: tuple = ()

    def to_dict(self):
        return _plain(dataclasses.asdict(self))


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------- compute

SERVING, STANDBY, MEMBER = "serving", "standby", "member"
NOT_UNICAST = ("224.0.0.0/4", "255.255.255.255/32")  # never taken off a bridge for the host


def compute(cfg, host, owners=None):
    """The desired state of minion ``host`` under the validated ``cfg``.

    ``owners`` maps a network-host network's label to the host that holds it now (the
    failover record); a network missing from it is held by its first network host.
    A host the pillar does not name gets an empty state: hanet removes what it made.
    """
    owners = owners or {}
    me = cfg.hosts.get(host)
    if me is None:
        return HostState(host=host, ruleset=Ruleset(driver=cfg.firewall_driver, table="hanet"))

    public = public_link(cfg, host)
    bridges, dnsmasqs, snat, guards, floating, roles = [], [], [], [], [], []
    nat_floating = []  # floating IPs whose NAT this host holds (serving or hot standby)
    forward, service, meta_bridges, served_instances = [], [], [], {}
    moving_snat = []  # the snat_address of each network this host serves or stands by for
    routed_nh = []  # (bridge, public) of the hardware networks this host serves or stands by for
    follow = []  # (bridge, dhcp_server): the owners whose MAC the beacon follows
    domain = cfg.dhcp_domain
    for label in sorted(cfg.networks):
        if host not in cfg.hosts_carrying(label):
            continue
        net = cfg.networks[label]
        own = me.networks.get(label)
        if net.share_dhcp_address:  # every host carrying it serves it, at the gateway
            own = HostNet(address=net.gateway)
        if net.multi_host:
            role = SERVING if own else MEMBER
            owner = None
        else:
            owner = owners.get(label) or net.network_hosts[0]
            role = SERVING if owner == host else STANDBY if host in net.network_hosts else MEMBER
        roles.append((label, role))

        segment = _segment(net)
        uplink = segment.name if segment else net.bridge_interface
        addresses = []
        if own:
            addresses.append(f"{own.address}/{net.prefixlen}")
        if role == SERVING and not net.multi_host:
            addresses.append(net.service_cidr)
        bridges.append(
            Bridge(
                name=net.bridge,
                network=label,
                uplink=uplink,
                segment=segment,
                mtu=net.mtu,
                addresses=tuple(addresses),
                guarded=(net.service_cidr,) if role == SERVING and not net.multi_host else (),
                shared_mac=net.shared_mac,
            )
        )

        local = [(i, n) for i in cfg.instances.values() for n in i.nics if n.network == label and i.host == host]
        exempt = list(cfg.dmz_cidr) + [net.cidr]
        if cfg.metadata_host != "127.0.0.1":
            exempt.append(f"{cfg.metadata_host}/32")
        # the host serving a VM takes its frames for its floating IP's SNAT: itself in
        # multi_host; with network hosts their owner, whose MAC the beacon follows
        via = net.dhcp_server if net.hardware and not net.multi_host else None
        hybrid = net.hardware and (not net.multi_host or role == SERVING)
        routed_from = sorted({n.ip for i, n in local for f in i.floating_ips if f.fixed_ip == n.ip}) if hybrid else []
        guards.append(
            PortGuard(
                bridge=net.bridge,
                trusted_ports=(uplink,) if uplink else (),
                pairs=tuple(sorted((n.mac, n.ip) for _, n in local)),
                dhcp_isolated=net.multi_host,
                ports=tuple(sorted((n.mac, n.port) for _, n in local if getattr(n, "port", None))),
                local_only=((net.gateway, net.shared_mac),) if net.share_dhcp_address else (),
                routed_from=tuple(routed_from),
                routed_force=tuple(cfg.force_snat_range) if hybrid and local else (),
                routed_exempt=tuple(exempt + list(NOT_UNICAST))
                if hybrid and (routed_from or cfg.force_snat_range) and local
                else (),
                routed_metadata=bool(hybrid and local and cfg.metadata_host == "127.0.0.1"),
            )
        )
        if via and guards[-1].routed:
            guards[-1] = dataclasses.replace(guards[-1], routed_via=via)
            follow.append((net.bridge, via))
        if role == MEMBER:
            continue
        # A standby is hot: it holds the network's rules (SNAT, forward, metadata, the
        # floating IPs' NAT) and the metadata records already, so that a takeover only
        # binds addresses and starts dnsmasq. Rules for addresses it does not hold match
        # nothing.
        serving = role == SERVING

        served = (
            local if net.multi_host else [(i, n) for i in cfg.instances.values() for n in i.nics if n.network == label]
        )
        for inst, _ in served:
            served_instances[inst.name] = inst
        listen = own.address if net.multi_host else net.service_address
        router = net.gateway if net.hardware else listen
        if serving:
            dnsmasqs.append(
                Dnsmasq(
                    network=label,
                    bridge=net.bridge,
                    listen_address=listen,
                    range_start=net.dhcp_start,
                    netmask=net.netmask,
                    lease_time=cfg.dhcp_lease_time,
                    lease_max=net.net.size,
                    domain=domain,
                    router=router,
                    dns_servers=net.dns_servers or cfg.dns_servers,
                    conf_file=cfg.dnsmasq_config_file,
                    user=cfg.dnsmasq_user,
                    mtu=net.mtu if net.mtu != 1500 else None,
                    hosts=tuple(
                        sorted(
                            (
                                DhcpHost(
                                    mac=n.mac,
                                    hostname=f"{i.hostname}.{domain}",
                                    ip=n.ip,
                                    default_route=not (cfg.use_single_default_gateway and n.index != 0),
                                )
                                for i, n in served
                            ),
                            key=lambda h: (h.mac, h.ip),
                        )
                    ),
                    names=tuple(
                        sorted(
                            {
                                (n.ip, f"{i.hostname}.{domain}", i.hostname)
                                for i in cfg.instances.values()
                                for n in i.nics
                                if n.network == label
                            }
                        )
                    ),
                )
            )
        service.append(net.bridge)
        if not net.hardware:
            forward.append(net.bridge)
        elif not net.multi_host:
            # the owner routes what the compute hosts' bridges readdress to it (floating
            # IPs, force_snat_range; PortGuard.routed_via): out of the public link only,
            # never to another network behind the router
            routed_nh.append((net.bridge, public))
        # Hardware gateway too: the bridge hands the VMs' requests for 169.254.169.254 to
        # this host (PortGuard.routed_metadata); a router that routes them to the host
        # serving the VM works as well
        # (docs/segmentation.md), which REDIRECTs it here. A router that DNATs it to the
        # host's address instead breaks: the host answers the VM directly, on the shared L2.
        meta_bridges.append(net.bridge)
        if not net.hardware or cfg.force_snat_range:
            snat.append(
                Snat(
                    network=label,
                    cidr=net.cidr,
                    source=net.snat_address or me.routing_source_ip,
                    out_interface=public,
                    exempt=tuple(exempt),
                    force=cfg.force_snat_range,
                    all_destinations=not net.hardware,
                )
            )
        if net.snat_address:
            # bound like a floating IP (no NAT of its own: the network's SNAT is to it),
            # so it moves with the gateway; a standby's SNAT rule names it already
            moving_snat.append(net.snat_address)
            if serving:
                floating.append(
                    FloatingIp(
                        address=net.snat_address,
                        fixed_ip="",
                        instance="",
                        network=label,
                        public_interface=public,
                        cidr=net.cidr,
                    )
                )
        for inst, nic in served:
            for f in inst.floating_ips:
                if f.fixed_ip == nic.ip:
                    fip = FloatingIp(
                        address=f.address,
                        fixed_ip=f.fixed_ip,
                        instance=inst.name,
                        network=label,
                        public_interface=public,
                        cidr=net.cidr,
                    )
                    nat_floating.append(fip)
                    if serving:
                        floating.append(fip)

    metadata = None
    if meta_bridges or (served_instances and cfg.metadata_host == "127.0.0.1"):
        metadata = Metadata(
            bridges=tuple(meta_bridges),
            host=cfg.metadata_host,
            port=cfg.metadata_port,
            local_service=cfg.metadata_host == "127.0.0.1",
        )
    floating = tuple(sorted(floating, key=lambda f: f.address))
    ruleset = Ruleset(
        driver=cfg.firewall_driver,
        table="hanet",
        snat=tuple(snat),
        metadata=metadata,
        forward_bridges=tuple(forward),
        service_bridges=tuple(service),
        guards=tuple(guards),
        floating=tuple(sorted(nat_floating, key=lambda f: f.address)),
        checksum_fill=tuple(sorted(set(service))) if cfg.dhcp_checksum_fill else (),
        routed=tuple(
            sorted(
                {(g.bridge, public) for g in guards if (g.routed_from or g.routed_force) and not g.routed_via}
                | set(routed_nh)
            )
        ),
        snat_addresses=tuple(sorted(set(moving_snat))),
    )
    sysctls = (("net.ipv4.ip_forward", "1"),) if (forward or floating or snat or routed_nh) else ()
    watch, standby_for = {}, {}
    for label, role in roles:
        net = cfg.networks[label]
        if net.multi_host:
            continue
        for peer in net.network_hosts:
            if peer == host:
                continue
            if role == "standby":  # what moves here with the network: DAD-probed early
                standby_for.setdefault(peer, set()).add((net.bridge, net.service_address))
                standby_for[peer].update((f.public_interface, f.address) for f in nat_floating if f.network == label)
                if net.snat_address:
                    standby_for[peer].add((public, net.snat_address))
            targets = watch.setdefault(peer, set())
            targets.add((net.bridge, cfg.hosts[peer].networks[label].address))
            if cfg.hosts[peer].routing_source_ip:
                targets.add((public, cfg.hosts[peer].routing_source_ip))
    own = sorted(label for label, n in cfg.networks.items() if not n.multi_host and host in n.network_hosts)
    records = tuple(
        InstanceRecord(
            name=i.name,
            uuid=i.uuid,
            hostname=f"{i.hostname}.{domain}",
            ips=tuple(n.ip for n in i.nics),
            public_keys=i.public_keys,
            user_data=i.user_data,
            availability_zone=i.availability_zone,
        )
        for _, i in sorted(served_instances.items())
    )
    return HostState(
        host=host,
        bridges=tuple(bridges),
        sysctls=sysctls,
        ruleset=ruleset,
        dnsmasqs=tuple(dnsmasqs),
        metadata=metadata,
        floating_ips=floating,
        roles=tuple(roles),
        instances=records,
        garp_count=cfg.send_arp_for_ha_count if cfg.send_arp_for_ha else 0,
        liveness=tuple((p, tuple(sorted(t))) for p, t in sorted(watch.items())),
        probe=cfg.ha.probe,
        standby_for=tuple((p, tuple(sorted(t))) for p, t in sorted(standby_for.items())),
        orders=bool(own),
        garp_refresh_s=cfg.ha.garp_refresh_s if own else 0,
        order_port=cfg.ha.order_port if own else 0,
        report_port=cfg.ha.report_port if watch else 0,
        health_uplink=public if own else "",
        health_segments=tuple((label, cfg.networks[label].bridge_interface or "") for label in own),
        follow=tuple(sorted(set(follow))),
        conntrack_sync=ConntrackSync(
            interface=cfg.ha.conntrack_sync.interface,
            group=cfg.ha.conntrack_sync.group,
            port=cfg.ha.conntrack_sync.port,
            accept=tuple(sorted({cfg.networks[label].cidr for label in own})),
        )
        if own and cfg.ha.conntrack_sync
        else None,
    )


def public_link(cfg, host):
    """The link that carries ``host``'s public address: its ``public_interface``, or the
    bridge that interface is the flat uplink of (a host with one NIC: the bridge takes
    the uplink's addresses and routes over when it enslaves it, ``links.carry``)."""
    me = cfg.hosts[host]
    for label in sorted(cfg.networks):
        net = cfg.networks[label]
        if net.bridge_interface == me.public_interface and _segment(net) is None and host in cfg.hosts_carrying(label):
            return net.bridge
    return me.public_interface


def _segment(net):
    if net.vlan is not None:
        return Segment(kind="vlan", name=f"vlan{net.vlan}", parent=net.bridge_interface, vlan_id=net.vlan, mtu=net.mtu)
    if net.vxlan is not None:
        return Segment(
            kind="vxlan",
            name=f"vx{net.vxlan.vni}",
            parent=net.bridge_interface,
            vni=net.vxlan.vni,
            group=net.vxlan.group,
            remotes=net.vxlan.remotes,
            port=net.vxlan.port,
            mtu=net.mtu,
        )
    return None
