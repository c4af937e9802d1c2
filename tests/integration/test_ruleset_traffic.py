"""The ruleset with real traffic, in a namespace topology this test builds itself:

    vm1 (192.168.0.10, fa:16:3e:00:00:01) --tap1--+   (tap1 has libvirt's MAC fe:16:3e:00:00:01)
    vm2 (192.168.0.11, fa:16:3e:00:00:02) --tap2--+ br100 192.168.0.3/24  [host]
                                                      (tap2: random MAC, named by the guard)
                                eth1 (veth to eth1p) --+   (the trusted uplink)
    host eth0 203.0.113.11/24 ------------------------ up eth0 203.0.113.1/24 (HTTP server)

hanet's rendered ruleset is applied in the host namespace only (never the root one).
"""

import contextlib
import ctypes
import os
import random
import shutil
import subprocess
import sys
import time

import pytest

from _hanet import ruleset as R
from _hanet.common import Managed, Paths
from _hanet.desired import Metadata, PortGuard, Ruleset, Snat

MAC1, MAC2, FORGED_MAC = "fa:16:3e:00:00:01", "fa:16:3e:00:00:02", "fa:16:3e:00:00:99"
PY = sys.executable

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(
        os.geteuid() != 0 or not shutil.which("nft") or not shutil.which("tcpdump") or not shutil.which("curl"),
        reason="needs root, nft, tcpdump, curl",
    ),
]

libc = ctypes.CDLL(None, use_errno=True)

ECHO_SERVER = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("%s %s\\n" % (sys.argv[3], self.client_address[0])).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body)))
        self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
