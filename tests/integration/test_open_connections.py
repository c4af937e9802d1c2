"""Open connections survive a failover (issue 14 §3), in the lab, with real parts only:

    net1, net2   network hosts of `shared` (10.20.0.0/24, gateway 10.20.0.1), whose
                 instances leave by SNAT to its snat_address 203.0.113.45: bound by the
                 owner like a floating IP and moved with the gateway; conntrackd on
                 each (ha:conntrack_sync over mgmt0) carries the flows to the other
    app1         10.20.0.10 on compute1, floating IP 203.0.113.60
    app2         10.20.0.11 on compute2, no floating IP (a VM this module adds)
    router       203.0.113.1 upstream

Two TCP streams with a byte counter on each end (hanet_lab.stream: both ends send a
numbered byte stream and check every byte they receive) run while the owner loses
power: app2 -> router (leaves by the SNAT address) and router -> app1's floating IP.
Neither may see a reset or lose a byte; a pause the length of the outage is fine. The
pause is measured in ``./dev bench failover`` too.
"""

import time

import pytest
from hanet_checks import failover_cluster, holders, state_apply

pytestmark = pytest.mark.lab

NET = "shared"
SNAT = "203.0.113.45"
FLOATING = "203.0.113.60"
ROUTER = "203.0.113.1"
APP2_IP, APP2_MAC = "10.20.0.11", "fa:16:3e:00:01:02"


@pytest.fixture(scope="module")
def lab_topology():
    from hanet_lab import default_topology
    from hanet_lab.topology import VM, Nic

    topo = default_topology(hosts=4)
    topo.vms["app2"] = VM(name="app2", host="compute2", nics=[Nic(bridge="br200", mac=APP2_MAC)])
    return topo


@pytest.fixture(scope="module")
def cluster(lab):
    def tweak(pillar):
        pillar["networks"][NET]["snat_address"] = SNAT
        pillar.setdefault("ha", {})["conntrack_sync"] = {"interface": "mgmt0"}
        pillar["instances"]["app2"] = {
            "host": "compute2",
            "nics": [{"network": NET, "mac": APP2_MAC, "ip": APP2_IP}],
        }

    lab = failover_cluster(lab, FLOATING, tweak=tweak)
    # Strict TCP tracking on the network hosts: a mid-stream packet of a flow the kernel
    # does not know is INVALID (no NAT, no pickup), so the streams below survive only
    # with the state conntrackd carried over (the kernel's default, loose pickup, would
    # let the outbound stream re-establish its mapping on its own)
    for host in ("net1", "net2"):
        lab.exec(host, ["sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_loose=0"], check=True)
    lab.plug_vm("app2")
    state_apply(lab, ["compute2"], timeout=300)
    assert lab.dhcp("app2", client="udhcpc")["address"] == APP2_IP
    return lab


def test_the_owner_holds_the_snat_address_and_the_standby_does_not(cluster):
    lab = cluster
    assert holders(lab, SNAT) == ["net1"]
    out = lab.exec("router", ["ping", "-c", "1", "-W", "2", SNAT])
    assert out.returncode == 0, out.stdout  # the owner answers for it upstream


def external_cache(lab, host):
    """The flows ``host``'s conntrackd holds for its peers (``conntrackd -e``)."""
    import os

    conf = os.path.join(lab.minion_root(host), "var", "lib", "hanet", "conntrackd", "conntrackd.conf")
    return lab.exec(host, ["conntrackd", "-C", conf, "-e"]).stdout


def conntrackd_pid(lab, host):
    """The pid of ``host``'s live conntrackd, or None (hanet's own reading of its files)."""
    from _hanet import conntrackd
    from _hanet.common import Paths

    return conntrackd.current(Paths(root_dir=lab.minion_root(host)))["pid"]


def test_a_killed_conntrackd_is_started_again_and_gets_the_owners_flows_back(cluster):
    """A daemon that dies between applies (the brief's "a daemon dies"): the beacon's
    supervisor starts it again, and the new daemon asks the owner for its flows at once
    (StartupResync), so the next failover still keeps the open connections."""
    import os
    import signal

    from hanet_lab.stream import Stream

    lab = cluster
    into = Stream(lab, "app1", "router", FLOATING, 5003, 12.0).start()
    try:
        deadline = time.monotonic() + 10
        while "dport=5003" not in external_cache(lab, "net2") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "dport=5003" in external_cache(lab, "net2")
        old = conntrackd_pid(lab, "net2")
        assert old, "conntrackd runs on the standby"
        with lab.events() as ev:
            os.kill(old, signal.SIGKILL)
            restarted = ev.wait("hanet/daemon/net2/conntrackd/conntrackd/restarted", timeout=10)
        assert restarted, "the supervisor did not restart conntrackd"
        new = conntrackd_pid(lab, "net2")
        assert new and new != old and restarted["data"]["pid"] == new
        # the new daemon's external cache holds the owner's open flow again, without
        # waiting for the owner to send an update of it
        deadline = time.monotonic() + 5
        while "dport=5003" not in external_cache(lab, "net2") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "dport=5003" in external_cache(lab, "net2")
    finally:
        into.stop()


def test_streams_through_the_snat_address_and_a_floating_ip_survive_a_power_loss(cluster):
    from hanet_lab import chaos
    from hanet_lab.stream import Stream

    lab = cluster
    duration = 8.0
    out = Stream(lab, "router", "app2", ROUTER, 5001, duration).start()
    into = Stream(lab, "app1", "router", FLOATING, 5002, duration).start()
    try:
        with lab.events() as ev:
            time.sleep(2)
            # the standby's conntrackd has both flows from the owner's before the loss
            cache = external_cache(lab, "net2")
            assert "dport=5001" in cache and f"dst={FLOATING}" in cache, cache
            t0 = chaos.power_off(lab, "net1")
            done = ev.wait(f"hanet/failover/{NET}/complete", timeout=20)
        assert done, "no complete event"
        assert SNAT in done["data"]["addresses"]
        assert "committed_s" in done["data"]["timings"]  # conntrackd's cache, before the bind
        got = {"out": out.results(duration + 30), "in": into.results(duration + 30)}
    finally:
        out.stop()
        into.stop()
        chaos.power_on_started(lab, "net1")
    for name, ends in got.items():
        assert ends["server"] and ends["client"], (name, ends)
        for end in ("server", "client"):
            assert ends[end]["error"] is None, (name, end, ends)  # no reset
            assert ends[end]["intact"], (name, end, ends)
        # every byte sent arrived, both ways, and the stream outlived the failover
        assert ends["server"]["received"] == ends["client"]["sent"] > 0, (name, ends)
        assert ends["client"]["received"] == ends["server"]["sent"] > 0, (name, ends)
        assert max(e["pause_s"] for e in ends.values()) > 0.1  # the outage is there
        assert all(e["pause_at"] is None or e["pause_at"] > t0 - 1 for e in ends.values())
    # upstream saw app2 by the network's SNAT address, before and after the move
    assert got["out"]["server"]["peer"] == SNAT
    assert holders(lab, SNAT) == ["net2"]
