"""VXLAN-segmented networks with hardware gateways, end to end in the namespace lab:
the contract's red/green/blue networks, one hardware router each.

    underlay seg-trunk 198.51.100.0/24:  compute1 .11, compute2 .12 (eth2),
                                         rred .31, rgreen .32, rblue .33 (eth0)
    red    172.16.100.0/24  vni 5100, remotes (unicast head-end replication)  br101
    green  172.16.101.0/24  vni 5101, remotes                                 br102
    blue   172.16.102.0/24  vni 5102, multicast group 239.1.1.102             br103

    compute1  red .3, blue .3     red1 172.16.100.10, blue1 172.16.102.30
    compute2  green .4, blue .4   green1 172.16.101.20, blue2 172.16.102.31
    rred/rgreen/rblue: .1 on their segment (a VXLAN endpoint in the router's namespace,
    built here the way a switch or router vendor's VTEP would be), eth1 on the public
    segment (203.0.113.31-33), default route via the upstream router 203.0.113.1, which
    routes each segment back to its router. No NAT anywhere but on the hosts.

Every network is ``gateway_mode: hardware``: the hosts run DHCP (and floating-IP NAT) but do
not route or SNAT the VMs' traffic; dnsmasq hands out the network's router. What is checked
is what a user checks: each VM's default route is its own network's router, it reaches it,
its traffic reaches upstream with its own address (not the host's routing_source_ip), the
segments are isolated at L2, and the VM gets its own metadata (the host serving it takes
the request off the bridge; the routers also carry the docs/segmentation.md routing recipe
for a central metadata host, which these requests then never reach).

The same result with a ``dnsmasq_config_file`` holding nova's recipe lines instead of the
pillar's ``gateway_mode: hardware``; and an end-to-end VLAN test that runs where the kernel
has 802.1Q (skipped here, with the reason).
"""

import re
import subprocess

import pytest
from hanet_checks import changes_of, state_apply as _state_apply

pytestmark = pytest.mark.lab

UPSTREAM = "203.0.113.1"
HOSTS = ["compute1", "compute2"]
SOURCE_IP = {"compute1": "203.0.113.11", "compute2": "203.0.113.12"}
UNDERLAY = {"compute1": "198.51.100.11", "compute2": "198.51.100.12"}
NETS = {
    # label: (cidr prefix, vni, bridge, router, router underlay, router public, mode)
    "red": ("172.16.100", 5100, "br101", "rred", "198.51.100.31", "203.0.113.31", "remotes"),
    "green": ("172.16.101", 5101, "br102", "rgreen", "198.51.100.32", "203.0.113.32", "remotes"),
    "blue": ("172.16.102", 5102, "br103", "rblue", "198.51.100.33", "203.0.113.33", "group"),
}
GROUP = "239.1.1.102"
HOST_NETS = {"compute1": {"red": 3, "blue": 3}, "compute2": {"green": 4, "blue": 4}}
VMS = {  # vm: (host, network, last octet, mac)
    "red1": ("compute1", "red", 10, "fa:16:3e:00:10:01"),
    "green1": ("compute2", "green", 20, "fa:16:3e:00:10:02"),
    "blue1": ("compute1", "blue", 30, "fa:16:3e:00:10:03"),
    "blue2": ("compute2", "blue", 31, "fa:16:3e:00:10:04"),
}
MTU = 1450  # VXLAN over a 1500-byte underlay


def vm_ip(vm):
    return f"{NETS[VMS[vm][1]][0]}.{VMS[vm][2]}"


def router_ip(net):
    return f"{NETS[net][0]}.1"


def host_ip(host, net):
    return f"{NETS[net][0]}.{HOST_NETS[host][net]}"


@pytest.fixture(scope="module")
def lab_topology():
    from hanet_lab.topology import VM, Nic, Router, default_topology

    topo = default_topology(hosts=2, vms=False, hardware_router=False)
    up = topo.routers["router"]
    for _net, (prefix, _, _bridge, rname, under, public, _) in NETS.items():
        up.routes.append({"dst": f"{prefix}.0/24", "via": public})
        topo.routers[rname] = Router(
            name=rname,
            links={"eth0": "seg-trunk", "eth1": "public"},
            addresses={"eth0": [f"{under}/24"], "eth1": [f"{public}/24"]},
            gateway=UPSTREAM,
        )
    for vm, (host, net, _, mac) in VMS.items():
        topo.vms[vm] = VM(name=vm, host=host, nics=[Nic(bridge=NETS[net][2], mac=mac)])
    topo.validate()
    return topo