http.server.HTTPServer((sys.argv[1], int(sys.argv[2])), H).serve_forever()
"""


def sh(*args, check=True, **kw):
    return subprocess.run(args, check=check, capture_output=True, text=True, **kw)


def ruleset(driver="nftables"):
    return Ruleset(
        driver=driver,
        table="hanet",
        snat=(
            Snat(
                network="private",
                cidr="192.168.0.0/24",
                source="203.0.113.11",
                out_interface="eth0",
                exempt=("192.168.0.0/24",),
            ),
        ),
        metadata=Metadata(bridges=("br100",), host="127.0.0.1", port=8775, local_service=True),
        forward_bridges=("br100",),
        service_bridges=("br100",),
        guards=(
            PortGuard(
                bridge="br100",
                trusted_ports=("eth1",),
                pairs=((MAC1, "192.168.0.10"), (MAC2, "192.168.0.11")),
                dhcp_isolated=True,
                ports=((MAC2, "tap2"),),
            ),
        ),
    )


@contextlib.contextmanager
def inside(ns):
    with open("/proc/self/ns/net") as home, open(f"/run/netns/{ns}") as target:
        assert libc.setns(target.fileno(), 0x40000000) == 0
        try:
            yield
        finally:
            assert libc.setns(home.fileno(), 0x40000000) == 0


class Topo:
    def __init__(self, tmp_path):
        tag = f"hr-{os.getpid()}-{random.randrange(16**4):04x}"
        self.ns = {k: f"{tag}-{k}" for k in ("host", "vm1", "vm2", "up")}
        self.tmp = tmp_path
        self.procs = []
        self.paths = Paths(root_dir=str(tmp_path / "root"))
        self.paths.ensure()

    def x(self, ns, *args, check=True, **kw):
        return sh("ip", "netns", "exec", self.ns[ns], *args, check=check, **kw)

    def spawn(self, ns, *args, **kw):
        p = subprocess.Popen(["ip", "netns", "exec", self.ns[ns], *args], **kw)
        self.procs.append(p)
        return p

    def up(self):
        for name in self.ns.values():
            sh("ip", "netns", "add", name)
        for ns in self.ns:
            self.x(ns, "ip", "link", "set", "lo", "up")
        h = self.ns["host"]
        self.x("host", "ip", "link", "add", "br100", "type", "bridge", "stp_state", "0", "forward_delay", "0")
        self.x("host", "ip", "link", "add", "eth1", "type", "veth", "peer", "name", "eth1p")
        self.x("host", "ip", "link", "set", "eth1p", "up")
        self.x("host", "ip", "link", "set", "eth1", "master", "br100")
        self.x("host", "ip", "addr", "add", "192.168.0.3/24", "dev", "br100")
        for i, mac in ((1, MAC1), (2, MAC2)):
            vm = self.ns[f"vm{i}"]
            self.x("host", "ip", "link", "add", f"tap{i}", "type", "veth", "peer", "name", "eth0", "netns", vm)
            if i == 1:  # vm1's port is found by libvirt's MAC rule, vm2's is named
                self.x("host", "ip", "link", "set", "tap1", "address", "fe" + MAC1[2:])
            self.x("host", "ip", "link", "set", f"tap{i}", "master", "br100")
            self.x("host", "ip", "link", "set", f"tap{i}", "up")
            self.x(f"vm{i}", "ip", "link", "set", "eth0", "address", mac)
            self.x(f"vm{i}", "ip", "addr", "add", f"192.168.0.1{i - 1}/24", "dev", "eth0")
            self.x(f"vm{i}", "ip", "link", "set", "eth0", "up")
            self.x(f"vm{i}", "ip", "route", "add", "default", "via", "192.168.0.3")
        self.x("host", "ip", "link", "set", "eth1", "up")
        self.x("host", "ip", "link", "set", "br100", "up")
        self.x("host", "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", self.ns["up"])
        self.x("host", "ip", "addr", "add", "203.0.113.11/24", "dev", "eth0")
        self.x("host", "ip", "link", "set", "eth0", "up")
        self.x("up", "ip", "addr", "add", "203.0.113.1/24", "dev", "eth0")
        self.x("up", "ip", "link", "set", "eth0", "up")
        self.x("host", "sysctl", "-qw", "net.ipv4.ip_forward=1")
        server = self.tmp / "echo_server.py"
        server.write_text(ECHO_SERVER)
        self.spawn(
            "up",
            PY,
            str(server),
            "203.0.113.1",
            "8080",
            "upstream",
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.spawn(
            "host", PY, str(server), "0.0.0.0", "8775", "metadata", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        for ns, url in (("up", "http://203.0.113.1:8080/"), ("host", "http://127.0.0.1:8775/")):
            for _ in range(100):
                if self.x(ns, "curl", "-s", "-m", "1", url, check=False).returncode == 0:
                    break
                time.sleep(0.1)
        del h
        return self

    def down(self):
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        for name in self.ns.values():
            sh("ip", "netns", "del", name, check=False)

    def apply(self, rs):
        with inside(self.ns["host"]):
            changes = R.plan(rs, R.current(rs, self.paths))
            R.apply(changes, self.paths, Managed(self.paths))
            assert R.plan(rs, R.current(rs, self.paths)) == []

    def curl(self, vm, url):
        return self.x(vm, "curl", "-s", "-m", "5", url, check=False).stdout.strip()

    def neigh(self, vm, ip):
        return self.x(vm, "ip", "neigh", "show", ip, "dev", "eth0").stdout.strip()

    @contextlib.contextmanager
    def sniff(self, ns, filt="udp or arp"):
        """tcpdump in ``ns``; yields a list filled with its output lines on exit."""
        out = self.tmp / f"tcpdump-{ns}-{random.randrange(1 << 30)}.txt"
        fh = open(out, "w")
        p = self.spawn(
            ns, "tcpdump", "-i", "eth0", "-n", "-e", "-l", "-A", filt, stdout=fh, stderr=subprocess.PIPE, text=True
        )
        p.stderr.readline()  # "listening on eth0 ..." once the capture is open
        lines = []
        try:
            yield lines
            time.sleep(0.5)
        finally:
            p.terminate()
            p.wait(5)
            fh.close()
            lines.extend(out.read_text().splitlines())

    def scapy(self, vm, code):
        prog = "from scapy.all import *\nconf.verb = 0\ndef tx(pkt): sendp(pkt, iface='eth0')\n" + code
        self.x(vm, PY, "-c", prog)


@pytest.fixture
def topo(tmp_path):
    t = Topo(tmp_path)
    try:
        yield t.up()
    finally:
        t.down()


SEND_ALL = f"""
tx(Ether(src='{MAC1}', dst='{MAC2}')/IP(src='192.168.0.10', dst='192.168.0.11')/UDP(sport=4000, dport=9999)/'LEGIT-PAYLOAD')
tx(Ether(src='{MAC1}', dst='{MAC2}')/IP(src='192.168.0.99', dst='192.168.0.11')/UDP(sport=4000, dport=9999)/'FORGED-IP')
tx(Ether(src='{FORGED_MAC}', dst='{MAC2}')/IP(src='192.168.0.10', dst='192.168.0.11')/UDP(sport=4000, dport=9999)/'FORGED-MAC')
tx(Ether(src='{MAC2}', dst='ff:ff:ff:ff:ff:ff')/IP(src='192.168.0.11', dst='192.168.0.255')/UDP(sport=4000, dport=9999)/'IMPERSONATED')
tx(Ether(src='{MAC1}', dst='ff:ff:ff:ff:ff:ff')/IP(src='192.168.0.10', dst='255.255.255.255')
   /UDP(sport=67, dport=68)/BOOTP(op=2, yiaddr='192.168.0.11', chaddr=bytes.fromhex('{MAC2.replace(":", "")}'))
   /DHCP(options=[('message-type', 'offer'), ('server_id', '192.168.0.10'), ('router', '192.168.0.10'), 'end']))
