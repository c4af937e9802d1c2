"""Failover under the faults a clean power loss does not show, in the lab, real parts only.

    net1, net2, compute2   network hosts of `shared` (10.20.0.0/24, gateway 10.20.0.1), in order
    compute1               app1 10.20.0.10 on br200 (floating IP 203.0.113.60)
    router                 203.0.113.1 upstream

The one-shot path (a beacon's report, the master's decision, one order) is the fast
path; the master engine's reconcile loop makes the failover happen or finish when a
piece of it is lost. Each test checks what an operator would: who holds the gateway and
the floating IP (exactly one host), that traffic flows again, and the record.
"""

import os
import time

import pytest
from hanet_checks import failover_cluster, state_apply

pytestmark = pytest.mark.lab

NET = "shared"
GATEWAY = "10.20.0.1"
FLOATING = "203.0.113.60"
ROUTER = "203.0.113.1"
NETWORK_HOSTS = ("net1", "net2", "compute2")


@pytest.fixture(scope="module")
def lab_topology():
    from hanet_lab import default_topology

    return default_topology(hosts=4)


@pytest.fixture(scope="module")
def cluster(lab):
    """The failover tests' cluster with a third network host: compute2 stands by too."""
    failover_cluster(lab, FLOATING, GATEWAY)
    from hanet_lab.pillar import lab_pillar

    pillar = lab_pillar(lab.topology)
    pillar["hanet"]["instances"]["app1"]["floating_ips"] = [FLOATING]
    pillar["hanet"]["networks"][NET]["network_hosts"] = list(NETWORK_HOSTS)
    pillar["hanet"]["hosts"]["compute2"]["networks"][NET] = {"address": "10.20.0.4"}
    lab.set_pillar(pillar)
    state_apply(lab, sorted(lab.topology.hosts), timeout=300)
    time.sleep(2)  # the beacons' first verdicts about the new peer
    assert holders(lab, GATEWAY) == ["net1"]
    return lab


def holders(lab, address):
    """Network hosts that hold ``address`` now and are powered (a host without power
    keeps its kernel state in the lab, with every link down)."""
    import subprocess

    out = []
    for host in NETWORK_HOSTS:
        up = (
            "state UP"
            in subprocess.run(
                ["ip", "-n", lab.ns(host), "-o", "link", "show", "mgmt0"], capture_output=True, text=True
            ).stdout
        )
        if up and any(a.split("/")[0] == address for a in lab.addresses(host)):
            out.append(host)
    return out


def record(lab):
    from _hanet import failover

    return failover.read_owners(os.path.join(lab.master_root, "var", "cache", "salt", "master"))


def wait_for(what, predicate, timeout=45):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def served_by(lab, host):
    """Exactly ``host`` (or, given a tuple, one of those hosts) holds the gateway and the
    floating IP, the record says so and confirms it, and app1 reaches the router through
    the gateway again. Returns the record's entry."""
    hosts = host if isinstance(host, tuple) else (host,)

    def one_holder():
        got = holders(lab, GATEWAY)
        return len(got) == 1 and got[0] in hosts and holders(lab, FLOATING) == got and got[0]

    host = wait_for(f"one of {hosts} alone holding {GATEWAY} and {FLOATING}", one_holder)
    wait_for(
        f"the record confirming {host}",
        lambda: record(lab)[NET]["owner"] == host and record(lab)[NET]["confirmed"] is True,
    )
    assert lab.ping("app1", ROUTER, count=3, timeout=5)
    return record(lab)[NET]


def test_a_decision_the_master_saved_but_never_sent_is_sent_again(cluster):
    """The master dies between recording a move and publishing its order: when it
    comes back, the unconfirmed move in the record is ordered again."""
    from hanet_lab import chaos

    from _hanet import failover

    lab = cluster
    before = record(lab).get(NET, {}).get("epoch", 0)
    lab.stop_master()
    chaos.power_off(lab, "net1")
    cachedir = os.path.join(lab.master_root, "var", "cache", "salt", "master")
    with failover.Record(cachedir) as rec:
        failover.record_move(
            rec.owners,
            failover.Move(NET, "net1", "net2", before + 1),
            time.time() - 10,
            "test: decided, then the master died",
        )
        rec.save()
    lab.start_master()
    got = served_by(lab, "net2")
    assert got["epoch"] == before + 1, "re-sent, not decided again"
    chaos.power_on(lab, "net1")
    wait_for("net1 back as standby", lambda: lab.serving("net1").get("networks", {}).get(NET) is False)
    assert holders(lab, GATEWAY) == ["net2"]


