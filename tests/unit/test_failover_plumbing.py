"""The pure parts of the failover fast path: which publications the beacon's order
listener acts on, what the master's engine dispatches, and the beacon configuration a
network host gets (it listens for orders; a standby also probes what it would take)."""

import importlib.util
import os

import pytest

from _hanet import common, desired, failover, host, icmp, model

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
    # the gateway, and the network's snat_address (pillar/hanet.sls sets one) on the uplink
    assert flat["net2"]["standby_for"] == {"net1": [["br200", "10.20.0.1"], ["eth0", "203.0.113.40"]]}
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


# --------------------------------------------------------------------------- direct orders


@pytest.fixture(scope="module")
def master_keys(tmp_path_factory):
    """A master key pair (the master's ``master.pem``; the minion's
    ``minion_master.pub``) and another pair that is not the master's."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    import salt.crypt

    d = tmp_path_factory.mktemp("keys")
    out = {}
    for name in ("master", "other"):
        k = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = d / f"{name}.pem"
        pem.write_bytes(
            k.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
            )
        )
        pub = d / f"{name}.pub"
        pub.write_bytes(
            k.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        )
        out[name] = (salt.crypt.PrivateKey.from_file(str(pem)), str(pub))
    return out


def _datagram(keys, signer="master", tgt="net2", fun="hanet.takeover", args=("shared", 3), kwargs=None, at=1000.0):
    kwargs = {"previous": "net1", "detected_at": 999.5} if kwargs is None else kwargs
    return failover.order_datagram(keys[signer][0], tgt, fun, list(args), kwargs, "20261204000000000001", at)


def test_a_direct_order_signed_by_the_master_is_the_publication_s_order(master_keys):
    pub = master_keys["master"][1]
    got, why = failover.parse_order_datagram(_datagram(master_keys), pub, "net2", 1000.2)
    assert why is None
    assert got == failover.parse_order(
        order(
            jid="20261204000000000001", arg=["shared", 3, {"__kwarg__": True, "previous": "net1", "detected_at": 999.5}]
        ),
        "net2",
    )
    rel, why = failover.parse_order_datagram(
        _datagram(master_keys, fun="hanet.relinquish", args=("shared", 3, "net2"), kwargs={}), pub, "net2", 1000.0
    )
    assert rel["fun"] == "hanet.relinquish" and rel["args"] == ["shared", 3, "net2"], why


@pytest.mark.parametrize(
    "make,word",
    [
        (lambda k: _datagram(k, signer="other"), "bad signature"),  # not the master's key
        (lambda k: _datagram(k).replace(b"shared", b"shaded"), "bad signature"),  # altered on the way
        (lambda k: _datagram(k, tgt="net1"), "not an order for this host"),
        (lambda k: _datagram(k, at=900.0), "ago"),  # replayed later
        (lambda k: _datagram(k, at=1100.0), "ago"),  # from a clock far ahead
        (lambda k: _datagram(k, fun="state.apply"), "not an order for this host"),
        (lambda k: _datagram(k, kwargs={"warm": False}), "not an order for this host"),
        (lambda k: b"\xff" * 100, "not an order"),
        (lambda k: b'{"order": 1, "sig": ""}', "not an order"),
        (lambda k: b"x" * (failover.ORDER_MAX_BYTES + 1), "too large"),
    ],
)
def test_anything_else_on_the_order_port_is_refused_with_the_reason(master_keys, make, word):
    got, why = failover.parse_order_datagram(make(master_keys), master_keys["master"][1], "net2", 1000.0)
    assert got is None and word in why


class _Catch:
    def __init__(self):
        import threading

        self.got = []
        self.event = threading.Event()

    def handle(self, order, heard, via):
        self.got.append((order, via))
        self.event.set()


def test_the_beacon_runs_a_direct_order_from_its_master_only(master_keys, tmp_path):
    """DirectOrders on a real UDP socket (loopback): a datagram signed by the master
    key the minion accepted, from a master's address, reaches the dispatcher; one from
    another address, or signed by another key, does not."""
    import shutil
    import socket
    import time

    pki = tmp_path / "pki"
    pki.mkdir()
    shutil.copy(master_keys["master"][1], pki / "minion_master.pub")
    catch = _Catch()
    listener = beacon.DirectOrders(
        {"pki_dir": str(pki), "id": "net2"}, 0, catch, failover.parse_order_datagram, ["127.0.0.1"], common
    )
    try:
        with (
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s,
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as x,
        ):
            x.bind(("127.0.0.2", 0))  # not a master's address
            x.sendto(_datagram(master_keys, at=time.time()), ("127.0.0.1", listener.port))
            s.sendto(_datagram(master_keys, signer="other", at=time.time()), ("127.0.0.1", listener.port))
            assert not catch.event.wait(0.3)
            s.sendto(_datagram(master_keys, at=time.time()), ("127.0.0.1", listener.port))
            assert catch.event.wait(2.0)
        assert [(o["fun"], o["args"], via) for o, via in catch.got] == [("hanet.takeover", ["shared", 3], "direct")]
    finally:
        listener.stop()


def test_an_order_heard_twice_runs_once():
    """The direct datagram and the publication carry the same jid: one takeover."""
    import threading

    ran = []
    done = threading.Event()

    def takeover(*args, **kwargs):
        ran.append((args, kwargs.get("warm")))
        done.set()

    orders = beacon.Orders({"hanet.takeover": takeover, "hanet.relinquish": lambda *a: None})
    o = failover.parse_order(order(jid="7"), "net2")
    assert orders.handle(o, 1.0, "direct") is True
    assert orders.handle(dict(o), 1.1, "publication") is False
    assert done.wait(2.0)
    assert ran == [(("shared", 3), True)]


def test_network_hosts_get_the_order_port_and_a_bad_one_is_named():
    ex = _example()
    flat = {
        h: {k: v for item in host.beacon_config(desired.compute(model.load(ex), h)) for k, v in item.items()}
        for h in ("net1", "net2", "compute1")
    }
    assert flat["net1"]["order_port"] == flat["net2"]["order_port"] == 4509
    assert "order_port" not in flat["compute1"]
    ex["ha"]["order_port"] = 0
    assert "order_port" not in str(host.beacon_config(desired.compute(model.load(ex), "net2")))
    ex["ha"]["order_port"] = 70000
    with pytest.raises(model.PillarError, match="hanet:ha:order_port"):
        model.load(ex)
    assert beacon.validate([{"peers": {}}, {"order_port": "4509"}])[0] is False


def test_a_prepared_standby_computes_nothing_when_the_order_comes(tmp_path, monkeypatch):
    """``hanet.prepare`` (the beacon, every poll) computes the state a takeover binds;
    the takeover, once the record names this host, finds it; a new pillar is computed
    afresh."""
    from _hanet import takeover
    from _hanet.common import Paths

    paths = Paths(root_dir=str(tmp_path))
    paths.ensure()
    owners = {"shared": {"owner": "net1", "epoch": 3}}
    ctx = takeover.Context(
        me="net2", cfg=model.load(_example()), paths=paths, owners=lambda: owners, fire=lambda t, d: None, memo={}
    )
    assert takeover.prepare(ctx) == ["shared"]
    calls = []
    real = desired.compute
    monkeypatch.setattr(desired, "compute", lambda *a: calls.append(a[1:]) or real(*a))
    assert takeover.prepare(ctx) == ["shared"] and calls == []  # the next poll: nothing to do
    owners["shared"] = {"owner": "net2", "epoch": 4}  # what the takeover records before binding
    state = ctx.desired()
    assert calls == []
    assert any(a.startswith("10.20.0.1/") for b in state.bridges if b.name == "br200" for a in b.addresses)
    again = takeover.Context(
        me="net2", cfg=model.load(_example()), paths=paths, owners=lambda: owners, fire=lambda t, d: None, memo=ctx.memo
    )
    again.desired()
    assert calls == [("net2", {"shared": "net2"})]


# --------------------------------------------------------------------------- direct reports


def test_every_observer_reports_straight_to_the_masters_too():
    ex = _example()
    flat = {
        h: {k: v for item in host.beacon_config(desired.compute(model.load(ex), h)) for k, v in item.items()}
        for h in ("net1", "net2", "compute1")
    }
    assert flat["net2"]["report_port"] == flat["compute1"]["report_port"] == 4510
    ex["ha"]["report_port"] = 0
    assert "report_port" not in str(host.beacon_config(desired.compute(model.load(ex), "compute1")))
    ex["ha"]["report_port"] = "x"
    with pytest.raises(model.PillarError, match="hanet:ha:report_port"):
        model.load(ex)


def _free_port():
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_engine_hands_a_report_datagram_to_the_decision(master_keys):
    """The engine's listener on a real UDP socket: a datagram as the beacon's Sender sends
    it reaches ``hanet.liveness`` (here: a list) with its tag and signed data untouched;
    anything else is dropped before the decision."""
    import socket
    import threading

    got, came = [], threading.Event()

    def submit(tag, data):
        got.append((tag, data))
        came.set()

    hearing = engine.Hearing("127.0.0.1", submit, failover.parse_report_datagram, common)
    hearing.follow({"result": True, "report_port": _free_port()})
    reports = hearing.reports
    data = failover.sign(master_keys["other"][0], failover.report("compute1", "net1", failover.DOWN, 1000.0))
    tag = failover.liveness_tag("compute1", "net1", failover.DOWN)
    try:
        sender = beacon.Sender.__new__(beacon.Sender)  # only its datagram half
        sender.report_to, sender._udp, sender.failover = [("127.0.0.1", reports.port)], None, failover
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b'{"tag": "salt/job/1/ret/x", "data": {}}', ("127.0.0.1", reports.port))
            s.sendto(b"junk", ("127.0.0.1", reports.port))
        sender._direct(tag, data)
        assert came.wait(2.0)
        assert got == [(tag, data)]
    finally:
        hearing.stop()
        if sender._udp is not None:
            sender._udp.close()


def test_the_engine_follows_report_port_through_every_prime():
    """A prime (or reconcile round) that fails (the master knows no minion yet) starts
    nothing; the first one that succeeds starts the listener on the pillar's port; the same port again keeps it;
    a new port moves it; 0 stops it. (The first run of this code bound only after the
    engine's very first prime, which fails on a master that starts before its minions,
    and a power loss right after a highstate could beat the prime that highstate asked for.)"""
    import socket

    port_a, port_b = _free_port(), _free_port()
    hearing = engine.Hearing("127.0.0.1", lambda tag, data: None, lambda raw: None, common)
    answers = iter(
        [
            {"result": False, "reason": "the master knows no minion yet"},
            {"result": True, "report_port": port_a},
            {"result": True, "report_port": port_a},
            {"result": True, "report_port": port_b},
            {"result": True, "report_port": 0},
        ]
    )
    prime = engine._steering(lambda **kw: next(answers), hearing)
    try:
        prime(tag="hanet/prime", data={})
        assert hearing.reports is None
        prime(tag="hanet/prime", data={})
        first = hearing.reports
        assert first is not None and first.port == port_a
        prime(tag="hanet/prime", data={})
        assert hearing.reports is first
        prime(tag="hanet/prime", data={})
        assert hearing.reports is not first and hearing.reports.port == port_b
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
            again.bind(("127.0.0.1", port_a))  # the old port was let go
        prime(tag="hanet/prime", data={})
        assert hearing.reports is None
    finally:
        hearing.stop()


def test_a_liveness_event_waits_while_reports_come_straight():
    """With the direct listener up the engine hands a liveness event on ``defer``
    seconds later (the datagram, sent first, decides alone); other events at once."""
    import time

    runners = {"hanet.liveness": "L", "hanet.prime": "P", "hanet.outcome": "O"}
    pool = _Pool()
    tag = "salt/beacon/net2/hanet_liveness/net1/down"
    assert engine.handle({"tag": tag, "data": {}}, runners, pool, failover, defer=0.2) == "liveness"
    assert engine.handle({"tag": "hanet/prime", "data": {}}, runners, pool, failover, defer=0.2) == "prime"
    assert [c[1][0] for c in pool.calls] == ["P"]
    deadline = time.monotonic() + 2
    while len(pool.calls) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [c[1][0] for c in pool.calls] == ["P", "L"]