"""

GARP = f"""
tx(Ether(src='{MAC1}', dst='ff:ff:ff:ff:ff:ff')/ARP(op=2, hwsrc='{MAC1}', psrc='192.168.0.3', hwdst='ff:ff:ff:ff:ff:ff', pdst='192.168.0.3'))
tx(Ether(src='{MAC1}', dst='ff:ff:ff:ff:ff:ff')/ARP(op=1, hwsrc='{MAC1}', psrc='192.168.0.3', hwdst='00:00:00:00:00:00', pdst='192.168.0.3'))
"""


DRIVERS = pytest.mark.parametrize(
    "driver",
    [
        "nftables",
        pytest.param(
            "iptables", marks=pytest.mark.skipif(not shutil.which("iptables-restore"), reason="needs iptables")
        ),
    ],
)


@DRIVERS
def test_snat_antispoofing_and_metadata(topo, driver):
    # Without hanet's ruleset: the upstream cannot answer the VM (no route back), the
    # metadata address leads nowhere, and every forgery reaches vm2 (the checks below see it).
    assert topo.curl("vm1", "http://203.0.113.1:8080/") == ""
    with topo.sniff("vm2") as seen:
        topo.scapy("vm1", SEND_ALL)
    text = "\n".join(seen)
    assert "LEGIT-PAYLOAD" in text and "FORGED-IP" in text and "FORGED-MAC" in text
    assert "IMPERSONATED" in text  # vm1 as vm2 (vm2's own MAC and IP)
    assert ".67 > 255.255.255.255.68" in text
    topo.x("vm2", "ping", "-c1", "-W2", "192.168.0.3")
    time.sleep(1.1)  # past the neighbour locktime, so an ARP update would be taken
    topo.scapy("vm1", GARP)
    time.sleep(0.3)
    assert MAC1 in topo.neigh("vm2", "192.168.0.3")  # poisoned: the check can see it
    topo.x("vm2", "ip", "neigh", "flush", "dev", "eth0")
    assert topo.curl("up", "http://203.0.113.11:8775/") == "metadata 203.0.113.1"  # open upstream

    topo.apply(ruleset(driver))

    # (a) the upstream sees routing_source_ip as the VM connection's source
    assert topo.curl("vm1", "http://203.0.113.1:8080/") == "upstream 203.0.113.11"
    assert topo.curl("vm2", "http://203.0.113.1:8080/") == "upstream 203.0.113.11"

    # (b) forged IP, forged MAC and a rogue DHCP offer from vm1 never reach vm2 ...
    with topo.sniff("vm2") as seen:
        topo.scapy("vm1", SEND_ALL)
    text = "\n".join(seen)
    assert "LEGIT-PAYLOAD" in text  # ... while legitimate traffic passes
    assert "FORGED-IP" not in text and "FORGED-MAC" not in text and FORGED_MAC not in text
    assert "IMPERSONATED" not in text  # vm2's (MAC, IP) is good only from vm2's port
    assert ".67 > 255.255.255.255.68" not in text and "BOOTP" not in text
    # ... nor the host (the frames die entering the bridge)
    # ... and a gratuitous ARP claiming the gateway address changes nobody's ARP cache
    topo.x("vm2", "ping", "-c1", "-W2", "192.168.0.3")
    gw_entry = topo.neigh("vm2", "192.168.0.3")
    assert gw_entry and MAC1 not in gw_entry
    time.sleep(1.1)
    with topo.sniff("vm2", "arp") as seen:
        topo.scapy("vm1", GARP)
    time.sleep(0.3)
    assert MAC1 not in topo.neigh("vm2", "192.168.0.3")
    assert not any("192.168.0.3 is-at" in ln or "tell 192.168.0.3" in ln for ln in seen)
    # vm1's own ARP still works: it resolves and reaches vm2
    assert topo.x("vm1", "ping", "-c1", "-W2", "192.168.0.11", check=False).returncode == 0
    counters = topo.x("host", "nft", "list", "chain", "bridge", "hanet", "br100_vm").stdout
    assert "counter packets 0" not in counters.split("udp sport 67")[1].split("\n")[0]

    # (c) metadata: 169.254.169.254:80 reaches the host's listener on metadata_port
    assert topo.curl("vm1", "http://169.254.169.254/") == "metadata 192.168.0.10"
    # ... and nowhere else: not from upstream, still from the host itself
    assert topo.curl("up", "http://203.0.113.11:8775/") == ""
    assert topo.curl("host", "http://127.0.0.1:8775/") == "metadata 127.0.0.1"


def dhcp_capture(topo):
    caps = {}
    for dev in ("eth1", "br100"):
        p = topo.spawn(
            "host", "tcpdump", "-i", dev, "-n", "-l", "udp", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        p.stderr.readline()
        caps[dev] = p
    topo.scapy(
        "vm1",
        f"""
