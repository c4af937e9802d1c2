"""A hostile VM on a multi_host network, guarded by `state.apply hanet` (real master and
minions, the namespace lab):

    compute1 br100 192.168.0.3:  web1 192.168.0.10 fa:16:3e:00:00:01
                                 evil 192.168.0.66 fa:16:3e:00:00:66  (the attacker)
    compute2 br100 192.168.0.4:  db1  192.168.0.11 fa:16:3e:00:00:02  (across the uplink)
    router 203.0.113.1

evil forges source IPs and MACs, runs a rogue DHCP server (busybox udhcpd) and sends
gratuitous ARP claiming the gateway's address. Every attack is first shown to land with
hanet's bridge table removed (so each observation can see it), then to land nowhere
once the highstate has put the guards back, while evil's legitimate traffic passes.
The observers are tcpdump in the victims' namespaces, their ARP caches and DHCP leases.
The VMs are plugged before the apply that guards them (no `meta ibrname` in this
kernel: the guards name the ports present at apply time).
"""

import contextlib
import json
import os
import subprocess
import sys
import time

import pytest
from hanet_checks import state_apply

pytestmark = pytest.mark.lab

PY = sys.executable
EVIL_MAC, EVIL_IP = "fa:16:3e:00:00:66", "192.168.0.66"
WEB1_MAC, WEB1_IP = "fa:16:3e:00:00:01", "192.168.0.10"
DB1_MAC, DB1_IP = "fa:16:3e:00:00:02", "192.168.0.11"
FORGED_MAC = "fa:16:3e:00:00:99"
GW1, GW2 = "192.168.0.3", "192.168.0.4"  # compute1's and compute2's addresses on br100
ROUTER = "203.0.113.1"


@pytest.fixture(scope="module")
def lab_topology():
    from hanet_lab import default_topology
    from hanet_lab.topology import VM, Nic

    t = default_topology(hosts=2)
    t.vms = {k: v for k, v in t.vms.items() if k in ("web1", "db1")}
    t.vms["evil"] = VM(name="evil", host="compute1", nics=[Nic(bridge="br100", mac=EVIL_MAC)])
    t.validate()
    return t


@pytest.fixture(scope="module")
def hostile(lab):
    from hanet_lab.pillar import lab_pillar

    p = lab_pillar(lab.topology)
    p["hanet"]["instances"]["evil"] = {  # evil's port named in the pillar; the others' by MAC
        "host": "compute1",
        "nics": [{"network": "private", "mac": EVIL_MAC, "ip": EVIL_IP, "port": "tap-evil"}],
    }
    lab.set_pillar(p)
    state_apply(lab)
    for vm in ("web1", "db1", "evil"):
        lab.plug_vm(vm)
    state_apply(lab)  # guards the ports plugged now
    assert lab.dhcp("web1", "udhcpc")["address"] == WEB1_IP
    assert lab.dhcp("db1", "udhcpc")["address"] == DB1_IP
    assert lab.dhcp("evil", "udhcpc")["address"] == EVIL_IP  # evil is a tenant like any other
    gw_mac = lab.mac("compute1", "br100")
    return {"pillar": p["hanet"], "gw_mac": gw_mac}


@pytest.fixture
def guarded(lab, hostile):
    """Each test starts with hanet's guards in place (a control may have removed them)."""
    if lab.exec("compute1", "nft list table bridge hanet").returncode != 0:
        state_apply(lab, ["compute1", "compute2"])
    return hostile


@contextlib.contextmanager
def guards_removed(lab):
    """hanet's bridge table removed on both hosts (the control case); the highstate puts
    it back afterwards, and must report doing so."""
    for h in ("compute1", "compute2"):
        lab.exec(h, "nft delete table bridge hanet", check=True)
    try:
        yield
    finally:
        res = state_apply(lab, ["compute1", "compute2"])
    for h in ("compute1", "compute2"):
        assert res[h]["hanet_|-hanet-ruleset_|-hanet-ruleset_|-ruleset"]["changes"], res[h]
        assert lab.exec(h, "nft list table bridge hanet").returncode == 0


