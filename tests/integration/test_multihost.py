"""multi_host and network-host networks, applied by `state.apply hanet` through a real
salt-master to real minions (the namespace lab, default topology):

    compute1  br100 192.168.0.3  (private, multi_host)   web1 192.168.0.10 (floating 203.0.113.50)
              br200 member of `shared`                   app1 10.20.0.10 (shared)
    compute2  br100 192.168.0.4  (private, multi_host)   db1  192.168.0.11
    net1      br200 10.20.0.2 + gateway 10.20.0.1 (shared: network_hosts [net1, net2])
    net2      br200 10.20.0.3 (standby)
    router    203.0.113.1, answers GET /whoami with the source address it saw

Every VM runs dhclient and udhcpc for real, and checks what a user would check: its
address, router, DHCP server, its egress address as the upstream router sees it, and
its own metadata.
"""

import json
import os
import time

import pytest
from hanet_checks import sniff, state_apply

pytestmark = pytest.mark.lab

UUIDS = {
    "web1": "11111111-1111-4111-8111-111111111111",
    "db1": "22222222-2222-4222-8222-222222222222",
    "app1": "33333333-3333-4333-8333-333333333333",
}
HOST_ADDR = {"compute1": "192.168.0.3", "compute2": "192.168.0.4"}
SOURCE_IP = {"compute1": "203.0.113.11", "compute2": "203.0.113.12", "net1": "203.0.113.21"}
ROUTER = "203.0.113.1"


@pytest.fixture(scope="module")
def lab_topology():
    from hanet_lab import default_topology

    return default_topology(hosts=4)


def changes_of(res):
    return {m: {k: v["changes"] for k, v in ret.items() if v["changes"]} for m, ret in res.items()}


@pytest.fixture(scope="module")
def pillar(lab):
    """The lab pillar (with known uuids, keys and user-data), applied; VMs plugged, and
    applied again so that the bridge guards name their ports."""
    from hanet_lab.pillar import lab_pillar

    p = lab_pillar(lab.topology)
    for name, uuid in UUIDS.items():
        inst = p["hanet"]["instances"][name]
        inst["uuid"] = uuid
        inst["public_keys"] = {f"{name}-key": f"ssh-ed25519 AAAA{name} {name}@example"}
        inst["user_data"] = f"#cloud-config\nhostname: {name}\n"
    lab.set_pillar(p)
    # the first apply binds shared's gateway on net1: what crosses the segment is heard
    # on net2's link to it (eth3), for test_the_apply_that_binds_the_gateway_announces_it
    with sniff(lab, "net2", "eth3", "arp") as seen:
        FIRST_APPLY["result"] = state_apply(lab)
    FIRST_APPLY["arp"] = seen
    for vm in ("web1", "db1", "app1"):
        lab.plug_vm(vm)
    state_apply(lab)
    return p["hanet"]


FIRST_APPLY = {}  # the pillar fixture's first highstate: its result and the ARP heard


def forget_lease(lab, vm):
    """Make dhclient start over (DISCOVER) instead of re-requesting its remembered lease."""
    try:
        os.unlink(os.path.join(lab.rundir, "vms", vm, "dhclient-eth0.leases"))
    except FileNotFoundError:
        pass


def dnsmasq_log(lab, host, network):
    with open(os.path.join(lab.minion_root(host), "var/lib/hanet/dnsmasq", f"{network}.log")) as f:
        return f.read()


# --------------------------------------------------------------------------- DHCP


@pytest.mark.parametrize("client", ["dhclient", "udhcpc"])
@pytest.mark.parametrize("vm,host", [("web1", "compute1"), ("db1", "compute2")])
def test_multi_host_vm_gets_its_lease_from_its_own_host(lab, pillar, vm, host, client):
    lease = lab.dhcp(vm, client)
    nic = pillar["instances"][vm]["nics"][0]
    assert lease["address"] == nic["ip"]
    assert lease["prefixlen"] == 24
    assert lease["router"] == HOST_ADDR[host]  # its own host, not the network's nominal gateway
    assert lease["routers"] == [HOST_ADDR[host]]
    assert lease["server"] == HOST_ADDR[host]
    assert lease["domain"] == "novalocal"
    assert f"{nic['ip']}/24" in lab.addresses(vm, "eth0")
    # the VM can reach its router
    assert lab.ping(vm, HOST_ADDR[host], count=3)