def test_the_owner_dies_while_the_master_is_down(cluster):
    """Every report of the death is lost (the master is down); when the master is back,
    its watch sees the owner dead, a standby confirms it from the segment, and the
    network moves without a new report from anyone."""
    from hanet_lab import chaos

    lab = cluster
    before = record(lab)[NET]
    assert before["owner"] == "net2"
    lab.stop_master()
    chaos.power_off(lab, "net2")
    time.sleep(8)  # the standbys' beacons see net2 down and report it to nobody
    lab.start_master()
    with lab.events() as ev:
        got = served_by(lab, "net1")
        done = ev.wait(f"hanet/failover/{NET}/complete", timeout=5)
    assert got["epoch"] == before["epoch"] + 1 and "reconcile" in got["reason"], got
    assert done is None or done["data"]["to"] == "net1"
    chaos.power_on(lab, "net2")


def test_owner_and_first_standby_die_together_the_third_serves(cluster):
    from hanet_lab import chaos

    lab = cluster
    assert record(lab)[NET]["owner"] == "net1"
    wait_for("net2 back as standby", lambda: lab.serving("net2").get("networks", {}).get(NET) is False)
    time.sleep(2)  # the beacons see net2 up again
    before = record(lab)[NET]["epoch"]
    chaos.power_off(lab, "net1")
    chaos.power_off(lab, "net2")
    got = served_by(lab, "compute2")
    assert got["epoch"] > before
    for host in ("net1", "net2"):
        chaos.power_on(lab, host)
    wait_for(
        "both back as standbys",
        lambda: all(lab.serving(h).get("networks", {}).get(NET) is False for h in ("net1", "net2")),
    )
    assert holders(lab, GATEWAY) == ["compute2"] and holders(lab, FLOATING) == ["compute2"]


def test_a_partitioned_owner_falls_silent_before_the_standby_binds(cluster):
    """The owner is cut off from everything (every link down, its processes and kernel
    state intact). It sees no peer, no master and no next hop, and drops what it serves
    (rule 2) before the standby is ordered to bind; when the partition heals it holds
    nothing, so there is no moment with two holders (on the wire either), it stays
    quiet, and the new owner announces the addresses again."""
    from hanet_lab import chaos
    from hanet_lab.arpwatch import ArpWatch

    lab = cluster
    assert record(lab)[NET]["owner"] == "compute2"
    links = list(lab.topology.hosts["compute2"].links)
    chaos.cut(lab, "compute2", links)
    try:
        new = served_by(lab, ("net1", "net2"))["owner"]  # the standby whose report came first
        held = [a.split("/")[0] for a in lab.addresses("compute2")]
        assert GATEWAY not in held and FLOATING not in held, held
        wire = ArpWatch(lab, [("seg-shared", GATEWAY), ("public", FLOATING)]).start()
    finally:
        chaos.mend(lab, "compute2", links)
    try:
        for _ in range(20):  # for a while after the heal: one holder only
            assert holders(lab, GATEWAY) == [new] and holders(lab, FLOATING) == [new]
            time.sleep(0.25)
        # the new owner's beacon sees the loser back (rise probes) and announces again;
        # on a loaded machine that may come after the five seconds above
        wait_for(
            "the new owner announcing again",
            lambda: lab.mac(new, "eth3") in wire.summary()[GATEWAY]["announced_by"],
            timeout=20,
        )
    finally:
        wire.stop()
    seen = wire.summary()
    assert seen[GATEWAY]["two_holders_s"] == 0 and seen[FLOATING]["two_holders_s"] == 0, seen
    assert seen[GATEWAY]["macs"] == [lab.mac(new, "eth3")], seen
    assert lab.ping("app1", ROUTER, count=3, timeout=5)
    assert lab.ping("router", FLOATING, count=3, timeout=5)