class Sniffers:
    """tcpdump in several namespaces at once; ``text[name]`` after the block."""

    def __init__(self, lab):
        self.lab, self.procs, self.text = lab, {}, {}

    def start(self, name, node, iface, filt, verbose=False):
        path = os.path.join(self.lab.rundir, f"tcpdump-{name}-{time.monotonic_ns()}.txt")
        argv = ["tcpdump", "-i", iface, "-n", "-e", "-l", "-A"] + (["-vv"] if verbose else []) + [filt]
        fh = open(path, "w")
        p = self.lab.popen(node, argv, stdout=fh, stderr=subprocess.PIPE, text=True)
        while "listening on" not in (p.stderr.readline() or "listening on"):
            pass  # the capture is open once tcpdump says so (after "verbose output suppressed")
        self.procs[name] = (p, fh, path)

    def stop(self):
        time.sleep(0.7)
        for name, (p, fh, path) in self.procs.items():
            p.terminate()
            p.wait(5)
            fh.close()
            with open(path) as f:
                self.text[name] = f.read()


@contextlib.contextmanager
def sniffing(lab, **specs):
    s = Sniffers(lab)
    try:
        for name, spec in specs.items():
            s.start(name, *spec)
        yield s
    finally:
        s.stop()


def scapy(lab, vm, code):
    prog = "from scapy.all import *\nconf.verb = 0\ndef tx(p): sendp(p, iface='eth0')\n" + code
    lab.exec(vm, [PY, "-c", prog], check=True, timeout=60)


def udp(src_mac, dst_mac, src_ip, dst_ip, marker):
    return (
        f"tx(Ether(src='{src_mac}', dst='{dst_mac}')/IP(src='{src_ip}', dst='{dst_ip}')"
        f"/UDP(sport=4000, dport=9999)/'{marker}')\n"
    )


# --------------------------------------------------------------------------- forged traffic


def forged_traffic(lab, gw_mac):
    """evil's packets (legitimate ones and forgeries) to web1, db1 and the router, while
    web1, db1, the router, compute1's own stack (br100) and evil's tap are watched."""
    code = "".join(
        [
            udp(EVIL_MAC, WEB1_MAC, EVIL_IP, WEB1_IP, "LEGIT-TO-WEB1"),
            udp(EVIL_MAC, DB1_MAC, EVIL_IP, DB1_IP, "LEGIT-TO-DB1"),
            udp(EVIL_MAC, gw_mac, EVIL_IP, ROUTER, "LEGIT-TO-ROUTER"),
            udp(EVIL_MAC, WEB1_MAC, DB1_IP, WEB1_IP, "FORGED-IP-TO-WEB1"),  # another tenant's IP
            udp(EVIL_MAC, DB1_MAC, "192.168.0.77", DB1_IP, "FORGED-IP-TO-DB1"),  # a free IP
            udp(EVIL_MAC, gw_mac, WEB1_IP, ROUTER, "FORGED-IP-TO-ROUTER"),
            udp(EVIL_MAC, gw_mac, "198.18.0.1", ROUTER, "FOREIGN-IP-TO-ROUTER"),  # outside the range
            udp(EVIL_MAC, gw_mac, EVIL_IP, GW1, "FORGED-NOTHING-TO-HOST"),
            udp(EVIL_MAC, gw_mac, WEB1_IP, GW1, "FORGED-IP-TO-HOST"),
            udp(FORGED_MAC, WEB1_MAC, EVIL_IP, WEB1_IP, "FORGED-MAC-TO-WEB1"),
            udp(FORGED_MAC, DB1_MAC, EVIL_IP, DB1_IP, "FORGED-MAC-TO-DB1"),
            udp(FORGED_MAC, gw_mac, EVIL_IP, ROUTER, "FORGED-MAC-TO-ROUTER"),
        ]
    )
    with sniffing(
        lab,
        web1=("web1", "eth0", "udp port 9999"),
        db1=("db1", "eth0", "udp port 9999"),
        router=("router", "eth0", "udp port 9999"),
        host=("compute1", "br100", "udp port 9999"),
        tap=("compute1", "tap-evil", "udp port 9999"),
    ) as s:
        scapy(lab, "evil", code)
    return s.text


