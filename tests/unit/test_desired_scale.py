"""The pure core at the benchmark's scale (bench/apply_scale.py): 16 networks, 1,000
instances on one host. Correctness only; timings belong to the benchmark."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))

from apply_scale import pillar  # noqa: E402

from _hanet import desired, model  # noqa: E402


def test_many_instances_per_network_on_one_host():
    cfg = model.load(pillar(16, 1000)["hanet"])
    state = desired.compute(cfg, "compute1")
    assert len(state.dnsmasqs) == 16
    assert sum(len(d.hosts) for d in state.dnsmasqs) == 1000
    for d in state.dnsmasqs:
        keys = [(h.mac, h.ip) for h in d.hosts]
        assert keys == sorted(keys), "hosts are in a stable (MAC, IP) order"
    assert sum(len(g.pairs) for g in state.ruleset.guards) == 1000
    # deterministic: the same pillar, the same state, whatever the instance order
    shuffled = pillar(16, 1000)["hanet"]
    shuffled["instances"] = dict(reversed(list(shuffled["instances"].items())))
    assert desired.compute(model.load(shuffled), "compute1") == state