def make_pillar(hardware=True, conf_file=""):
    nets = {}
    for net, (prefix, vni, bridge, _, under, _, mode) in NETS.items():
        vx = {"vni": vni}
        if mode == "group":
            vx["group"] = GROUP
        else:  # every VTEP of the segment, this host's own address included: hanet skips it
            vx["remotes"] = sorted([*UNDERLAY.values(), under])
        spec = {
            "cidr": f"{prefix}.0/24",
            "vxlan": vx,
            "bridge": bridge,
            "bridge_interface": "eth2",
            "multi_host": True,
            "mtu": MTU,
            "gateway": router_ip(net),
        }
        if hardware:
            spec["gateway_mode"] = "hardware"
        nets[net] = spec
    hanet = {
        "send_arp_for_ha": True,
        "networks": nets,
        "hosts": {
            h: {
                "public_interface": "eth0",
                "routing_source_ip": SOURCE_IP[h],
                "networks": {n: {"address": host_ip(h, n)} for n in HOST_NETS[h]},
            }
            for h in HOSTS
        },
        "instances": {
            vm: {"host": host, "nics": [{"network": net, "mac": mac, "ip": vm_ip(vm)}]}
            for vm, (host, net, _, mac) in VMS.items()
        },
    }
    if conf_file:
        hanet["dnsmasq_config_file"] = conf_file
    return {"hanet": hanet}


def state_apply(lab, tgt=HOSTS, test=False, timeout=240):
    return _state_apply(lab, tgt, test=test, timeout=timeout)


def sh(lab, node, cmd):
    cp = lab.exec(node, cmd)
    assert cp.returncode == 0, f"{node}: {cmd}: {cp.stderr}"
    return cp.stdout


def get(lab, node, url, timeout=3):
    cp = lab.exec(node, ["curl", "-sS", "--max-time", str(timeout), url], timeout=timeout + 10)
    return cp.stdout.strip() if cp.returncode == 0 else None


def metadata_routes(net):
    """The docs/segmentation.md recipe for a hardware router, as ip commands: route
    169.254.169.254 to the host that serves the asking VM (one table per host, chosen by
    the VM's source address). The host's hanet ruleset REDIRECTs it to its metadata service."""
    cmds = []
    for i, host in enumerate(h for h in HOSTS if net in HOST_NETS[h]):
        table = 100 + i
        cmds.append(f"ip route replace 169.254.169.254/32 via {host_ip(host, net)} table {table}")
        for vm, (vhost, vnet, _, _) in VMS.items():
            if vhost == host and vnet == net:
                cmds.append(f"{{ ip rule del from {vm_ip(vm)} to 169.254.169.254 2>/dev/null; true; }}")
                cmds.append(f"ip rule add from {vm_ip(vm)} to 169.254.169.254 table {table}")
    return cmds


@pytest.fixture(scope="module")
def routers(lab):
    """Each hardware router's VTEP: a VXLAN link on its underlay with the router's address."""
    for net, (prefix, vni, _, rname, under, _, mode) in NETS.items():
        link = f"ip link add vx{vni} type vxlan id {vni} dstport 4789 dev eth0 local {under}"
        if mode == "group":
            link += f" group {GROUP}"
        cmds = [f"{{ ip link del vx{vni} 2>/dev/null; true; }}", link]
        if mode == "remotes":
            cmds += [f"bridge fdb append 00:00:00:00:00:00 dev vx{vni} dst {u}" for u in UNDERLAY.values()]
        cmds += [f"ip addr add {prefix}.1/24 dev vx{vni}", f"ip link set vx{vni} up"]
        cmds += metadata_routes(net)
        sh(lab, rname, " && ".join(cmds))
    return True


@pytest.fixture(scope="module")
def applied(lab, routers):
    lab.set_pillar(make_pillar())
    state_apply(lab)
    for vm in VMS:
        lab.unplug_vm(vm)  # (a no-op in a fresh lab)
        lab.plug_vm(vm)
    state_apply(lab)
    return True


def leases(lab, client):
    return {vm: lab.dhcp(vm, client=client) for vm in VMS}


@pytest.mark.parametrize("client", ["dhclient", "udhcpc"])
def test_each_vm_gets_its_own_networks_router(lab, applied, client):
    got = leases(lab, client)
    for vm, lease in got.items():
        host, net = VMS[vm][0], VMS[vm][1]
        assert lease["address"] == vm_ip(vm), lease
        assert lease["routers"] == [router_ip(net)], (vm, lease)
        assert lease["server"] == host_ip(host, net), (vm, lease)
        assert lease["mtu"] == MTU, (vm, lease)
        route = sh(lab, vm, "ip -4 route show default").split()
        assert route[:3] == ["default", "via", router_ip(net)], (vm, route)