def test_no_offer_crosses_hosts(lab, pillar):
    """web1 (compute1) hears offers only from compute1; compute2's dnsmasq never hears web1.

    Control first: without the bridge guards, web1's discover does reach compute2 (so the
    log check below could fail)."""
    web1_mac = pillar["instances"]["web1"]["nics"][0]["mac"]
    for h in ("compute1", "compute2"):
        lab.exec(h, "nft delete table bridge hanet", check=True)
    try:
        lab.dhcp("web1", "udhcpc")
        deadline = time.monotonic() + 5
        while web1_mac not in dnsmasq_log(lab, "compute2", "private") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert web1_mac in dnsmasq_log(lab, "compute2", "private"), "control: discover did not cross"
    finally:
        res = state_apply(lab, ["compute1", "compute2"])
    for h in ("compute1", "compute2"):  # the apply put the guards back
        assert "ruleset" in json.dumps(changes_of(res)[h]), changes_of(res)
    before = dnsmasq_log(lab, "compute2", "private").count(web1_mac)

    for client in ("udhcpc", "dhclient"):
        forget_lease(lab, "web1")  # start from DISCOVER, so that offers are made
        with sniff(lab, "web1", "eth0", "udp port 67 or udp port 68", verbose=True) as seen:
            lease = lab.dhcp("web1", client)
        assert lease["server"] == "192.168.0.3"
        text = "\n".join(seen)
        offers = text.count("DHCP-Message (53), length 1: Offer")
        assert offers >= 1, text
        server_ids = [ln.split(":")[-1].strip() for ln in seen if "Server-ID (54)" in ln]
        assert server_ids and set(server_ids) == {"192.168.0.3"}, text
        assert "192.168.0.4" not in text
    time.sleep(0.5)
    assert dnsmasq_log(lab, "compute2", "private").count(web1_mac) == before
    # and compute1's dnsmasq did answer web1, so the log check above can see a MAC
    assert f"DHCPACK(br100) 192.168.0.10 {web1_mac}" in dnsmasq_log(lab, "compute1", "private")


# --------------------------------------------------------------------------- egress


def test_egress_snat_to_own_hosts_routing_source_ip(lab, pillar):
    lab.dhcp("db1", "udhcpc")
    lab.dhcp("web1", "dhclient")
    # db1 has no floating IP: the router sees compute2's routing_source_ip
    assert pillar["hosts"]["compute2"]["routing_source_ip"] == SOURCE_IP["compute2"]
    assert lab.http_get("db1", f"http://{ROUTER}/whoami").strip() == SOURCE_IP["compute2"]
    # web1 has a floating IP: it leaves with it
    assert pillar["instances"]["web1"]["floating_ips"] == ["203.0.113.50"]
    assert lab.http_get("web1", f"http://{ROUTER}/whoami").strip() == "203.0.113.50"
    log = lab.router_log()
    assert (SOURCE_IP["compute2"], "GET", "/whoami") in log
    assert ("203.0.113.50", "GET", "/whoami") in log
    assert not any(ip.startswith("192.168.") for ip, _, _ in log)  # never a fixed IP
    assert lab.ping("db1", ROUTER)


# --------------------------------------------------------------------------- metadata


@pytest.mark.parametrize("vm", ["web1", "db1", "app1"])
def test_metadata_is_the_vms_own(lab, pillar, vm):
    lab.dhcp(vm, "udhcpc")
    md = json.loads(lab.http_get(vm, "http://169.254.169.254/openstack/latest/meta_data.json"))
    assert md["uuid"] == UUIDS[vm]
    assert md["hostname"] == f"{vm}.novalocal"
    assert md["name"] == vm
    assert md["public_keys"] == {f"{vm}-key": f"ssh-ed25519 AAAA{vm} {vm}@example"}
    others = set(UUIDS) - {vm}
    for other in others:
        assert other not in json.dumps(md)
    assert lab.http_get(vm, "http://169.254.169.254/openstack/latest/user_data") == f"#cloud-config\nhostname: {vm}\n"
    # EC2 paths
    ec2 = "http://169.254.169.254/latest/meta-data"
    assert lab.http_get(vm, f"{ec2}/hostname").strip() == f"{vm}.novalocal"
    iid = lab.http_get(vm, f"{ec2}/instance-id").strip()
    assert iid.startswith("i-") and iid[2:] == UUIDS[vm].split("-")[0]
    assert lab.http_get(vm, f"{ec2}/local-ipv4").strip() == pillar["instances"][vm]["nics"][0]["ip"]
    assert f"{vm}-key" in lab.http_get(vm, f"{ec2}/public-keys/")


# --------------------------------------------------------------------------- DNS


def test_every_host_resolves_every_instance_of_the_network(lab, pillar):
    """nova's update_dns_entries: web1 (compute1) and db1 (compute2) each ask their own
    host's dnsmasq for the other, which that dnsmasq never leased."""
    lab.dhcp("web1", "udhcpc")
    lab.dhcp("db1", "udhcpc")
    assert lab.resolve("web1", "db1.novalocal", HOST_ADDR["compute1"]) == ["192.168.0.11"]
    assert lab.resolve("db1", "web1.novalocal", HOST_ADDR["compute2"]) == ["192.168.0.10"]
    # and its own lease's name, as before
    assert lab.resolve("web1", "web1.novalocal", HOST_ADDR["compute1"]) == ["192.168.0.10"]