def test_without_guards_every_attack_lands(lab, hostile):
    """The control: with hanet's bridge table gone, the observers of the tests below see
    every attack land (so their 'nothing seen' means something)."""
    gw_mac = hostile["gw_mac"]
    web1_ok = lab.ping("web1", GW1)
    assert web1_ok and lab.arp_cache("web1")[GW1]["mac"] == gw_mac
    with guards_removed(lab):
        seen = forged_traffic(lab, gw_mac)
        assert "FORGED-IP-TO-WEB1" in seen["web1"] and "FORGED-MAC-TO-WEB1" in seen["web1"]
        assert "FORGED-IP-TO-DB1" in seen["db1"] and "FORGED-MAC-TO-DB1" in seen["db1"]
        assert "FORGED-IP-TO-ROUTER" in seen["router"] or "FOREIGN-IP-TO-ROUTER" in seen["router"]
        assert "FORGED-IP-TO-HOST" in seen["host"]
        seen = impersonation(lab, gw_mac)
        assert "IMPERSONATED-TO-DB1" in seen["db1"] and "IMPERSONATED-TO-ROUTER" in seen["router"]

        with rogue_dhcp_server(lab):
            with sniffing(lab, web1=("web1", "eth0", "udp port 67 or udp port 68", True)) as s:
                lab.dhcp("web1", "udhcpc", check=False)
            assert f"Server-ID (54), length 4: {EVIL_IP}" in s.text["web1"]

        assert lab.dhcp("web1", "udhcpc")["address"] == WEB1_IP
        assert lab.ping("web1", GW1) and lab.arp_cache("web1")[GW1]["mac"] == gw_mac
        for _ in range(3):  # under load the first try may land within the locktime
            time.sleep(1.1)  # past the neighbour locktime, so that an ARP update would be taken
            scapy(lab, "evil", garp_code(GW1))
            time.sleep(0.3)
            if lab.arp_cache("web1")[GW1]["mac"] == EVIL_MAC:
                break
        assert lab.arp_cache("web1")[GW1]["mac"] == EVIL_MAC  # poisoned: the check can see it
    lab.exec("web1", "ip neigh flush dev eth0")
    lab.dhcp("web1", "udhcpc")


def test_forged_source_ip_and_mac_reach_nobody(lab, guarded):
    seen = forged_traffic(lab, guarded["gw_mac"])
    # evil really sent all of them (its tap saw them) ...
    for m in ("LEGIT-TO-WEB1", "FORGED-IP-TO-WEB1", "FORGED-MAC-TO-WEB1", "FORGED-IP-TO-ROUTER"):
        assert m in seen["tap"], m
    # ... its legitimate traffic passes, to a VM on its host, across hosts and upstream ...
    assert "LEGIT-TO-WEB1" in seen["web1"]
    assert "LEGIT-TO-DB1" in seen["db1"]
    assert "LEGIT-TO-ROUTER" in seen["router"]
    assert "203.0.113.11.4000 > 203.0.113.1.9999" in seen["router"]  # SNATed to routing_source_ip
    assert "FORGED-NOTHING-TO-HOST" in seen["host"]
    # ... and no forgery reaches another VM, the host's stack or the router
    for name in ("web1", "db1", "router", "host"):
        assert "FORGED" not in seen[name].replace("FORGED-NOTHING", ""), (name, seen[name])
        assert "FOREIGN" not in seen[name], (name, seen[name])
        assert FORGED_MAC not in seen[name], (name, seen[name])


def impersonation(lab, gw_mac):
    """evil sends with web1's MAC *and* IP (both valid, both web1's) to db1 and upstream."""
    code = udp(WEB1_MAC, DB1_MAC, WEB1_IP, DB1_IP, "IMPERSONATED-TO-DB1") + udp(
        WEB1_MAC, gw_mac, WEB1_IP, ROUTER, "IMPERSONATED-TO-ROUTER"
    )
    with sniffing(
        lab,
        db1=("db1", "eth0", "udp port 9999"),
        router=("router", "eth0", "udp port 9999"),
        tap=("compute1", "tap-evil", "udp port 9999"),
    ) as s:
        scapy(lab, "evil", code)
    return s.text


def test_impersonating_another_local_vm_is_blocked(lab, guarded):
    """Each NIC's (MAC, IP) is good only from its own port: web1's port found by libvirt's
    tap MAC rule, evil's named in the pillar (nics:0:port)."""
    seen = impersonation(lab, guarded["gw_mac"])
    assert "IMPERSONATED-TO-DB1" in seen["tap"]
    assert "IMPERSONATED" not in seen["db1"] + seen["router"]
    # web1 itself still sends with its own (MAC, IP) from its own port
    assert lab.ping("web1", DB1_IP) and lab.ping("web1", GW1)


