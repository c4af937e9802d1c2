"""The pure parts of the failover fast path: which publications the beacon's order
listener acts on, what the master's engine dispatches, and the beacon configuration a
network host gets (it listens for orders; a standby also probes what it would take)."""

import importlib.util
import os

import pytest

from _hanet import desired, failover, host, icmp, model

HERE = os.path.dirname(__file__)


def _load(rel, name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, "..", "..", rel))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


beacon = _load("_beacons/hanet_liveness.py", "hanet_liveness_under_test")
engine = _load("_engines/hanet_failover.py", "hanet_failover_under_test")


def order(**load):
    base = {
        "fun": "hanet.takeover",
        "tgt": "net2",
        "tgt_type": "glob",
        "jid": "1",
        "arg": ["shared", 3, {"__kwarg__": True, "previous": "net1", "detected_at": 1.5}],
    }
    base.update(load)
    return {"enc": "aes", "load": base}


def test_an_order_for_this_minion_is_parsed():
    got = failover.parse_order(order(), "net2")
    assert got == {
        "jid": "1",
        "fun": "hanet.takeover",
        "args": ["shared", 3],
        "kwargs": {"previous": "net1", "detected_at": 1.5},
    }
    assert failover.parse_order(order(tgt=["net2"], tgt_type="list"), "net2")["args"] == ["shared", 3]


@pytest.mark.parametrize(
    "load",
    [
        {"tgt": "net1"},  # another minion's order
        {"tgt": "net*"},  # a glob that merely matches: not ours alone
        {"tgt": ["net2", "net1"], "tgt_type": "list"},
        {"tgt_type": "compound"},
        {"fun": "hanet.relinquish"},  # a relinquish takes (network, epoch, owner), no keywords
        {"fun": "state.apply"},
        {"arg": ["shared"]},  # missing the epoch
        {"arg": ["shared", 3, {"__kwarg__": True, "warm": False}]},  # a keyword the path does not take
    ],
)
def test_anything_else_is_left_to_the_minion(load):
    assert failover.parse_order(order(**load), "net2") is None


def test_garbage_is_ignored():
    for payload in (None, "x", {}, {"load": "encrypted"}, {"load": {"fun": "hanet.takeover"}}):
        assert failover.parse_order(payload, "net2") is None


class _Pool:
    def __init__(self):
        self.calls = []

    def submit(self, fn, *args):
        self.calls.append((fn, args))


@pytest.mark.parametrize(
    "tag,expect",
    [
        ("salt/beacon/net2/hanet_liveness/net1/down", "liveness"),
        ("salt/beacon/net2/hanet_liveness/net1/up", "liveness"),
        ("hanet/prime", "prime"),
        ("salt/minion/net1/start", "prime"),
        ("salt/beacon/net2/diskusage/", None),
        ("salt/job/123/new", None),
        ("hanet/failover/shared/complete", "outcome"),
        ("hanet/failover/shared/failed", None),
        ("hanet/failover/shared/rejected", None),
    ],
)
def test_the_engine_dispatches_liveness_and_prime_events_only(tag, expect):
    runners = {"hanet.liveness": "L", "hanet.prime": "P", "hanet.outcome": "O"}
    pool = _Pool()
    assert engine.handle({"tag": tag, "data": {"x": 1}}, runners, pool, failover) == expect
    if expect is None:
        assert pool.calls == []
    else:
        assert pool.calls == [(engine._call, ({"liveness": "L", "prime": "P", "outcome": "O"}[expect], tag, {"x": 1}))]


def _example():
    import yaml

    with open(os.path.join(HERE, "..", "..", "pillar", "hanet.sls")) as fh:
        return yaml.safe_load(fh)["hanet"]


def test_network_hosts_listen_for_orders_and_a_standby_probes_its_gateway():
    cfg = model.load(_example())
    conf = {h: host.beacon_config(desired.compute(cfg, h)) for h in ("net1", "net2", "compute1")}
    flat = {h: {k: v for item in c for k, v in item.items()} for h, c in conf.items()}
    assert flat["net1"].get("orders") is True and "standby_for" not in flat["net1"]
    assert flat["net2"]["orders"] is True
    assert flat["net2"]["standby_for"] == {"net1": [["br200", "10.20.0.1"]]}
    assert "orders" not in flat["compute1"] and "standby_for" not in flat["compute1"]
    for c in conf.values():
        assert beacon.validate(c) == (True, "valid")
    assert flat["net1"]["health"] == {"uplink": "eth0", "segments": {"shared": "eth3"}}