def test_vms_reach_their_router_and_upstream_with_their_own_address(lab, applied):
    leases(lab, "udhcpc")
    for vm, (_host, net, _, _) in VMS.items():
        assert lab.ping(vm, router_ip(net), count=2), vm
        assert get(lab, vm, f"http://{router_ip(net)}/") == f"router {NETS[net][3]}"
        # through the hardware router to the upstream router: no SNAT on the host
        assert get(lab, vm, f"http://{UPSTREAM}/whoami") == vm_ip(vm), vm
    # the hosts' rulesets neither SNAT nor forward these networks
    for host in HOSTS:
        rules = sh(lab, host, "nft list ruleset")
        assert "snat" not in rules and "masquerade" not in rules, rules
        assert not re.search(r"iifname .*br10[123].* accept", rules.split("chain forward")[-1].split("}")[0])


def test_segments_are_isolated(lab, applied):
    """Same host, different VNIs: red1 cannot even ARP blue's router; blue1 can; and blue1
    (compute1) and blue2 (compute2) share an L2 segment across hosts (the multicast VNI)."""
    leases(lab, "udhcpc")

    def arping(vm, ip):
        return lab.exec(vm, ["arping", "-c", "2", "-w", "2", "-I", "eth0", ip]).returncode == 0

    assert arping("blue1", router_ip("blue"))
    assert not arping("red1", router_ip("blue"))
    assert not arping("red1", router_ip("green"))
    assert arping("blue1", vm_ip("blue2"))
    assert lab.ping("blue1", vm_ip("blue2"), count=2)


@pytest.mark.parametrize("vm", list(VMS))
def test_metadata_on_a_hardware_gateway_network(lab, applied, vm):
    leases(lab, "udhcpc")
    assert get(lab, vm, "http://169.254.169.254/latest/meta-data/hostname") == f"{vm}.novalocal"
    assert get(lab, vm, "http://169.254.169.254/latest/meta-data/local-ipv4") == vm_ip(vm)


def test_second_apply_changes_nothing(lab, applied):
    assert changes_of(state_apply(lab)) == {}


def nova_recipe(path):
    """nova-network's documented dnsmasq_config_file recipe for per-network routers."""
    lines = [f"dhcp-option=tag:'{net}',option:router,{router_ip(net)}" for net in NETS]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def test_dnsmasq_config_file_gives_the_same_routers(lab, applied):
    """Networks in host gateway mode plus a user file with nova's recipe lines: each VM
    still gets its own network's router (the user's option overrides the host's own)."""
    import os

    conf = nova_recipe(os.path.join(lab.rundir, "dnsmasq-routers.conf"))
    lab.set_pillar(make_pillar(hardware=False, conf_file=conf))
    try:
        res = changes_of(state_apply(lab, test=True))
        assert set(res) == set(HOSTS) and all("dnsmasq" in res[h] for h in HOSTS), res
        state_apply(lab)
        for client in ("dhclient", "udhcpc"):
            for vm, lease in leases(lab, client).items():
                assert lease["routers"] == [router_ip(VMS[vm][1])], (client, vm, lease)
        assert changes_of(state_apply(lab)) == {}
        for vm, (_host, net, _, _) in VMS.items():
            assert get(lab, vm, f"http://{router_ip(net)}/") == f"router {NETS[net][3]}"
    finally:
        lab.set_pillar(make_pillar())
        state_apply(lab)
    # negative: without the file, host mode hands out the host's own address
    lab.set_pillar(make_pillar(hardware=False))
    try:
        state_apply(lab)
        lease = lab.dhcp("red1", client="udhcpc")
        assert lease["routers"] == [host_ip("compute1", "red")], lease
    finally:
        lab.set_pillar(make_pillar())
        state_apply(lab)