# --------------------------------------------------------------------------- network host


@pytest.mark.parametrize("client", ["dhclient", "udhcpc"])
def test_network_host_serves_app1(lab, pillar, client):
    """app1 sits on compute1 (a member of `shared`), its network is served by net1."""
    assert pillar["networks"]["shared"]["network_hosts"] == ["net1", "net2"]
    lease = lab.dhcp("app1", client)
    assert lease["address"] == "10.20.0.10"
    assert lease["router"] == "10.20.0.1"  # the network's gateway, held by net1
    assert lease["server"] == "10.20.0.1"
    assert "10.20.0.1/24" in lab.addresses("net1", "br200")
    assert "10.20.0.1/24" not in lab.addresses("net2", "br200")
    assert "10.20.0.10" in dnsmasq_log(lab, "net1", "shared")
    # compute1 and the standby run no dnsmasq for shared
    for h in ("compute1", "net2"):
        assert not any("dnsmasq" in cl and "shared" in cl for _, cl in lab.processes(h)[h])
    # egress through net1: the router sees net1's routing_source_ip
    assert lab.http_get("app1", f"http://{ROUTER}/whoami").strip() == SOURCE_IP["net1"]
    # and the packet really went through net1 (its ARP cache knows app1)
    assert lab.arp_cache("net1").get("10.20.0.10", {}).get("mac") == "fa:16:3e:00:01:01"


def test_the_apply_that_binds_the_gateway_announces_it(lab, pillar):
    """nova's send_arp_for_ha on a plain apply (not only in a takeover): the highstate
    that binds shared's gateway on net1 (after duplicate address detection) announces it
    with send_arp_for_ha_count rounds of gratuitous ARP, heard on the segment."""
    assert pillar["send_arp_for_ha"] is True
    links = changes_of(FIRST_APPLY["result"])["net1"]["hanet_|-hanet-links_|-hanet-links_|-links"]["links"]
    assert "announced 10.20.0.1 on br200 (3 gratuitous ARP rounds)" in links, links
    mac = lab.exec("net1", "cat /sys/class/net/br200/address", check=True).stdout.strip()
    garps = [ln for ln in FIRST_APPLY["arp"] if "who-has 10.20.0.1 tell 10.20.0.1" in ln and mac in ln]
    assert len(garps) >= 3, FIRST_APPLY["arp"]


# --------------------------------------------------------------------------- status


def test_dnsmasq_runs_as_the_unprivileged_dnsmasq_user(lab, pillar):
    """Every hanet dnsmasq drops its privileges to the distribution's ``dnsmasq`` user
    (the leases and reloads above were served by it), none stays root."""
    import pwd

    uid = pwd.getpwnam("dnsmasq").pw_uid
    seen = {}
    for host in lab.topology.hosts:
        for pid, cmdline in lab.processes(host)[host]:
            if cmdline.startswith("dnsmasq ") and "/var/lib/hanet/dnsmasq/" in cmdline:
                with open(f"/proc/{pid}/status") as fh:
                    uids = next(line for line in fh if line.startswith("Uid:")).split()[1:]
                seen[(host, pid)] = {int(u) for u in uids}
    assert len(seen) >= 3, seen  # compute1 and compute2 (private), net1 (shared)
    assert all(u == {uid} for u in seen.values()), seen


def test_status_reports_bridges_addresses_and_dnsmasq(lab, pillar):
    lab.dhcp("web1", "udhcpc")
    st = lab.salt(["compute1", "net1", "net2"], "hanet.status")
    c1 = st["compute1"]["networks"]
    assert c1["private"]["bridge"] == "br100" and c1["private"]["present"]
    assert c1["private"]["addresses"] == ["192.168.0.3/24"]
    assert c1["private"]["role"] == "serving"
    dm = c1["private"]["dnsmasq"]
    assert dm["running"] and dm["hosts"] == 1 and dm["leases"] == 1
    assert any(pid == dm["pid"] and "dnsmasq" in cl for pid, cl in lab.processes("compute1")["compute1"])
    assert c1["shared"]["role"] == "member" and c1["shared"]["dnsmasq"] is None
    assert {"address": "203.0.113.50", "interface": "eth0"} in st["compute1"]["floating_ips"]
    assert st["compute1"]["ruleset"]["in_place"]
    assert st["compute1"]["problems"] == []

    n1 = st["net1"]["networks"]["shared"]
    assert n1["role"] == "serving" and n1["active_gateway"]
    assert n1["addresses"] == ["10.20.0.2/24", "10.20.0.1/24"]
    assert n1["dnsmasq"]["running"] and n1["dnsmasq"]["hosts"] == 1
    n2 = st["net2"]["networks"]["shared"]
    assert n2["role"] == "standby" and not n2["active_gateway"]
    assert n2["addresses"] == ["10.20.0.3/24"] and n2["dnsmasq"] is None
