"""Failover with the contract's reactor alone (no hanet_failover engine on the master):
`reactor/failover.sls` -> `runner.hanet.liveness` decides, as it did before the engine
existed, and the standby still takes over. Same lab and power loss as test_failover.py,
fewer checks (that file covers the rest)."""

import time

import pytest
from hanet_checks import failover_cluster

pytestmark = pytest.mark.lab

NET, GATEWAY, FLOATING, ROUTER = "shared", "10.20.0.1", "203.0.113.60", "203.0.113.1"


@pytest.fixture(scope="module")
def lab_topology():
    from hanet_lab import default_topology

    topo = default_topology(hosts=4)
    topo.master.opts["engines"] = []  # the reactor path only
    return topo


def test_power_loss_moves_the_network_through_the_reactor(lab):
    from hanet_lab import chaos

    failover_cluster(lab, FLOATING, GATEWAY)
    with lab.events() as ev:
        vm = chaos.Pinger(lab, "app1", ROUTER).start()
        up = chaos.Pinger(lab, "router", FLOATING).start()
        try:
            time.sleep(1)
            chaos.power_off(lab, "net1")
            done = ev.wait(f"hanet/failover/{NET}/complete", timeout=30)
            time.sleep(1.5)
        finally:
            vm.stop()
            up.stop()
    assert done, "no complete event through the reactor"
    data = done["data"]
    assert (data["from"], data["to"]) == ("net1", "net2")
    assert data["decision"]["via"] == "reactor" and data["decision"]["second_opinion"] == "icmp"
    for pinger in (vm, up):
        assert [t for t, _ in pinger.replies() if t > data["completed_at"]], (
            f"{pinger.node} -> {pinger.target}: no reply after the failover"
        )
    assert any(a.split("/")[0] == GATEWAY for a in lab.addresses("net2"))
