"""One standby for eight networks, in the lab, real parts only: the owner of all eight
dies and every one of them moves.

    net1, net2   network hosts of m1..m8 (10.30.<i>.0/24, gateway .1, br301..br308, each
                 its own VXLAN segment over eth2), in that order: net1 serves all eight
    compute1     vm<i> 10.30.<i>.10 on m<i>, floating IP 203.0.113.7<i> (no VM namespace)

A single death is eight takeovers on one host at once, eight relinquish orders, eight
record entries: what a one-network test does not show is a network left behind, an
entry left unconfirmed, or an address bound twice when the takeovers run side by side.
Each test checks what an operator would: who holds each gateway and floating IP
(exactly one powered host, once), and the record.
"""

import os
import subprocess
import time

import pytest
from hanet_checks import state_apply

pytestmark = pytest.mark.lab

NETWORK_HOSTS = ("net1", "net2")
COUNT = 8


@pytest.fixture(scope="module")
def lab_topology():
    from hanet_lab import default_topology

    topo = default_topology(hosts=4, vms=False)
    del topo.hosts["compute2"]  # not needed: one compute host carries every instance
    topo.validate()
    return topo


def networks():
    from hanet_lab.pillar import standby_networks

    return standby_networks(COUNT)


def gateway(label):
    return f"{networks()[label][0]}.1"


def floating(label):
    return networks()[label][3]


def served():
    """Every address the owner of all the networks must hold: the gateways and floating IPs."""
    return [a for label in networks() for a in (gateway(label), floating(label))]


@pytest.fixture(scope="module")
def cluster(lab):
    from hanet_lab.pillar import standby_pillar

    lab.set_pillar(standby_pillar(lab.topology, COUNT, NETWORK_HOSTS))
    state_apply(lab, sorted(lab.topology.hosts), timeout=300)
    time.sleep(2)  # the beacons' first verdicts (peers up)
    return lab


def powered(lab, host):
    """A host without power keeps its kernel state in the lab, with every link down."""
    return (
        "state UP"
        in subprocess.run(
            ["ip", "-n", lab.ns(host), "-o", "link", "show", "mgmt0"], capture_output=True, text=True
        ).stdout
    )


def bound(lab, host):
    """{address: how many times it is bound on ``host``, over all its links}."""
    out = {}
    for a in lab.addresses(host):
        ip = a.split("/")[0]
        out[ip] = out.get(ip, 0) + 1
    return out


def holdings(lab):
    """{address: {powered network host: times bound}} for every served address."""
    per_host = {h: bound(lab, h) for h in NETWORK_HOSTS if powered(lab, h)}
    return {a: {h: got[a] for h, got in per_host.items() if a in got} for a in served()}


def held_once_by(lab, host):
    """Each served address is bound on ``host`` exactly once and on no other powered
    network host; else the addresses that are not."""
    wrong = {a: h for a, h in holdings(lab).items() if h != {host: 1}}
    return not wrong, wrong


def record(lab):
    from _hanet import failover

    return failover.read_owners(os.path.join(lab.master_root, "var", "cache", "salt", "master"))


def wait_for(what, predicate, timeout=90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def serving(lab, host):
    """hanet.serving's {network: holds its gateway} on ``host`` ({} when it does not answer)."""
    return lab.serving(host).get("networks", {})


def test_net1_serves_all_eight(cluster):
    lab = cluster
    wait_for("net1 holding every gateway and floating IP", lambda: held_once_by(lab, "net1")[0])
    assert serving(lab, "net1") == {label: True for label in networks()}
    assert serving(lab, "net2") == {label: False for label in networks()}


def test_the_owner_of_all_eight_dies_and_all_eight_move(cluster):
    """Every network's record entry: net2, a higher epoch, confirmed; every gateway and
    floating IP bound once, on net2 only."""
    from hanet_lab import chaos

    lab = cluster
    before = {label: record(lab).get(label, {}).get("epoch", 0) for label in networks()}
    chaos.power_off(lab, "net1")

    def moved():
        rec = record(lab)
        return all(
            rec.get(label, {}).get("owner") == "net2" and rec[label].get("confirmed") is True for label in networks()
        )

    wait_for("every record entry confirming net2", moved)
    wait_for("net2 alone holding every address", lambda: held_once_by(lab, "net2")[0])
    rec = record(lab)
    for label in networks():
        assert rec[label]["owner"] == "net2" and rec[label]["confirmed"] is True, (label, rec[label])
        assert rec[label]["epoch"] > before[label], (label, before[label], rec[label])
    ok, wrong = held_once_by(lab, "net2")
    assert ok, wrong
    assert serving(lab, "net2") == {label: True for label in networks()}


def test_the_old_owner_comes_back_a_standby_for_all_eight(cluster):
    """Powered again, net1 rebuilds its bridges and binds nothing; net2 keeps each
    address exactly once, and the record does not move."""
    from hanet_lab import chaos

    lab = cluster
    rec = record(lab)
    chaos.power_on_started(lab, "net1")
    wait_for(
        "net1 back as a standby for every network",
        lambda: serving(lab, "net1") == {label: False for label in networks()},
    )
    time.sleep(3)  # a reconcile pass or two (every second) with net1 up again
    links = lab.links("net1")
    assert all(networks()[label][2] in links for label in networks()), links
    ok, wrong = held_once_by(lab, "net2")
    assert ok, wrong
    assert not set(bound(lab, "net1")) & set(served()), bound(lab, "net1")
    after = record(lab)
    assert {k: (v["owner"], v["epoch"]) for k, v in after.items() if k in networks()} == {
        k: (v["owner"], v["epoch"]) for k, v in rec.items() if k in networks()
    }
