"""Failover cycles leave nothing behind (the short form of ``./dev bench cycles``).

Two network-host networks served by net1 with net2 standing by
(``hanet_lab.cycles``); after one warm-up cycle of each kind, the counts of every host
and the master (``hanet_lab.leaks``: addresses, links, routes, nftables objects,
processes, files, the minions' and the failover engine's threads and fds) are the
baseline; after three planned cycles and two power losses of the owner, nothing grew,
and the master moved no network for a segment cut (none happened: the owner came back
from its power losses with new MACs on its segment bridges, which its witnesses must
learn rather than take for a cut).
"""

import os

import pytest

pytestmark = pytest.mark.lab

NETWORKS = 2


@pytest.fixture(scope="module")
def lab_topology():
    from hanet_lab import cycles

    return cycles.topology()


def test_failover_cycles_leak_nothing(lab):
    from hanet_lab import cycles, leaks

    nodes = [lab.topology.master.name, *sorted(lab.topology.hosts)]
    cycles.setup(lab, NETWORKS)
    cycles.planned_cycle(lab, NETWORKS)
    cycles.power_cycle(lab, NETWORKS)
    baseline = leaks.snapshot(lab, nodes)
    named = {n: leaks.details(lab, n) for n in nodes}
    for _ in range(3):
        cycles.planned_cycle(lab, NETWORKS)
    for _ in range(2):
        cycles.power_cycle(lab, NETWORKS)
    rows = leaks.compare(baseline, leaks.snapshot(lab, nodes))
    assert not _segment_cut_moves(lab), _segment_cut_moves(lab)
    grown = leaks.grew(named, {n: leaks.details(lab, n) for n in nodes}) if leaks.leaks(rows) else []
    assert not leaks.leaks(rows), "\n" + leaks.table(rows) + "\nwhat grew:\n" + "\n".join(grown)


def _segment_cut_moves(lab):
    """{network: moves} the master decided for a segment cut (its metrics textfile)."""
    from prometheus_client.parser import text_string_to_metric_families

    path = os.path.join(lab.master_root, "var", "cache", "salt", "master", "hanet", "metrics", "hanet_master.prom")
    with open(path) as fh:
        text = fh.read()
    return {
        s.labels["network"]: s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == "hanet_failovers_total" and s.labels.get("reason") == "segment_cut" and s.value
    }