def test_evil_legitimate_service_works(lab, guarded):
    """evil is a normal tenant for everything it owns: DHCP with both clients, egress,
    its own metadata, and ARP for its own address."""
    for client in ("dhclient", "udhcpc"):
        lease = lab.dhcp("evil", client)
        assert (lease["address"], lease["router"], lease["server"]) == (EVIL_IP, GW1, GW1)
    assert lab.http_get("evil", f"http://{ROUTER}/whoami").strip() == "203.0.113.11"
    md = json.loads(lab.http_get("evil", "http://169.254.169.254/openstack/latest/meta_data.json"))
    assert md["name"] == "evil" and md["hostname"] == "evil.novalocal"
    assert lab.ping("evil", WEB1_IP) and lab.ping("evil", DB1_IP)
    assert lab.arp_cache("web1")[EVIL_IP]["mac"] == EVIL_MAC


# --------------------------------------------------------------------------- rogue DHCP


@contextlib.contextmanager
def rogue_dhcp_server(lab):
    """busybox udhcpd in evil, handing out 192.168.0.200-210 with itself as router."""
    d = os.path.join(lab.rundir, "vms", "evil")
    os.makedirs(d, exist_ok=True)
    conf = os.path.join(d, "udhcpd.conf")
    with open(conf, "w") as f:
        f.write(
            f"start 192.168.0.200\nend 192.168.0.210\ninterface eth0\n"
            f"lease_file {d}/udhcpd.leases\npidfile {d}/udhcpd.pid\n"
            f"option subnet 255.255.255.0\noption router {EVIL_IP}\noption dns {EVIL_IP}\n"
            "option lease 600\n"
        )
    open(os.path.join(d, "udhcpd.leases"), "w").close()
    p = lab.popen(
        "evil", ["busybox", "udhcpd", "-f", "-a", "10", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    time.sleep(0.5)
    try:
        assert p.poll() is None, "udhcpd did not start"
        yield p
    finally:
        p.terminate()
        p.wait(5)


def forget_lease(lab, vm):
    try:
        os.unlink(os.path.join(lab.rundir, "vms", vm, "dhclient-eth0.leases"))
    except FileNotFoundError:
        pass


def test_rogue_dhcp_server_reaches_nobody(lab, guarded):
    with rogue_dhcp_server(lab):
        for client in ("udhcpc", "dhclient"):
            forget_lease(lab, "web1")
            forget_lease(lab, "db1")
            with sniffing(
                lab,
                web1=("web1", "eth0", "udp port 67 or udp port 68", True),
                db1=("db1", "eth0", "udp port 67 or udp port 68", True),
                tap=("compute1", "tap-evil", "udp port 67 or udp port 68", True),
            ) as s:
                web1 = lab.dhcp("web1", client)
                db1 = lab.dhcp("db1", client)
            # the rogue server did answer (its offers left evil) ...
            assert f"Server-ID (54), length 4: {EVIL_IP}" in s.text["tap"], s.text["tap"]
            assert "Offer" in s.text["tap"]
            # ... but the VMs got their own host's lease and never saw the rogue
            assert (web1["address"], web1["router"], web1["server"]) == (WEB1_IP, GW1, GW1)
            assert (db1["address"], db1["router"], db1["server"]) == (DB1_IP, GW2, GW2)
            for vm in ("web1", "db1"):
                assert EVIL_IP not in s.text[vm], s.text[vm]
                assert "192.168.0.20" not in s.text[vm]  # no rogue address offered
            assert "Server-ID (54), length 4: 192.168.0.3" in s.text["web1"]
            assert "Server-ID (54), length 4: 192.168.0.4" in s.text["db1"]
            assert "192.168.0.3" not in s.text["db1"]  # nor does compute1 answer db1


def test_forged_dhcp_offer_in_the_hosts_name_is_dropped(lab, guarded):
    """scapy offers from evil posing as compute1 (its IP as source and server id)."""
    offer = (
        f"tx(Ether(src='{EVIL_MAC}', dst='ff:ff:ff:ff:ff:ff')/IP(src='{GW1}', dst='255.255.255.255')"
        f"/UDP(sport=67, dport=68)/BOOTP(op=2, yiaddr='192.168.0.201', siaddr='{GW1}', "
        f"chaddr=bytes.fromhex('{WEB1_MAC.replace(':', '')}'))"
        f"/DHCP(options=[('message-type', 'offer'), ('server_id', '{GW1}'), "
        f"('router', '{EVIL_IP}'), 'end']))\n"
    )
    with sniffing(
        lab,
        web1=("web1", "eth0", "udp port 68"),
        db1=("db1", "eth0", "udp port 68"),
        tap=("compute1", "tap-evil", "udp port 68"),
    ) as s:
        scapy(lab, "evil", offer * 3)
    assert "192.168.0.201" in s.text["tap"] or "BOOTP/DHCP, Reply" in s.text["tap"]
    assert s.text["web1"].strip() == "" and s.text["db1"].strip() == ""
    lease = lab.dhcp("web1", "udhcpc")
    assert (lease["address"], lease["router"]) == (WEB1_IP, GW1)


# --------------------------------------------------------------------------- ARP


def garp_code(ip, mac=EVIL_MAC):
    """Gratuitous ARP (reply and request forms) claiming ``ip`` for ``mac``, broadcast."""
    return (
        f"tx(Ether(src='{mac}', dst='ff:ff:ff:ff:ff:ff')/ARP(op=2, hwsrc='{mac}', psrc='{ip}', "
        f"hwdst='ff:ff:ff:ff:ff:ff', pdst='{ip}'))\n"
        f"tx(Ether(src='{mac}', dst='ff:ff:ff:ff:ff:ff')/ARP(op=1, hwsrc='{mac}', psrc='{ip}', "
        f"hwdst='00:00:00:00:00:00', pdst='{ip}'))\n"
    )


def test_gratuitous_arp_for_the_gateway_changes_no_arp_cache(lab, guarded):
    gw_mac = guarded["gw_mac"]
    # the victims know the truth first: web1 the gateway, compute1 and db1 web1's address
    assert lab.ping("web1", GW1)
    assert lab.ping("compute1", WEB1_IP)
    assert lab.ping("db1", WEB1_IP) and lab.ping("db1", GW2)
    db1_gw = lab.arp_cache("db1")[GW2]["mac"]
    assert lab.arp_cache("web1")[GW1]["mac"] == gw_mac
    assert lab.arp_cache("compute1")[WEB1_IP]["mac"] == WEB1_MAC
    unicast = (
        f"tx(Ether(src='{EVIL_MAC}', dst='{WEB1_MAC}')/ARP(op=2, hwsrc='{EVIL_MAC}', "
        f"psrc='{GW1}', hwdst='{WEB1_MAC}', pdst='{WEB1_IP}'))\n"
    )
    with sniffing(
        lab, web1=("web1", "eth0", "arp"), db1=("db1", "eth0", "arp"), tap=("compute1", "tap-evil", "arp")
    ) as s:
        for _ in range(3):  # as often as the control needs at most
            time.sleep(1.1)  # past the neighbour locktime: an unguarded update would be taken
            scapy(
                lab, "evil", garp_code(GW1) + garp_code(GW2) + garp_code(WEB1_IP) + unicast + garp_code(GW1, FORGED_MAC)
            )
    time.sleep(0.3)
    assert f"{GW1} is-at {EVIL_MAC}" in s.text["tap"]  # sent
    for vm in ("web1", "db1"):
        assert EVIL_MAC not in s.text[vm] and FORGED_MAC not in s.text[vm], s.text[vm]
    assert lab.arp_cache("web1")[GW1]["mac"] == gw_mac
    assert lab.arp_cache("compute1")[WEB1_IP]["mac"] == WEB1_MAC
    assert lab.arp_cache("db1")[GW2]["mac"] == db1_gw
    assert lab.arp_cache("db1").get(WEB1_IP, {}).get("mac") == WEB1_MAC
    # web1 still reaches the world through its real gateway
    assert lab.http_get("web1", f"http://{ROUTER}/whoami").strip() == "203.0.113.50"
    # and ARP for evil's own address passes
    lab.exec("web1", f"ip neigh del {EVIL_IP} dev eth0")
    assert lab.ping("web1", EVIL_IP)
    assert lab.arp_cache("web1")[EVIL_IP]["mac"] == EVIL_MAC
