"""The namespace lab itself: real salt-master and minions in namespaces, the router,
VMs, and the cleanup guarantee (normal exit, exception, SIGTERM, SIGINT, SIGKILL + sweep)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from pyroute2 import IPRoute

from hanet_lab import Lab, LabError, default_topology, nslib, state

pytestmark = [pytest.mark.lab, pytest.mark.timeout(300)]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "lab"), os.path.join(ROOT, "_modules")])}


@pytest.fixture(scope="module")
def lab_topology():
    return default_topology(hosts=2)  # master + compute1 + compute2, router, VMs


# --- helpers -------------------------------------------------------------------------------


def lab_cli(*args, timeout=180, check=True):
    cp = subprocess.run(
        [sys.executable, "-m", "hanet_lab", *args], capture_output=True, text=True, timeout=timeout, env=ENV, cwd=ROOT
    )
    if check and cp.returncode != 0:
        raise AssertionError(f"hanet_lab {' '.join(args)} -> {cp.returncode}\n{cp.stdout}\n{cp.stderr}")
    return cp


def snapshot(prefix):
    """Everything lab ``prefix`` has now: namespaces, and processes found in them."""
    names = state.namespaces_of(prefix)
    inodes = {nslib.ns_inode(n) for n in names}
    pids = {p: nslib.cmdline(p) for p in nslib.pids_in(inodes)}
    return {"namespaces": names, "pids": pids}


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def assert_gone(prefix, pids=(), timeout=5.0):
    """Nothing of lab ``prefix`` is left: namespaces, state, run dir, processes (the ones seen
    while it ran, and any whose command line names its run dir or prefix)."""
    rundir = state.rundir_for(prefix)
    deadline = time.monotonic() + timeout
    while True:
        left_pids = [p for p in pids if alive(p)]
        marked = [p for p in nslib.pids_in([], [rundir, prefix + "-"]) if alive(p)]
        if not left_pids and not marked or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not left_pids, {p: nslib.cmdline(p) for p in left_pids}
    assert not marked, {p: nslib.cmdline(p) for p in marked}
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert prefix not in listed
    assert not [n for n in nslib.ns_list() if n.startswith(prefix)]
    assert not os.path.exists(rundir)
    assert not os.path.exists(state.state_path(prefix))


# --- salt through the master ------------------------------------------------------------------


def test_each_minion_sees_only_its_own_namespace(lab):
    # a link only compute1 has, one only compute2 has
    for host in ("compute1", "compute2"):
        with IPRoute(netns=lab.ns(host), flags=0) as ipr:
            ipr.link("add", ifname=f"only-{host}", kind="bridge")
    with IPRoute() as ipr:
        root_links = {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
    switch_links = set(lab.links("switch"))

    got = lab.salt("*", "hanet.links")

    assert set(got) == {"compute1", "compute2"}
    for host, other in (("compute1", "compute2"), ("compute2", "compute1")):
        seen = got[host]
        assert seen == lab.links(host)  # exactly what is in that namespace
        assert {"lo", "mgmt0", "eth0", "eth1", f"only-{host}"} <= set(seen)
        assert f"only-{other}" not in seen
        assert not (set(seen) & (switch_links - {"lo"}))  # no segment bridge, no switch port
        assert not (set(seen) & (root_links - set(lab.links(host))))  # nothing of the machine's


def test_runner_pillar_and_events(lab):
    assert sorted(lab.salt_run("manage.up")) == ["compute1", "compute2"]
    with lab.events() as ev:
        lab.set_pillar({"hanet": {}, "lab_marker": "m-42"})
        assert lab.salt("*", "pillar.get", ["lab_marker"], {"unmask": True}) == {"compute1": "m-42", "compute2": "m-42"}
        lab.salt("compute1", "event.send", ["hanet/lab/test", {"x": 1}])
        got = ev.wait("hanet/lab/*", timeout=10)
    assert got and got["tag"] == "hanet/lab/test" and got["data"]["data"]["x"] == 1
    lab.set_pillar({"hanet": {}})


def test_salt_call_inside_a_host(lab):
    assert lab.salt_call("compute2", "hanet.links", local=True) == lab.links("compute2")


def test_an_attached_handle_does_not_take_the_lab_over(lab):
    before = state.read_state(lab.prefix)
    other = Lab.attach(lab.prefix)
    assert other.salt("compute1", "test.ping") == {"compute1": True}
    other.unplug_vm("db1")  # writes the state file
    after = state.read_state(lab.prefix)
    assert (
        (after["owner_pid"], after["owner_start"])
        == (before["owner_pid"], before["owner_start"])
        == (os.getpid(), nslib.pid_start_time(os.getpid()))
    )


# --- the router -------------------------------------------------------------------------------


def test_router_ping_http_whoami_and_arp(lab):
    assert lab.ping("compute1", "203.0.113.1")
    assert lab.http_get("compute2", "http://203.0.113.1/whoami").strip() == "203.0.113.12"
    assert lab.http_get("compute1", "http://203.0.113.1/").strip() == "router router"
    assert ("203.0.113.12", "GET", "/whoami") in lab.router_log()
    arp = lab.arp_cache("router")
    assert arp["203.0.113.12"]["mac"] == lab.mac("compute2", "eth0")
    assert arp["203.0.113.12"]["ifname"] == "eth0"
    # the hardware-router leg on seg-hw
    assert "172.16.100.1/24" in lab.addresses("router", "eth1")


# --- VMs ---------------------------------------------------------------------------------------


def test_vm_plugged_into_a_host_bridge_pings_the_host_and_gets_dhcp(lab):
    host, vm = "compute1", "web1"
    with pytest.raises(LabError, match="no bridge br100"):
        lab.plug_vm(vm)
    # hanet's states would make br100; here the test makes it with pyroute2
    nslib.add_bridge(lab.ns(host), "br100")
    nslib.add_address(lab.ns(host), "br100", "192.168.0.3/24")

    taps = lab.plug_vm(vm)

    assert taps == ["tap-web1"]
    assert lab.mac(vm, "eth0") == "fa:16:3e:00:00:01"
    with IPRoute(netns=lab.ns(host), flags=0) as ipr:
        tap = ipr.get_links(ipr.link_lookup(ifname="tap-web1")[0])[0]
        assert tap.get_attr("IFLA_MASTER") == ipr.link_lookup(ifname="br100")[0]
    nslib.add_address(lab.ns(vm), "eth0", "192.168.0.99/24")
    assert lab.ping(vm, "192.168.0.3", timeout=3)

    # a real dnsmasq on the bridge, then both DHCP clients
    leases = os.path.join(lab.rundir, "test-dnsmasq.leases")
    lab.popen(
        host,
        [
            "dnsmasq",
            "--keep-in-foreground",
            "--port=0",
            "--conf-file=/dev/null",
            "--pid-file",
            "--interface=br100",
            "--bind-interfaces",
            "--except-interface=lo",
            f"--dhcp-leasefile={leases}",
            "--dhcp-range=192.168.0.10,192.168.0.20,255.255.255.0,120",
            "--dhcp-host=fa:16:3e:00:00:01,192.168.0.12",
            "--dhcp-option=option:router,192.168.0.3",
            "--dhcp-option=option:mtu,1400",
            "--domain=novalocal",
        ],
        name="test-dnsmasq",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.3)
    for client in ("dhclient", "udhcpc"):
        got = lab.dhcp(vm, client=client)
        assert got["address"] == "192.168.0.12", got
        assert got["prefixlen"] == 24 and got["router"] == "192.168.0.3", got
        assert got["mtu"] == 1400, got
        assert lab.addresses(vm, "eth0") == ["192.168.0.12/24"]
        assert lab.ping(vm, "192.168.0.3")
    # no DHCP client is left running in the VM
    deadline = time.monotonic() + 5
    while lab.processes(vm)[vm] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not lab.processes(vm)[vm]

    lab.unplug_vm(vm)
    assert "tap-web1" not in lab.links(host)
    assert "eth0" not in lab.links(vm)


# --- cleanup: CLI up/down ----------------------------------------------------------------------


def test_cli_up_then_down_leaves_nothing():
    up = lab_cli("up", "--hosts", "1", "--no-vms", "--no-sync")
    prefix = next(line.split()[-1] for line in up.stdout.splitlines() if line.startswith("hanet lab: building"))
    try:
        st = state.read_state(prefix)
        assert st and st["owner_pid"] is None  # detached: outlives the CLI process
        status = lab_cli("status").stdout
        assert prefix in status and "salt-minion" in status
        # something the lab did not start itself: a daemonizing dnsmasq, and a detached sleep
        lab_cli(
            "exec",
            "--prefix",
            prefix,
            "compute1",
            "--",
            "dnsmasq",
            "--port=0",
            "--conf-file=/dev/null",
            "--pid-file",
            "--user=root",
        )
        lab_cli("exec", "--prefix", prefix, "compute1", "--", "sh", "-c", "setsid sleep 4321 >/dev/null 2>&1 &")
        assert lab_cli("exec", "--prefix", prefix, "compute1", "--", "ip", "-br", "link").stdout.count("mgmt0") == 1
        assert lab_cli("salt", "--prefix", prefix, "compute1", "test.ping").stdout.strip() == "compute1: true"
        snap = snapshot(prefix)
        cmdlines = " ".join(snap["pids"].values())
        assert "salt-master" in cmdlines and "salt-minion" in cmdlines
        assert "dnsmasq" in cmdlines and "sleep 4321" in cmdlines
    finally:
        down = lab_cli("down", "--prefix", prefix)
    assert f"removed {prefix}" in down.stdout
    assert_gone(prefix, snap["pids"])


# --- cleanup: crashes --------------------------------------------------------------------------

CRASH = r"""
import json, os, sys, time
from hanet_lab import Lab, default_topology
mode = sys.argv[1]
salt = mode in ("fail-in-up", "sigterm", "sigkill")  # the others: same code path, faster without salt
lab = Lab(default_topology(hosts=1, vms=False), salt=salt, sync=False)
if mode == "fail-in-up":
    def boom():
        raise RuntimeError("injected failure in up")
    lab._plug_present_vms = boom
