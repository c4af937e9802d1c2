"""Real dnsmasq and the real metadata service, started by hanet's appliers, serving real
DHCP clients (dhclient, udhcpc) in network namespaces.

Topology, per test (names unique per run: ``hd<pid><rand>``):

    host ns:  br100 192.168.0.3/24  <- veth -> vm1 ns: eth0 (fa:16:3e:00:00:01)
                                    <- veth -> vm2 ns: eth0 (fa:16:3e:00:00:02)
                                    <- veth -> vm3 ns: eth0 (fa:16:3e:00:00:99, not in the pillar)

``apply`` runs with the test's thread inside the host ns (setns), as the minion would,
so dnsmasq and the metadata service inherit it. Every namespace is deleted and every
process started is killed by the fixtures, also when a test fails.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import random
import shutil
import signal
import subprocess
import time

import pytest

from _hanet import dnsmasq, metadata
from _hanet.common import Managed, Paths
from _hanet.desired import DhcpHost, Dnsmasq, InstanceRecord, Metadata

pytestmark = [pytest.mark.lab]

HOST_IP = "192.168.0.3"
MAC1, IP1 = "fa:16:3e:00:00:01", "192.168.0.10"
MAC2, IP2 = "fa:16:3e:00:00:02", "192.168.0.11"
MAC3, IP3 = "fa:16:3e:00:00:99", "192.168.0.50"
CLONE_NEWNET = 0x40000000


def _need(*tools):
    missing = [t for t in tools if not shutil.which(t)]
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    if missing:
        pytest.skip(f"missing {', '.join(missing)}")


def sh(*args, check=True, timeout=30, **kw):
    return subprocess.run(list(args), check=check, timeout=timeout, capture_output=True, text=True, **kw)


_libc = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def in_netns(name):
    """Run the calling thread (and what it spawns) inside network namespace ``name``."""
    back = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        yield
    finally:
        if _libc.setns(back, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns back")
        os.close(target)
        os.close(back)


class Lab:
    """The namespaces of one test, and the processes started in them."""

    def __init__(self, tmp_path):
        self.prefix = f"hd{os.getpid()}{random.randrange(16**4):04x}"
        self.tmp = tmp_path
        self.host = f"{self.prefix}h"
        self.vms = {}
        self.paths = Paths(root_dir=str(tmp_path / "root"))
        self.paths.ensure()
        self.pidfiles = []

    def ns(self, name):
        return f"{self.prefix}{name}"

    def up(self):
        sh("ip", "netns", "add", self.host)
        self.nsx(self.host, "ip", "link", "set", "lo", "up")
        self.nsx(self.host, "ip", "link", "add", "br100", "type", "bridge", "stp_state", "0", "forward_delay", "0")
        self.nsx(self.host, "ip", "addr", "add", f"{HOST_IP}/24", "dev", "br100")
        self.nsx(self.host, "ip", "link", "set", "br100", "up")
        return self

    def add_vm(self, name, mac):
        ns = self.ns(name)
        sh("ip", "netns", "add", ns)
        self.vms[name] = ns
        sh(
            "ip",
            "link",
            "add",
            f"t{name}",
            "netns",
            self.host,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns,
            "address",
            mac,
        )
        self.nsx(self.host, "ip", "link", "set", f"t{name}", "master", "br100", "up")
        self.nsx(ns, "ip", "link", "set", "lo", "up")
        self.nsx(ns, "ip", "link", "set", "eth0", "up")
        return ns

    def nsx(self, ns, *args, check=True, timeout=30):
        return sh("ip", "netns", "exec", ns, *args, check=check, timeout=timeout)

    def down(self):
        # every process in our namespaces (dnsmasq, dhclient, the metadata service, ...)
        for ns in [self.host, *self.vms.values()]:
            out = sh("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in out:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
        for ns in [*self.vms.values(), self.host]:
            sh("ip", "netns", "del", ns, check=False)

    # ------------------------------------------------------------------ DHCP clients

    def udhcpc(self, vm, tries=3):
        """Run udhcpc once in ``vm``; return its ``bound`` environment or None."""
        out = self.tmp / f"udhcpc-{vm}.env"
        if out.exists():
            out.unlink()
        script = self.tmp / f"udhcpc-{vm}.sh"
        script.write_text(f'#!/bin/sh\n[ "$1" = bound ] && env > {out}\nexit 0\n')
        script.chmod(0o755)
        proc = self.nsx(
            self.vms[vm],
            "udhcpc",
            "-i",
            "eth0",
            "-n",
            "-q",
            "-f",
            "-t",
            str(tries),
            "-T",
            "1",
            "-A",
            "1",
            "-O",
            "mtu",
            "-s",
            str(script),
            check=False,
            timeout=60,
        )
        if proc.returncode != 0 or not out.exists():
            return None
        return _env(out.read_text())

    def dhclient(self, vm, timeout=10):
        """Run dhclient once in ``vm`` (it daemonizes once bound); return the BOUND env."""
        d = self.tmp / f"dhclient-{vm}"
        d.mkdir(exist_ok=True)
        out = d / "bound.env"
        if out.exists():
            out.unlink()
        script = d / "script.sh"
        script.write_text(f'#!/bin/sh\ncase "$reason" in BOUND|REBOOT|RENEW|REBIND) env > {out};; esac\nexit 0\n')
        script.chmod(0o755)
        conf = d / "dhclient.conf"
        conf.write_text(
            f"timeout {timeout};\nretry 1;\n"
            "request subnet-mask, broadcast-address, routers, domain-name, host-name, interface-mtu;\n"
        )
        pidfile = d / "dhclient.pid"
        self.pidfiles.append(pidfile)
        proc = self.nsx(
            self.vms[vm],
            "dhclient",
            "-1",
            "-4",
            "-cf",
            str(conf),
            "-sf",
            str(script),
            "-lf",
            str(d / "dhclient.leases"),
            "-pf",
            str(pidfile),
            "eth0",
            check=False,
            timeout=timeout + 30,
        )
        self.kill_pidfile(pidfile)
        if proc.returncode != 0 or not out.exists():
            return None
        return _env(out.read_text())

    def kill_pidfile(self, pidfile):
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)


def _env(text):
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition("=")
        out[key] = value
    return out


@pytest.fixture
def lab(tmp_path):
    _need("ip", "dnsmasq", "dhcp_release", "dhclient", "udhcpc")
    lab = Lab(tmp_path)
    try:
        lab.up()
        yield lab
    finally:
        lab.down()


def spec(hosts=(), **kw):
    values = dict(
        network="private",
        bridge="br100",
        listen_address=HOST_IP,
        range_start="192.168.0.2",
        netmask="255.255.255.0",
        lease_time=3600,
        lease_max=256,
        domain="novalocal",
        router=HOST_IP,
        hosts=tuple(hosts),
    )
    values.update(kw)
    return Dnsmasq(**values)


H1 = DhcpHost(mac=MAC1, hostname="web1.novalocal", ip=IP1)
H2 = DhcpHost(mac=MAC2, hostname="web2.novalocal", ip=IP2)


def converge(lab, desired):
    """plan + apply inside the host namespace, like the minion does; return the changes."""
    managed = Managed(lab.paths)
    with in_netns(lab.host):
        changes = dnsmasq.plan(tuple(desired), dnsmasq.current(lab.paths, managed))
        dnsmasq.apply(changes, lab.paths, managed)
    return changes


def leases(lab):
    path = dnsmasq.files("private", lab.paths)["leases"]
    with open(path, encoding="utf-8") as fh:
        return dnsmasq.parse_leases(fh.read())


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


# --------------------------------------------------------------------------- DHCP


def test_dhcp_lifecycle(lab):
    lab.add_vm("1", MAC1)
    lab.add_vm("2", MAC2)
    lab.add_vm("3", MAC3)

    # start: vm1 gets its pillar address and the host as router, with both clients
    assert [c.action for c in converge(lab, [spec([H1])])] == ["start"]
    status = dnsmasq.status(lab.paths)["private"]
    assert status["running"] and status["hosts"] == 1
    pid = status["pid"]
    got = lab.udhcpc("1")
    assert got and got["ip"] == IP1 and got["router"] == HOST_IP
    got = lab.dhclient("1")
    assert got and got["new_ip_address"] == IP1 and got["new_routers"] == HOST_IP
    assert got["new_host_name"] == "web1"
    assert (MAC1, IP1) in leases(lab)

    # a MAC that is not in the hosts file gets nothing
    assert lab.udhcpc("3") is None
    assert all(mac != MAC3 for mac, _ in leases(lab))

    # converged: no change
    assert converge(lab, [spec([H1])]) == []

    # adding an instance: SIGHUP, same pid, vm1's lease kept, vm2 gets its address
    assert [c.action for c in converge(lab, [spec([H1, H2])])] == ["reload"]
    assert dnsmasq.status(lab.paths)["private"]["pid"] == pid
    assert (MAC1, IP1) in leases(lab)
    got = lab.udhcpc("2")
    assert got and got["ip"] == IP2 and got["router"] == HOST_IP
    assert (MAC1, IP1) in leases(lab) and (MAC2, IP2) in leases(lab)
    assert dnsmasq.status(lab.paths)["private"]["leases"] == 2

    # vm2 becomes use_single_default_gateway's second NIC: no router. The no-router
    # MACs are on dnsmasq's command line, so this restarts; the leases survive.
    h2 = DhcpHost(mac=MAC2, hostname="web2.novalocal", ip=IP2, default_route=False)
    assert [c.action for c in converge(lab, [spec([H1, h2])])] == ["restart"]
    pid = dnsmasq.status(lab.paths)["private"]["pid"]
    assert (MAC1, IP1) in leases(lab) and (MAC2, IP2) in leases(lab)
    got = lab.udhcpc("2")
    assert got and got["ip"] == IP2 and "router" not in got
    got = lab.dhclient("2")
    assert got and got["new_ip_address"] == IP2 and "new_routers" not in got
    got = lab.udhcpc("1")
    assert got and got["ip"] == IP1 and got["router"] == HOST_IP

    # removing an instance: dhcp_release, its lease leaves the lease file; same pid
    changes = converge(lab, [spec([h2])])
    assert [c.action for c in changes] == ["release", "reload"]
    assert wait_for(lambda: (MAC1, IP1) not in leases(lab))
    assert (MAC2, IP2) in leases(lab)
    assert dnsmasq.status(lab.paths)["private"]["pid"] == pid
    assert lab.udhcpc("1") is None  # and it no longer gets one

    # an option change restarts (new pid); the kept lease survives the restart
    assert [c.action for c in converge(lab, [spec([h2], lease_time=600)])] == ["restart"]
    new_pid = dnsmasq.status(lab.paths)["private"]["pid"]
    assert new_pid != pid and not dnsmasq.process_matches(pid, "dnsmasq")
    assert (MAC2, IP2) in leases(lab)
    got = lab.udhcpc("2")
    assert got and got["ip"] == IP2 and got["lease"] == "600"

    # a killed dnsmasq is restarted
    os.kill(new_pid, signal.SIGKILL)
    assert wait_for(lambda: not dnsmasq.current(lab.paths, Managed(lab.paths))["private"]["alive"])
    assert [c.action for c in converge(lab, [spec([h2], lease_time=600)])] == ["restart"]
    assert dnsmasq.status(lab.paths)["private"]["running"]

    # stop: process and files gone
    last = dnsmasq.status(lab.paths)["private"]["pid"]
    assert [c.action for c in converge(lab, [])] == ["stop"]
    assert not dnsmasq.process_matches(last, "dnsmasq")
    assert not any(os.path.exists(p) for p in dnsmasq.files("private", lab.paths).values())
    assert dnsmasq.status(lab.paths) == {}
    assert Managed(lab.paths).get("dnsmasq") == set()
    assert converge(lab, []) == []


class DhcpReplies:
    """Every DHCP reply (UDP 67 -> 68) that reaches ``vm``'s eth0, with whether its UDP
    checksum is valid, as a guest reading raw frames sees it."""

    def __init__(self, lab, vm):
        import socket
        import threading

        with in_netns(lab.vms[vm]):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
            self.sock.bind(("eth0", 0x0800))
        self.valid = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        import select

        from hanet_lab.wire import udp_checksum_valid, udp_ports

        while not self._stop.is_set():
            if not select.select([self.sock], [], [], 0.1)[0]:
                continue
            ip = self.sock.recv(4096)[14:]
            if udp_ports(ip) == (67, 68):
                self.valid.append(udp_checksum_valid(ip))

    def stop(self):
        self._stop.set()
        self._thread.join(2)
        self.sock.close()
        return self.valid


def test_dhcp_checksum_fill_gives_the_guest_valid_checksums(lab):
    """dhcp_checksum_fill (nova's mangle CHECKSUM rule): without it, dnsmasq's replies
    reach the guest with the checksum left to offload; with hanet's ruleset applied in
    the host, every reply a real client gets carries a valid one."""
    from _hanet import ruleset
    from _hanet.desired import Ruleset

    if not shutil.which("iptables-restore"):
        pytest.skip("needs iptables")
    lab.add_vm("1", MAC1)
    converge(lab, [spec([H1])])
    seen = DhcpReplies(lab, "1")
    try:
        assert lab.udhcpc("1")["ip"] == IP1
    finally:
        before = seen.stop()
    assert before and not any(before), before  # offloaded: what a checking guest drops
    rs = Ruleset(driver="nftables", table="hanet", checksum_fill=("br100",))
    managed = Managed(lab.paths)
    with in_netns(lab.host):
        ruleset.apply(ruleset.plan(rs, ruleset.current(rs, lab.paths)), lab.paths, managed)
    seen = DhcpReplies(lab, "1")
    try:
        assert lab.udhcpc("1")["ip"] == IP1
        assert lab.dhclient("1")["new_ip_address"] == IP1
    finally:
        after = seen.stop()
    assert len(after) >= 3 and all(after), after  # offer and ack to udhcpc, an ack to dhclient


def test_a_client_with_another_servers_lease_is_answered_at_once(lab):
    """An instance that moved here (or renews from a new owner after a failover) asks
    for its old lease first (DHCPREQUEST, INIT-REBOOT). hanet's dnsmasq is authoritative:
    it acknowledges that very request, so the client never falls back to a DISCOVER (a
    non-authoritative dnsmasq ignores it, and dhclient waits out its reboot timeout)."""
    lab.add_vm("1", MAC1)
    converge(lab, [spec([H1])])
    d = lab.tmp / "dhclient-1"
    d.mkdir(exist_ok=True)
    (d / "dhclient.leases").write_text(
        'lease {\n  interface "eth0";\n  fixed-address %s;\n  option subnet-mask 255.255.255.0;\n'
        "  option dhcp-server-identifier 192.168.0.99;\n  option dhcp-lease-time 3600;\n"
        "  renew 4 2037/01/01 00:00:00;\n  rebind 4 2037/01/01 00:00:00;\n"
        "  expire 4 2037/01/01 00:00:00;\n}\n" % IP1
    )
    got = lab.dhclient("1", timeout=30)
    assert got and got["new_ip_address"] == IP1 and got["reason"] == "REBOOT", got
    log = dnsmasq.files("private", lab.paths)["log"]
    with open(log, encoding="utf-8") as fh:
        text = fh.read()
    assert f"DHCPACK(br100) {IP1} {MAC1}" in text and "DHCPDISCOVER" not in text, text


def test_the_supervisor_restarts_what_died_and_leaves_what_was_stopped(lab):
    """dnsmasq killed: started again with its leases and the same command line, and
    reported; dnsmasq stopped by an apply: left stopped."""
    from _hanet import supervise

    lab.add_vm("1", MAC1)
    converge(lab, [spec([H1])])
    assert lab.udhcpc("1")["ip"] == IP1
    old = dnsmasq.status(lab.paths)["private"]["pid"]
    seen = []
    with in_netns(lab.host):
        os.kill(old, signal.SIGKILL)
        assert wait_for(lambda: not dnsmasq.process_matches(old, "dnsmasq"))
        sup = supervise.Supervisor(lab.paths, lambda *a: seen.append(a))
        assert sup.check() == [], "never seen running (a record from before a reboot): left to an apply"
    converge(lab, [spec([H1])])
    old = dnsmasq.status(lab.paths)["private"]["pid"]
    with in_netns(lab.host):
        assert sup.check() == [], "nothing died"
        os.kill(old, signal.SIGKILL)
        assert wait_for(lambda: not dnsmasq.process_matches(old, "dnsmasq"))
        got = sup.check()
    assert [(k, n) for k, n, _ in got] == [("dnsmasq", "private")] and seen == got
    st = dnsmasq.status(lab.paths)["private"]
    assert st["running"] and st["pid"] == got[0][2] != old and st["leases"] == 1
    assert converge(lab, [spec([H1])]) == [], "the same dnsmasq an apply would run"
    assert lab.udhcpc("1")["ip"] == IP1
    converge(lab, [])
    with in_netns(lab.host):
        assert sup.check() == [], "a stopped dnsmasq stays stopped"
    assert dnsmasq.status(lab.paths) == {}


def test_conf_file_router_recipe(lab, tmp_path):
    """nova's hardware-gateway recipe in dnsmasq_config_file wins over the router hanet
    hands out, for the quoted (Essex) and the bare tag alike; a no-default-route NIC
    still gets no router; the MTU goes out as option 26."""
    lab.add_vm("1", MAC1)
    lab.add_vm("2", MAC2)
    h2 = DhcpHost(mac=MAC2, hostname="web2.novalocal", ip=IP2, default_route=False)
    conf = tmp_path / "nova-dnsmasq.conf"
    for line in (
        "dhcp-option=tag:'private',option:router,192.168.0.1",
        "dhcp-option=tag:private,option:router,192.168.0.1",
    ):
        conf.write_text(line + "\n")
        converge(lab, [spec([H1, h2], conf_file=str(conf), mtu=1400)])
        got = lab.udhcpc("1")
        assert got and got["ip"] == IP1 and got["router"] == "192.168.0.1", line
        assert got["mtu"] == "1400"
        got = lab.udhcpc("2")
        assert got and got["ip"] == IP2 and "router" not in got, line
        assert [c.action for c in converge(lab, [])] == ["stop"]
    # router None: no router at all
    converge(lab, [spec([H1], router=None)])
    got = lab.udhcpc("1")
    assert got and got["ip"] == IP1 and "router" not in got


def test_two_networks_one_host(lab):
    """Two dnsmasqs side by side (bind-interfaces), each serving only its own bridge."""
    lab.add_vm("1", MAC1)
    lab.nsx(lab.host, "ip", "link", "add", "br101", "type", "bridge")
    lab.nsx(lab.host, "ip", "addr", "add", "172.16.100.3/24", "dev", "br101")
    lab.nsx(lab.host, "ip", "link", "set", "br101", "up")
    ns = lab.ns("r")
    sh("ip", "netns", "add", ns)
    lab.vms["r"] = ns
    sh(
        "ip",
        "link",
        "add",
        "tr",
        "netns",
        lab.host,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        ns,
        "address",
        MAC2,
    )
    lab.nsx(lab.host, "ip", "link", "set", "tr", "master", "br101", "up")
    lab.nsx(ns, "ip", "link", "set", "eth0", "up")
    red = spec(
        [DhcpHost(mac=MAC2, hostname="db1.novalocal", ip="172.16.100.20")],
        network="red",
        bridge="br101",
        listen_address="172.16.100.3",
        range_start="172.16.100.2",
        router="172.16.100.1",
    )
    assert sorted(c.action for c in converge(lab, [spec([H1]), red])) == ["start", "start"]
    got = lab.udhcpc("r")
    assert got and got["ip"] == "172.16.100.20" and got["router"] == "172.16.100.1"
    got = lab.udhcpc("1")
    assert got and got["ip"] == IP1 and got["router"] == HOST_IP
    assert [(c.action, c.target) for c in converge(lab, [red])] == [("stop", "private")]
    assert lab.udhcpc("r")["ip"] == "172.16.100.20"


# --------------------------------------------------------------------------- metadata

WEB1 = InstanceRecord(
    name="web1",
    uuid="11111111-1111-1111-1111-111111111111",
    hostname="web1.novalocal",
    ips=(IP1,),
    public_keys=(("k", "ssh-ed25519 AAAA web1"),),
    user_data="#!/bin/sh\n",
)
WEB2 = InstanceRecord(name="web2", uuid="22222222-2222-2222-2222-222222222222", hostname="web2.novalocal", ips=(IP2,))


def curl(lab, vm, url):
    proc = lab.nsx(lab.vms[vm], "curl", "-s", "-m", "5", "-o", "-", "-w", "\n%{http_code}", url, check=False)
    body, _, code = proc.stdout.rpartition("\n")
    return int(code or 0), body


def test_metadata_by_source_ip(lab):
    _need("curl")
    for name, mac, ip in (("1", MAC1, IP1), ("2", MAC2, IP2), ("3", MAC3, IP3)):
        lab.add_vm(name, mac)
        lab.nsx(lab.vms[name], "ip", "addr", "add", f"{ip}/24", "dev", "eth0")
    port = 8775
    meta = Metadata(bridges=("br100",), host="127.0.0.1", port=port, local_service=True)
    managed = Managed(lab.paths)
    with in_netns(lab.host):
        changes = metadata.plan(meta, metadata.current(lab.paths, managed), [WEB1, WEB2])
        assert [c.action for c in changes] == ["records", "start"]
        metadata.apply(changes, lab.paths, managed)
    pid = metadata.status(lab.paths)["pid"]
    assert pid and metadata.status(lab.paths)["running"]

    base = f"http://{HOST_IP}:{port}"
    code, body = curl(lab, "1", f"{base}/openstack/latest/meta_data.json")
    assert code == 200 and json.loads(body)["uuid"] == WEB1.uuid
    code, body = curl(lab, "2", f"{base}/openstack/latest/meta_data.json")
    assert code == 200 and json.loads(body)["uuid"] == WEB2.uuid
    assert curl(lab, "3", f"{base}/openstack/latest/meta_data.json")[0] == 404
    assert curl(lab, "1", f"{base}/latest/meta-data/local-ipv4") == (200, IP1)
    assert curl(lab, "1", f"{base}/latest/meta-data/public-keys/0/openssh-key") == (200, "ssh-ed25519 AAAA web1")
    assert curl(lab, "1", f"{base}/latest/user-data") == (200, "#!/bin/sh\n")
    assert curl(lab, "2", f"{base}/latest/user-data")[0] == 404

    # a new record reaches the running service without a restart
    web3 = InstanceRecord(
        name="web3", uuid="33333333-3333-3333-3333-333333333333", hostname="web3.novalocal", ips=(IP3,)
    )
    with in_netns(lab.host):
        changes = metadata.plan(meta, metadata.current(lab.paths, managed), [WEB1, WEB2, web3])
        assert [c.action for c in changes] == ["records"]
        metadata.apply(changes, lab.paths, managed)
    code, body = curl(lab, "3", f"{base}/openstack/latest/meta_data.json")
    assert code == 200 and json.loads(body)["uuid"] == web3.uuid
    assert metadata.status(lab.paths)["pid"] == pid

    with in_netns(lab.host):
        metadata.apply(metadata.plan(None, metadata.current(lab.paths, managed)), lab.paths, managed)
    assert not metadata.status(lab.paths)
    assert curl(lab, "1", f"{base}/openstack/latest/meta_data.json")[0] == 0