def test_an_owner_cut_off_from_all_but_the_router_falls_silent_and_never_answers_twice(cluster):
    """An asymmetric partition with every carrier up: the switch stops forwarding
    between the owner and everything but the router's ports. The standbys and the
    master lose the owner, while its uplink still reaches the next hop. That is no
    proof that it still owns the network: it drops what it serves (rule 2), the standby
    binds the gateway and the floating IP only once both are silent, and the wire never
    shows two holders, during the partition or after it heals."""
    from hanet_lab import chaos
    from hanet_lab.arpwatch import ArpWatch

    lab = cluster
    owner = record(lab)[NET]["owner"]
    links = list(lab.topology.hosts[owner].links)
    wire = ArpWatch(lab, [("seg-shared", GATEWAY), ("public", FLOATING)]).start()
    try:
        chaos.block(lab, owner, links, spare=("router",))
        try:
            new = served_by(lab, tuple(h for h in NETWORK_HOSTS if h != owner))["owner"]
            held = [a.split("/")[0] for a in lab.addresses(owner)]
            assert GATEWAY not in held and FLOATING not in held, held
            assert lab.ping("router", FLOATING, count=3, timeout=5)
        finally:
            chaos.unblock(lab, owner)
        for _ in range(20):  # for a while after the heal: one holder only
            assert holders(lab, GATEWAY) == [new] and holders(lab, FLOATING) == [new]
            time.sleep(0.25)
    finally:
        wire.stop()
    seen = wire.summary()
    assert seen[GATEWAY]["two_holders_s"] == 0 and seen[FLOATING]["two_holders_s"] == 0, seen
    assert lab.ping("app1", ROUTER, count=3, timeout=5)


def test_an_owner_that_loses_its_standbys_keeps_serving(cluster):
    """Its peers are gone but the master and the next hop answer: not isolated, no fence."""
    from hanet_lab import chaos

    lab = cluster
    owner = record(lab)[NET]["owner"]
    others = [h for h in NETWORK_HOSTS if h != owner]
    for host in others:
        chaos.power_off(lab, host)
    time.sleep(2)
    assert holders(lab, GATEWAY) == [owner] and holders(lab, FLOATING) == [owner]
    assert lab.ping("app1", ROUTER, count=3, timeout=5)
    for host in others:
        chaos.power_on(lab, host)


def test_a_killed_dnsmasq_is_restarted_and_a_renewing_vm_keeps_its_address(cluster):
    """No highstate needed: the owner's beacon supervises its daemons, restarts dnsmasq
    with the same leases and tells the master."""
    import signal

    lab = cluster
    owner = record(lab)[NET]["owner"]
    lab.dhcp("app1", client="udhcpc")  # app1's lease now lives in the owner's lease file
    pidfile = os.path.join(lab.minion_root(owner), "run", "hanet", f"dnsmasq-{NET}.pid")
    with open(pidfile) as fh:
        old = int(fh.read().strip())
    with lab.events() as ev:
        os.kill(old, signal.SIGKILL)
        got = ev.wait(f"hanet/daemon/{owner}/dnsmasq/{NET}/restarted", timeout=10)
    assert got, "no restarted event"
    assert got["data"]["pid"] != old
    st = lab.salt(owner, "hanet.status", timeout=10)[owner]["networks"][NET]["dnsmasq"]
    assert st["running"] and st["pid"] == got["data"]["pid"] and st["leases"] >= 1, st
    lease = lab.dhcp("app1", client="dhclient")
    assert (lease["address"], lease["server"]) == ("10.20.0.10", GATEWAY), lease


def test_reports_from_clocks_60_s_off_are_refused_loudly_and_the_network_still_moves(cluster):
    """Every observer stamps its reports 60 s ahead (the beacon's ``clock_offset_s`` test
    hook: the lab's hosts share one clock). The master refuses them as stale and says
    so, naming the clock; the reconcile loop moves the network anyway, from its own
    watch and what the hosts see."""
    from hanet_lab import chaos

    lab = cluster
    owner = record(lab)[NET]["owner"]
    before = record(lab)[NET]["epoch"]
    observers = [h for h in lab.topology.hosts if h != owner]
    for host in observers:
        conf = lab.salt(host, "beacons.list", kwarg={"return_yaml": False, "include_pillar": False}, timeout=10)[host][
            "hanet_liveness"
        ]
        got = lab.salt(host, "beacons.modify", ["hanet_liveness", conf + [{"clock_offset_s": 60}]], timeout=10)
        assert got[host]["result"], got
    time.sleep(2)  # the beacons restart with the hook; their peers are up again
    try:
        with lab.events() as ev:
            chaos.power_off(lab, owner)
            refused = ev.wait("hanet/failover/unknown/rejected", timeout=10)
            got = served_by(lab, tuple(h for h in NETWORK_HOSTS if h != owner))
        assert refused and "clock" in refused["data"]["reason"], refused
        assert got["epoch"] == before + 1 and "reconcile" in got["reason"], got
    finally:
        state_apply(lab, observers, timeout=300)  # the pillar's beacon configuration again
        chaos.power_on(lab, owner)