print(json.dumps({"prefix": lab.prefix}), flush=True)
with lab:
    # a process the lab does not know about (no run dir in its command line)
    lab.popen("compute1", ["sleep", "3333"])
    names = list(lab.namespaces.values())
    from hanet_lab import nslib
    deadline = time.monotonic() + 20
    while True:  # `ip netns exec` enters the namespace a moment after it starts
        pids = nslib.pids_in({nslib.ns_inode(n) for n in names})
        if any("sleep 3333" in nslib.cmdline(pid) for pid in pids) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    print(json.dumps({"prefix": lab.prefix, "pids": pids}), flush=True)
    if mode == "exception":
        raise RuntimeError("test crash")
    time.sleep(600)
"""


def start_crash(mode):
    p = subprocess.Popen(
        [sys.executable, "-c", CRASH, mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        cwd=ROOT,
        # Ctrl-C reaches the owner as at a terminal, also when the tests run in a
        # background job (a shell starts those with SIGINT ignored, and Python keeps it so)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    prefix = json.loads(p.stdout.readline())["prefix"]
    line = p.stdout.readline()  # after up: the processes in the lab's namespaces
    info = json.loads(line) if line.strip() else None
    return p, prefix, info


@pytest.mark.parametrize("mode", ["exception", "fail-in-up", "sigterm", "sigint"])
def test_crash_of_the_owner_cleans_up(mode):
    p, prefix, info = start_crash(mode)
    try:
        if mode == "fail-in-up":
            assert info is None
            p.wait(60)
            err = p.stderr.read()
            assert "injected failure in up" in err and p.returncode != 0
            assert_gone(prefix)
            return
        assert info, p.stderr.read()
        # with salt: salt-master (+ workers), salt-minion, httpd, sleep; without: httpd, sleep
        assert len(info["pids"]) >= (4 if mode == "sigterm" else 2)
        if mode == "sigterm":
            p.send_signal(signal.SIGTERM)
        elif mode == "sigint":
            p.send_signal(signal.SIGINT)
        p.wait(60)
        err = p.stderr.read()
        if mode == "exception":
            assert "test crash" in err and p.returncode == 1
        elif mode == "sigterm":
            assert p.returncode == -signal.SIGTERM
        else:
            assert "KeyboardInterrupt" in err
        assert_gone(prefix, info["pids"])
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        state.destroy(prefix)


def test_sigkilled_owner_is_swept_by_down_stale():
    p, prefix, info = start_crash("sigkill")
    try:
        p.kill()
        p.wait(30)
        time.sleep(0.5)
        # SIGKILL cannot be caught: everything is still there, the lab is marked stale
        assert state.namespaces_of(prefix)
        assert [pid for pid in info["pids"] if alive(pid)]
        assert "STALE" in [line for line in lab_cli("status").stdout.splitlines() if line.startswith(prefix)][0]
        lab_cli("down", "--stale")
        assert_gone(prefix, info["pids"])
    finally:
        state.destroy(prefix)


def test_leftovers_without_state_file_are_swept():
    p, prefix, info = start_crash("nosalt-kill")
    try:
        p.kill()
        p.wait(30)
        os.unlink(state.state_path(prefix))  # the state file is gone too
        assert state.namespaces_of(prefix)
        status = lab_cli("status").stdout
        assert f"{prefix}: LEFTOVER" in status
        lab_cli("down", "--stale")
        assert_gone(prefix, info["pids"])
    finally:
        state.destroy(prefix)
