"""A hanet pillar that matches the default lab topology (interface names, hosts, VMs).

It follows /work/shared/contract/pillar.example.sls, adapted to what the lab can carry:
802.1Q is missing from this kernel, so instead of VLAN networks the hardware-gateway
network ``hw`` is flat on its own segment (eth4 <-> the router's eth1, 172.16.100.1).

    networks  private  192.168.0.0/24  br100 on eth1  multi_host (compute hosts)
              shared   10.20.0.0/24    br200 on eth3  network_hosts [net1, net2]
              hw       172.16.100.0/24 br300 on eth4  multi_host, gateway_mode hardware

:func:`standby_pillar` is another shape: many network-host networks, all served by
net1 with net2 standing by for every one of them (the reliability tests and the
failover-cycles benchmark).
"""

from __future__ import annotations

import copy

from .topology import Topology

_NETWORKS = {
    "private": {
        "cidr": "192.168.0.0/24",
        "bridge": "br100",
        "bridge_interface": "eth1",
        "multi_host": True,
        "gateway": "192.168.0.1",
    },
    "shared": {
        "cidr": "10.20.0.0/24",
        "bridge": "br200",
        "bridge_interface": "eth3",
        "multi_host": False,
        "gateway": "10.20.0.1",
        "network_hosts": ["net1", "net2"],
    },
    "hw": {
        "cidr": "172.16.100.0/24",
        "bridge": "br300",
        "bridge_interface": "eth4",
        "multi_host": True,
        "gateway_mode": "hardware",
        "gateway": "172.16.100.1",
    },
}

# host -> {network: address}
_HOST_NETS = {
    "compute1": {"private": "192.168.0.3", "hw": "172.16.100.3"},
    "compute2": {"private": "192.168.0.4", "hw": "172.16.100.4"},
    "net1": {"shared": "10.20.0.2"},
    "net2": {"shared": "10.20.0.3"},
}

_INSTANCES = {
    "web1": {
        "host": "compute1",
        "nics": [{"network": "private", "mac": "fa:16:3e:00:00:01", "ip": "192.168.0.10"}],
        "floating_ips": ["203.0.113.50"],
    },
    "db1": {"host": "compute2", "nics": [{"network": "private", "mac": "fa:16:3e:00:00:02", "ip": "192.168.0.11"}]},
    "app1": {"host": "compute1", "nics": [{"network": "shared", "mac": "fa:16:3e:00:01:01", "ip": "10.20.0.10"}]},
    "hw1": {
        "host": "compute2",
        "nics": [{"network": "hw", "mac": "fa:16:3e:00:02:01", "ip": "172.16.100.10"}],
        "floating_ips": [{"address": "203.0.113.51", "fixed_ip": "172.16.100.10"}],
    },
}


def lab_pillar(topology: Topology) -> dict:
    """``{'hanet': {...}}`` for the hosts and VMs present in a default-shaped topology."""
    hosts = {}
    for name, host in topology.hosts.items():
        nets = _HOST_NETS.get(name)
        if nets is None:
            continue
        src = host.first_address("eth0")
        hosts[name] = {
            "public_interface": "eth0",
            "routing_source_ip": src,
            "networks": {n: {"address": a} for n, a in nets.items()},
        }
    nets = {}
    for net, spec in _NETWORKS.items():
        servers = [h for h, cfg in hosts.items() if net in cfg["networks"]]
        if not servers:
            continue
        spec = copy.deepcopy(spec)
        if "network_hosts" in spec:
            spec["network_hosts"] = [h for h in spec["network_hosts"] if h in hosts]
        nets[net] = spec
    instances = {}
    for name, inst in _INSTANCES.items():
        vm = topology.vms.get(name)
        if vm is None or inst["host"] not in hosts:
            continue
        if not all(n["network"] in nets for n in inst["nics"]):
            continue
        inst = copy.deepcopy(inst)
        inst["host"] = vm.host
        instances[name] = inst
    return {"hanet": {"send_arp_for_ha": True, "networks": nets, "hosts": hosts, "instances": instances}}


def standby_networks(count: int) -> dict:
    """``{label: (cidr prefix, vni, bridge, floating IP)}`` of :func:`standby_pillar`'s
    networks: m1 10.30.1.0/24 vni 5301 br301 203.0.113.71, m2 ..."""
    return {f"m{i}": (f"10.30.{i}", 5300 + i, f"br3{i:02d}", f"203.0.113.{70 + i}") for i in range(1, count + 1)}


def standby_pillar(
    topology: Topology, count: int = 8, network_hosts=("net1", "net2"), instance_host: str = "compute1"
) -> dict:
    """``{'hanet': {...}}`` with ``count`` network-host networks (multi_host false,
    ``network_hosts`` in order: the first serves, the others stand by), each on its own
    VXLAN segment over eth2 (this kernel has no 802.1Q; the trunk segment carries every
    VNI, with head-end replication to every host's eth2 address), gateway .1, network
    hosts .2, .3, ...; and per network one instance ``vm<i>`` on ``instance_host`` with
    fixed IP .10 and a floating IP (see :func:`standby_networks`). The instances need
    no VM namespace: what is checked is where the gateways and floating IPs are bound."""
    carriers = [*network_hosts, instance_host]
    underlay = sorted(topology.hosts[h].first_address("eth2") for h in carriers)
    hosts = {
        h: {"public_interface": "eth0", "routing_source_ip": topology.hosts[h].first_address("eth0"), "networks": {}}
        for h in carriers
    }
    nets, instances = {}, {}
    for i, (label, (prefix, vni, bridge, fip)) in enumerate(standby_networks(count).items(), 1):
        nets[label] = {
            "cidr": f"{prefix}.0/24",
            "bridge": bridge,
            "bridge_interface": "eth2",
            "vxlan": {"vni": vni, "remotes": underlay},
            "mtu": 1450,
            "multi_host": False,
            "gateway": f"{prefix}.1",
            "network_hosts": list(network_hosts),
        }
        for k, h in enumerate(network_hosts, 2):
            hosts[h]["networks"][label] = {"address": f"{prefix}.{k}"}
        instances[f"vm{i}"] = {
            "host": instance_host,
            "floating_ips": [fip],
            "nics": [{"network": label, "mac": f"fa:16:3e:00:30:{i:02x}", "ip": f"{prefix}.10"}],
        }
    return {"hanet": {"send_arp_for_ha": True, "networks": nets, "hosts": hosts, "instances": instances}}