def test_an_apply_never_binds_a_gateway_another_host_answers_for(cluster):
    """A standby whose own copy of the record is wrong (it says this host serves: a
    takeover it never finished, a record that is behind) applies hanet: the gateway is
    not bound while the owner answers for it (duplicate address detection), the state
    says why, and nothing else changes."""
    import json

    lab = cluster
    owner = record(lab)[NET]["owner"]
    other = next(h for h in NETWORK_HOSTS if h != owner)
    wait_for(f"{other} standing by", lambda: lab.serving(other).get("networks", {}).get(NET) is False)
    path = os.path.join(lab.minion_root(other), "var", "lib", "hanet", "owners.json")
    with open(path) as fh:
        saved = fh.read()
    wrong = json.loads(saved or "{}")
    wrong[NET] = {"owner": other, "epoch": record(lab)[NET]["epoch"] + 100}
    with open(path, "w") as fh:
        json.dump(wrong, fh)
    try:
        res = lab.salt(other, "state.apply", ["hanet"], timeout=300)[other]
        failed = {k: v["comment"] for k, v in res.items() if v["result"] is False}
        assert any("answered by" in c for c in failed.values()), failed
        assert holders(lab, GATEWAY) == [owner]
    finally:
        with open(path, "w") as fh:
            fh.write(saved)
        state_apply(lab, [other], timeout=300)
    assert holders(lab, GATEWAY) == [owner]


def test_the_master_alone_losing_the_owner_moves_nothing(cluster):
    """Only the master's path to the owner breaks (its management link): the master's
    watch sees it dead, but the standbys and the VMs still reach it on the segment, so
    nothing moves and it keeps serving."""
    from hanet_lab import chaos

    lab = cluster
    owner, before = record(lab)[NET]["owner"], record(lab)[NET]["epoch"]
    chaos.unplug(lab, owner, ["mgmt0"])
    try:
        time.sleep(8)  # the watch's verdict, the grace period, a reconcile audit or more
        assert record(lab)[NET]["epoch"] == before and record(lab)[NET]["owner"] == owner
        held = [a.split("/")[0] for a in lab.addresses(owner)]
        assert GATEWAY in held and FLOATING in held, held
        others = [h for h in NETWORK_HOSTS if h != owner]
        assert not [h for h in others if GATEWAY in [a.split("/")[0] for a in lab.addresses(h)]]
        assert lab.ping("app1", ROUTER, count=3, timeout=5)
    finally:
        chaos.replug(lab, owner, ["mgmt0"])


def test_an_owner_cut_off_from_its_segment_without_losing_carrier_hands_it_over(cluster):
    """The switch drops every frame between the owner and the rest of shared's segment;
    its carrier stays up and it still hears the master and the router. The master's
    watch sees it alive, so the down reports are refused; the reconcile loop then asks
    the hosts carrying shared, finds a majority that sees the owner down and a standby
    that they see up, and hands the network over (the owner lets go first). Before this,
    the VMs on shared stayed without a gateway for as long as the cut lasted."""
    from hanet_lab import chaos

    lab = cluster
    owner, before = record(lab)[NET]["owner"], record(lab)[NET]["epoch"]
    segment = [i for i, s in lab.topology.nodes()[owner].links.items() if s == "seg-shared"]
    assert segment, lab.topology.nodes()[owner].links
    chaos.block(lab, owner, segment)
    try:
        got = served_by(lab, tuple(h for h in NETWORK_HOSTS if h != owner))
        assert got["epoch"] == before + 1 and "cut off from the segment of shared" in got["reason"], got
        held = [a.split("/")[0] for a in lab.addresses(owner)]
        assert GATEWAY not in held and FLOATING not in held, held  # it let go
        assert lab.ping("router", FLOATING, count=3, timeout=5)
    finally:
        chaos.unblock(lab, owner)
    for _ in range(8):  # healed: one holder, the new one
        assert holders(lab, GATEWAY) == [got["owner"]] and holders(lab, FLOATING) == [got["owner"]]
        time.sleep(0.25)