tx(Ether(src='{MAC1}', dst='ff:ff:ff:ff:ff:ff')/IP(src='0.0.0.0', dst='255.255.255.255')
   /UDP(sport=68, dport=67)/BOOTP(op=1, chaddr=bytes.fromhex('{MAC1.replace(":", "")}'))
   /DHCP(options=[('message-type', 'discover'), 'end']))
tx(Ether(src='{MAC1}', dst='ff:ff:ff:ff:ff:ff')/IP(src='192.168.0.10', dst='255.255.255.255')
   /UDP(sport=4000, dport=9999)/'BCAST')
""",
    )
    time.sleep(0.5)
    out = {}
    for dev, p in caps.items():
        p.terminate()
        out[dev] = p.communicate(timeout=5)[0]
    return out


def test_dhcp_does_not_cross_the_uplink(topo):
    """dhcp_isolated: a VM's DHCP discover reaches this host but not the trusted uplink."""
    out = dhcp_capture(topo)  # control: without hanet's ruleset it does cross
    assert "0.0.0.0.68 > 255.255.255.255.67" in out["eth1"]
    topo.apply(ruleset())
    out = dhcp_capture(topo)
    assert "0.0.0.0.68 > 255.255.255.255.67" in out["br100"]  # the host's dnsmasq would see it
    assert "192.168.0.10.4000 > 255.255.255.255.9999" in out["eth1"]  # broadcasts do cross
    assert ".67" not in out["eth1"] and ".68" not in out["eth1"], out["eth1"]


@DRIVERS
def test_floating_ip_dnat_snat_and_hairpin(topo, driver):
    from _hanet.desired import FloatingIp
    import dataclasses

    rs = dataclasses.replace(
        ruleset(driver),
        floating=(
            FloatingIp(
                address="203.0.113.50",
                fixed_ip="192.168.0.10",
                instance="vm1",
                network="private",
                public_interface="eth0",
                cidr="192.168.0.0/24",
            ),
        ),
    )
    topo.x("host", "ip", "addr", "add", "203.0.113.50/32", "dev", "eth0")  # the floating facet's job
    server = topo.tmp / "echo_server.py"
    topo.spawn("vm1", PY, str(server), "0.0.0.0", "8080", "vm1", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        if topo.curl("vm1", "http://127.0.0.1:8080/"):
            break
        time.sleep(0.1)
    topo.apply(rs)
    # the world reaches the instance at its floating IP, and sees it from there
    assert topo.x("up", "curl", "-s", "-m", "5", "http://203.0.113.50:8080/").stdout.strip() == "vm1 203.0.113.1"
    assert topo.curl("vm1", "http://203.0.113.1:8080/") == "upstream 203.0.113.50"
    # vm2 (no floating IP) still leaves with routing_source_ip
    assert topo.curl("vm2", "http://203.0.113.1:8080/") == "upstream 203.0.113.11"
    # hairpin: a VM on the same host reaches the floating IP (answer comes back through the host)
    assert topo.curl("vm2", "http://203.0.113.50:8080/") == "vm1 192.168.0.3"
    # the host itself reaches it too (output DNAT)
    assert topo.x("host", "curl", "-s", "-m", "5", "http://203.0.113.50:8080/").stdout.startswith("vm1 ")