def test_test_mode_and_clean_removal(lab, applied):
    """Removing the blue network (and its VMs) from the pillar: test=True changes nothing,
    then the apply removes the bridge, the VXLAN link, dnsmasq and the addresses; a second
    apply changes nothing; the other segments still work."""
    pillar = make_pillar()
    del pillar["hanet"]["networks"]["blue"]
    for h in HOSTS:
        pillar["hanet"]["hosts"][h]["networks"].pop("blue", None)
    for vm in ("blue1", "blue2"):
        del pillar["hanet"]["instances"][vm]
    links_before = {h: sorted(lab.links(h)) for h in HOSTS}
    lab.set_pillar(pillar)
    try:
        res = changes_of(state_apply(lab, test=True))
        assert all({"links", "dnsmasq"} <= set(res[h]) for h in HOSTS), res
        assert {h: sorted(lab.links(h)) for h in HOSTS} == links_before
        state_apply(lab)
        for h in HOSTS:
            links = lab.links(h)
            assert "br103" not in links and "vx5102" not in links, links
            assert not any(a.startswith("172.16.102.") for a in lab.addresses(h)), lab.addresses(h)
            procs = " ".join(c for _, c in lab.processes(h)[h])
            assert "br103" not in procs and "blue" not in procs, procs
        assert changes_of(state_apply(lab)) == {}
        assert lab.ping("red1", router_ip("red"), count=1)
    finally:
        lab.set_pillar(make_pillar())
        state_apply(lab)
        for vm in ("blue1", "blue2"):  # their taps left the deleted bridge: plug them anew
            lab.unplug_vm(vm)
            lab.plug_vm(vm)
        state_apply(lab)
    lease = lab.dhcp("blue2", client="udhcpc")
    assert lease["routers"] == [router_ip("blue")]
    assert get(lab, "blue2", f"http://{UPSTREAM}/whoami") == vm_ip("blue2")


def _have_8021q():
    """None when this kernel can make an 802.1Q link, else the reason it cannot."""
    ns = "hanet-vlan-probe"
    try:
        subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
        cp = subprocess.run(
            ["ip", "-n", ns, "link", "add", "link", "lo", "name", "v7", "type", "vlan", "id", "7"],
            capture_output=True,
            text=True,
        )
        return None if cp.returncode == 0 else f"this kernel has no 802.1Q VLAN support ({cp.stderr.strip()})"
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.mark.vlan
def test_vlan_network_end_to_end(lab_factory):
    """A VLAN network (vlan101 on eth2, in br101) with a hardware router on the same trunk
    that tags its side too: the VM gets the router and reaches upstream with its own address."""
    reason = _have_8021q()
    if reason:
        pytest.skip(reason)
    from hanet_lab.topology import VM, Nic, Router, default_topology

    topo = default_topology(hosts=1, vms=False, hardware_router=False)
    topo.routers["router"].routes.append({"dst": "172.16.100.0/24", "via": "203.0.113.31"})
    topo.routers["rred"] = Router(
        name="rred",
        links={"eth0": "seg-trunk", "eth1": "public"},
        addresses={"eth1": ["203.0.113.31/24"]},
        gateway=UPSTREAM,
    )
    topo.vms["red1"] = VM(name="red1", host="compute1", nics=[Nic(bridge="br101", mac="fa:16:3e:00:10:01")])
    lab = lab_factory(topo)
    sh(
        lab,
        "rred",
        "ip link add link eth0 name vlan101 type vlan id 101 && "
        "ip addr add 172.16.100.1/24 dev vlan101 && ip link set vlan101 up",
    )
    pillar = {
        "hanet": {
            "networks": {
                "red": {
                    "cidr": "172.16.100.0/24",
                    "vlan": 101,
                    "bridge": "br101",
                    "bridge_interface": "eth2",
                    "multi_host": True,
                    "gateway_mode": "hardware",
                    "gateway": "172.16.100.1",
                }
            },
            "hosts": {
                "compute1": {
                    "public_interface": "eth0",
                    "routing_source_ip": "203.0.113.11",
                    "networks": {"red": {"address": "172.16.100.3"}},
                }
            },
            "instances": {
                "red1": {
                    "host": "compute1",
                    "nics": [{"network": "red", "mac": "fa:16:3e:00:10:01", "ip": "172.16.100.10"}],
                }
            },
        }
    }
    lab.set_pillar(pillar)
    state_apply(lab, ["compute1"])
    assert "vlan101" in lab.links("compute1")
    lab.plug_vm("red1")
    state_apply(lab, ["compute1"])
    lease = lab.dhcp("red1", client="udhcpc")
    assert (lease["address"], lease["routers"]) == ("172.16.100.10", ["172.16.100.1"]), lease
    assert get(lab, "red1", f"http://{UPSTREAM}/whoami") == "172.16.100.10"
    assert changes_of(state_apply(lab, ["compute1"])) == {}