def test_garp_refresh_reaches_the_network_hosts_beacons_only():
    ex = _example()
    assert "garp_refresh_s" not in str(host.beacon_config(desired.compute(model.load(ex), "net1")))
    ex["ha"]["garp_refresh_s"] = 30
    cfg = model.load(ex)
    flat = {
        h: {k: v for item in host.beacon_config(desired.compute(cfg, h)) for k, v in item.items()}
        for h in ("net1", "net2", "compute1")
    }
    assert flat["net1"]["garp_refresh_s"] == flat["net2"]["garp_refresh_s"] == 30
    assert "garp_refresh_s" not in flat["compute1"]
    ex["ha"]["garp_refresh_s"] = -1
    with pytest.raises(model.PillarError, match="hanet:ha:garp_refresh_s"):
        model.load(ex)


@pytest.mark.parametrize(
    "item,word",
    [
        ({"health": {"uplink": "eth0", "segments": ["shared"]}}, "health"),
        ({"health": "eth0"}, "health"),
        ({"clock_offset_s": "60"}, "clock_offset_s"),
        ({"clock_offset_s": True}, "clock_offset_s"),
        ({"garp_refresh_s": 0}, "garp_refresh_s"),
        ({"garp_refresh_s": True}, "garp_refresh_s"),
    ],
)
def test_a_bad_health_or_clock_item_is_named(item, word):
    ok, why = beacon.validate([{"peers": {}}, item])
    assert not ok and word in why
    assert beacon.validate([{"peers": {}}, {"clock_offset_s": -60.5}]) == (True, "valid")


def test_the_master_watch_gives_no_verdict_from_a_stale_view():
    """Its thread runs, its last round said "alive", but that round is old (the watch
    was not scheduled): no verdict, so the runner checks actively instead of trusting it."""
    import threading
    import time

    w = icmp.Watch(interval=0.05, dead_after=3)
    w.watch({"b": ["192.0.2.99", "198.51.100.9"], "c": ["192.0.2.98"]})
    assert w.addresses("b") == ("192.0.2.99", "198.51.100.9")  # the evidence of a watch verdict
    assert w.addresses("x") == ()
    hold = threading.Event()
    w._thread = threading.Thread(target=hold.wait)
    w._thread.start()
    try:
        w._state["b"], w._last_round = [0, True], time.monotonic()
        assert w.verdict("b") == "alive"
        w._state["b"] = [5, False]
        assert w.verdict("b") == "dead"
        w._last_round -= 1.0
        assert w.verdict("b") is None
    finally:
        hold.set()
        w._thread.join()
    assert w.verdict("b") is None, "no verdict once the watch stopped"


def test_a_job_forked_while_a_beacon_thread_builds_the_salt_cache_does_not_hang():
    """The minion forks its jobs from its main thread while the beacon's order listener
    may be inside Salt's cache set-up (Python 3.11's cached_property lock): the child
    must not inherit that lock held."""
    import threading

    import salt.cache

    beacon._fork_safe_salt()
    lock = salt.cache.Cache.modules.lock
    held, release = threading.Event(), threading.Event()

    def hold():
        with lock:
            held.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert held.wait(5)
        pid = os.fork()
        if pid == 0:  # the job: it signs in, which builds a Cache
            os._exit(0 if salt.cache.Cache.modules.lock.acquire(timeout=2) else 1)
        _, status = os.waitpid(pid, 0)
    finally:
        release.set()
        t.join()
    assert os.waitstatus_to_exitcode(status) == 0, "the forked job found the lock held"


def test_link_states_tell_a_segment_cut_from_a_dead_peer():
    view = {
        "written_at": 100.0,
        "peers": {
            "net1": {"state": "up", "seen": {"br200:10.20.0.2": 90.0, "eth0:203.0.113.21": 99.9}},
            "net2": {"state": "down", "seen": {"br200:10.20.0.3": None, "eth0:203.0.113.22": 97.0}},
            "old": {"state": "up"},
        },
    }
    assert host.link_states(view) == {
        "net1": {"br200": "down", "eth0": "up"},
        "net2": {"br200": "down", "eth0": "down"},
    }
    assert host.link_states({"peers": view["peers"]}) == {}, "no time stamp: nothing to judge"
