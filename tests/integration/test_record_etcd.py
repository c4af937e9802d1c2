"""The etcd record backend (_hanet/record.py) against a real 3-member etcd cluster
(Debian's etcd-server), its members in one network namespace of this run
(``<lab prefix>-etcd``, on 192.0.2.21-23 on its loopback; nothing listens outside it).
The test's own thread enters that namespace to talk to etcd, as a master would on
the management segment.

- a read and a save round trip, the entry as owners.json has it;
- two masters deciding the same network: one epoch step, the loser gets
  RecordConflict and, reading again, the winner's entry; many racing: still one step;
- two masters changing different networks at once: both saves go through;
- the runner's liveness on two masters for one report: one decision, one takeover
  order and one relinquish, the loser says another master decided;
- one member down (a follower, then the leader): reads and saves go on;
- two members down (quorum lost): RecordUnavailable within the timeout, naming every
  endpoint, nothing written; the runner rejects the report (no order) and status says
  why; quorum back: saves go through again.

Everything (etcd processes, data dirs, the namespace, the lab state file) is removed
at the end, also when a test fails; a run killed outright is swept by the next lab
run like any lab (the state file is written before anything is made).
"""

import importlib.util
import os
import shutil
import threading
import time
import uuid

import pytest

from _hanet import failover, model, record

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKOUT = os.path.dirname(os.path.dirname(HERE))
ADDRS = ["192.0.2.21", "192.0.2.22", "192.0.2.23"]
TIMEOUT = 2.0


@pytest.fixture(scope="module")
def etcd(lab_sweep):
    from pyroute2 import netns

    from hanet_lab import nslib, state
    from hanet_lab.etcd import EtcdCluster

    if not shutil.which("etcd"):
        pytest.skip("needs etcd (Debian's etcd-server; ./dev setup installs it)")
    prefix = state.new_prefix()
    ns = f"{prefix}-etcd"
    rundir = state.rundir_for(prefix)
    state.write_state(
        prefix,
        {
            "prefix": prefix,
            "rundir": rundir,
            "owner_pid": os.getpid(),
            "owner_start": nslib.pid_start_time(os.getpid()),
            "owner_cmdline": nslib.cmdline(os.getpid()),
            "created": time.time(),
            "namespaces": {"etcd": ns},
            "what": "tests/integration/test_record_etcd.py",
        },
    )
    cluster = None
    entered = False
    try:
        os.makedirs(rundir)
        nslib.ns_create(ns)
        nslib.lo_up(ns)
        for a in ADDRS:
            nslib.add_address(ns, "lo", f"{a}/32")
        cluster = EtcdCluster(prefix, [(f"e{i}", ns, a) for i, a in enumerate(ADDRS, 1)], rundir)
        t0 = time.monotonic()
        cluster.start()
        print(f"etcd: 3 members healthy in {time.monotonic() - t0:.2f} s")
        netns.pushns(ns)  # this thread (and threads it starts) talks to etcd from inside
        entered = True
        yield cluster
    finally:
        if entered:
            netns.popns()
        if cluster is not None:
            cluster.down()
        state.destroy(prefix)
        assert not nslib.ns_exists(ns)
        assert not os.path.exists(rundir)
        assert not [p for p in nslib.pids_in((), [rundir + "/"])]


@pytest.fixture
def healthy(etcd):
    """Every member running and healthy before and after the test."""
    for name in etcd.members:
        if not etcd.running(name):
            etcd.start_member(name)
    etcd.wait_healthy(timeout=30)
    yield etcd
    for name in etcd.members:
        if not etcd.running(name):
            etcd.start_member(name)
    etcd.wait_healthy(timeout=30)


def opts_for(etcd, tmp_path, master, prefix):
    return {
        "cachedir": str(tmp_path / master),
        "extension_modules": str(tmp_path / master),
        "pki_dir": str(tmp_path / master),
        "hanet_record": {"backend": "etcd", "endpoints": etcd.endpoints, "prefix": prefix, "timeout": TIMEOUT},
    }


def prefix_for():
    return f"/hanet-test-{uuid.uuid4().hex[:8]}/"


def move(net, prev, new, epoch):
    return failover.Move(net, prev, new, epoch)


# --------------------------------------------------------------------------- the record


def test_read_and_save_round_trip(healthy, tmp_path):
    opts = opts_for(healthy, tmp_path, "m1", prefix_for())
    assert record.read_owners(opts) == {}
    with record.open(opts) as rec:
        assert rec.owners == {}
        assert rec.handle("nonce-1", "engine", time.time()) is None
        rec.record([move("shared", "net1", "net2", 1)], 100.0, "net1 down (seen by net2)")
    got = record.read_owners(opts)
    assert got == {
        "shared": {
            "owner": "net2",
            "epoch": 1,
            "since": 100.0,
            "reason": "net1 down (seen by net2)",
            "previous": "net1",
            "confirmed": False,
        }
    }
    with record.open(opts) as rec:
        assert failover.confirm(rec.owners, "shared", "net2", 1)
        rec.save()
        rec.save()  # nothing changed since: nothing written
    assert record.read_owners(opts)["shared"]["confirmed"] is True
    # the handled nonces stay in this master's own cachedir
    assert os.path.exists(tmp_path / "m1" / "hanet" / failover.SEEN_FILE)
    assert not os.path.exists(tmp_path / "m1" / "hanet" / failover.RECORD_FILE)


def test_the_loser_of_a_race_gets_a_conflict_and_then_the_winner(healthy, tmp_path):
    prefix = prefix_for()
    m1, m2 = opts_for(healthy, tmp_path, "m1", prefix), opts_for(healthy, tmp_path, "m2", prefix)
    with record.open(m1) as a, record.open(m2) as b:  # both read epoch 0
        a.record([move("shared", "net1", "net2", 1)], 1.0, "m1 decided")
        with pytest.raises(record.RecordConflict) as err:
            b.record([move("shared", "net1", "net3", 1)], 2.0, "m2 decided")
    assert err.value.current["shared"]["owner"] == "net2"
    assert "shared (now net2 at epoch 1)" in str(err.value)
    with record.open(m2) as b:  # the loser reads again: the winner's, one epoch step
        assert b.owners["shared"]["owner"] == "net2" and b.owners["shared"]["epoch"] == 1
        assert failover.planned_move(None, b.owners, "shared", "net2") is None


def test_many_racing_deciders_make_one_epoch_step(healthy, tmp_path):
    prefix = prefix_for()
    n = 4
    barrier = threading.Barrier(n, timeout=20)
    results, errors = {}, []

    def decider(i):
        opts = opts_for(healthy, tmp_path, f"m{i}", prefix)
        try:
            for attempt in record.attempts(opts, tries=n + 1):
                with attempt as rec:
                    if attempt.number == 0:
                        barrier.wait()  # everyone has read epoch 0
                    entry = rec.owners.get("shared")
                    if entry is None:  # "net1 is down": move it, once
                        rec.record([move("shared", "net1", f"new{i}", 1)], time.time(), f"m{i}")
                        results[i] = ("moved", attempt.number)
                    else:
                        results[i] = ("adopted", entry["owner"], attempt.number)
        except Exception as err:  # noqa: BLE001
            errors.append(repr(err))

    threads = [threading.Thread(target=decider, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    winners = [i for i, r in results.items() if r[0] == "moved"]
    assert len(winners) == 1, results
    owners = record.read_owners(opts_for(healthy, tmp_path, "x", prefix))
    assert owners["shared"]["epoch"] == 1 and owners["shared"]["owner"] == f"new{winners[0]}"
    assert all(r[1] == f"new{winners[0]}" and r[2] >= 1 for i, r in results.items() if i not in winners)


def test_two_masters_on_different_networks_both_save(healthy, tmp_path):
    prefix = prefix_for()
    m1, m2 = opts_for(healthy, tmp_path, "m1", prefix), opts_for(healthy, tmp_path, "m2", prefix)
    with record.open(m1) as a, record.open(m2) as b:
        a.record([move("red", "net1", "net2", 1)], 1.0, "m1")
        b.record([move("blue", "net3", "net4", 1)], 2.0, "m2")  # another key: no conflict
    got = record.read_owners(m1)
    assert {k: (v["owner"], v["epoch"]) for k, v in got.items()} == {"red": ("net2", 1), "blue": ("net4", 1)}


# --------------------------------------------------------------------------- members down, quorum lost


def test_one_member_down_changes_nothing(healthy, tmp_path):
    opts = opts_for(healthy, tmp_path, "m1", prefix_for())
    leader = healthy.leader()
    follower = next(n for n in healthy.members if n != leader)
    healthy.kill(follower)
    t0 = time.monotonic()
    with record.open(opts) as rec:
        rec.record([move("shared", "net1", "net2", 1)], 1.0, "a follower down")
    assert record.read_owners(opts)["shared"]["epoch"] == 1
    print(f"follower {follower} down: read + save + read in {time.monotonic() - t0:.3f} s")
    healthy.start_member(follower, wait=True)
    # the leader down: after the election (about a second) the other two serve
    healthy.kill(leader)
    healthy.wait_healthy(timeout=30)
    t0 = time.monotonic()
    with record.open(opts) as rec:
        rec.record([move("shared", "net2", "net1", 2)], 2.0, "the leader down")
    assert record.read_owners(opts)["shared"]["epoch"] == 2
    print(f"leader {leader} down: read + save + read in {time.monotonic() - t0:.3f} s")


def test_quorum_lost_is_unavailable_in_time_and_writes_nothing(healthy, tmp_path):
    opts = opts_for(healthy, tmp_path, "m1", prefix_for())
    with record.open(opts) as rec:
        rec.record([move("shared", "net1", "net2", 1)], 1.0, "before")
    before = record.read_owners(opts)
    with record.open(opts) as held:  # read while healthy, saved after quorum is gone
        pass
    names = list(healthy.members)
    healthy.kill(names[0])
    healthy.kill(names[1])
    for what, call in (("read", lambda: record.read_owners(opts)), ("open", lambda: record.open(opts).__enter__())):
        t0 = time.monotonic()
        with pytest.raises(record.RecordUnavailable) as err:
            call()
        took = time.monotonic() - t0
        print(f"quorum lost: {what} unavailable in {took:.2f} s: {err.value}")
        assert took < TIMEOUT + 0.5
        for ep in healthy.endpoints:
            assert ep in str(err.value)
        assert "connection refused" in str(err.value)
    failover.record_move(held.owners, move("shared", "net2", "net3", 2), 3.0, "during the outage")
    t0 = time.monotonic()
    with pytest.raises(record.RecordUnavailable):
        held.save()
    assert time.monotonic() - t0 < TIMEOUT + 0.5
    # quorum back: the record is as it was (nothing written, nothing reset), and saves work
    healthy.start_member(names[0])
    healthy.start_member(names[1])
    healthy.wait_healthy(timeout=30)
    assert record.read_owners(opts) == before
    with record.open(opts) as rec:
        rec.record([move("shared", "net2", "net3", 2)], 4.0, "after")
    assert record.read_owners(opts)["shared"]["epoch"] == 2


# --------------------------------------------------------------------------- the runner on two masters


def pillar():
    hosts = ("net1", "net2")
    return {
        "networks": {
            "shared": {
                "cidr": "10.20.0.0/24",
                "bridge": "br200",
                "bridge_interface": "eth1",
                "multi_host": False,
                "gateway": "10.20.0.1",
                "network_hosts": list(hosts),
            }
        },
        "hosts": {
            h: {"public_interface": "eth0", "networks": {"shared": {"address": f"10.20.0.{10 + i}"}}}
            for i, h in enumerate(hosts + ("compute1",))
        },
        "instances": {},
    }


def load_runner(opts, cfg, published, fired):
    """A fresh instance of _runners/hanet.py with ``opts`` as its __opts__ (one master),
    Salt's side (pillar, publish, events, second opinion) replaced."""
    path = os.path.join(CHECKOUT, "_runners", "hanet.py")
    spec = importlib.util.spec_from_file_location(f"hanet_runner_{uuid.uuid4().hex[:6]}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.__opts__ = opts
    mod._config = lambda mid, fresh=False: (cfg, {})
    mod._canonical = lambda fresh=False: "net1"
    mod._second_opinion = lambda cfg, peer: failover.Opinion("dead", "watch", ("10.0.0.1",))
    mod._publish = lambda tgt, fun, arg, kwarg=None, direct=0: published.append((opts["cachedir"], tgt, fun, list(arg)))
    mod._fire = lambda tag, data: fired.append((opts["cachedir"], tag, data))
    return mod


def test_two_masters_deciding_one_report_make_one_decision(healthy, tmp_path, monkeypatch):
    prefix = prefix_for()
    cfg = model.load(pillar())
    published, fired = [], []
    masters = [load_runner(opts_for(healthy, tmp_path, m, prefix), cfg, published, fired) for m in ("m1", "m2")]
    monkeypatch.setattr(failover, "verify", lambda key_file, data: None)
    # both masters read the record before either saves: one of them loses the
    # compare-and-swap, reads again and decides again
    barrier = threading.Barrier(2, timeout=20)
    decide, first = failover.decide, threading.local()

    def decide_after_both_read(*args, **kwargs):
        if not getattr(first, "done", False):
            first.done = True
            barrier.wait()
        return decide(*args, **kwargs)

    monkeypatch.setattr(failover, "decide", decide_after_both_read)
    data = failover.report("net2", "net1", failover.DOWN, time.time() - 0.1, nonce="n-" + uuid.uuid4().hex)
    tag = failover.liveness_tag("net2", "net1", failover.DOWN)
    out = {}
    threads = [
        threading.Thread(target=lambda i=i: out.__setitem__(i, masters[i].liveness(tag, dict(data), "engine")))
        for i in (0, 1)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(o.get("moved", {}).get("shared", "-") for o in out.values()) == ["-", "net2"], out
    loser = next(o for o in out.values() if "moved" not in o)
    assert loser["result"] is True and "another master" in loser["reason"]
    owners = record.read_owners(masters[0].__opts__)
    assert owners["shared"]["owner"] == "net2" and owners["shared"]["epoch"] == 1
    winner_dir = next(d for d, *_ in published)
    assert [(t, f, a) for d, t, f, a in published] == [
        ("net2", failover.TAKEOVER_FUN, ["shared", 1]),
        ("net1", failover.RELINQUISH_FUN, ["shared", 1, "net2"]),
    ]
    assert all(d == winner_dir for d, *_ in published)
    assert not [f for f in fired if f[1].endswith("/rejected")]
    # the winner's complete event, confirmed by the other master
    got = masters[1].outcome(
        failover.failover_tag("shared", "complete"), {"network": "shared", "to": "net2", "epoch": 1}
    )
    assert got == {"result": True, "confirmed": ["shared", 1]}
    assert record.read_owners(masters[0].__opts__)["shared"]["confirmed"] is True


def test_quorum_lost_the_runner_moves_nothing_and_status_says_why(healthy, tmp_path, monkeypatch):
    prefix = prefix_for()
    cfg = model.load(pillar())
    published, fired = [], []
    m1 = load_runner(opts_for(healthy, tmp_path, "m1", prefix), cfg, published, fired)
    monkeypatch.setattr(failover, "verify", lambda key_file, data: None)

    class Local:
        @staticmethod
        def cmd(tgt, fun, timeout=None, **kw):
            return {
                "net1": {"networks": {"shared": {"role": "serving", "addresses": ["10.20.0.1/24"]}}},
                "net2": {"networks": {"shared": {"role": "standby", "addresses": []}}},
            }

    m1._local = lambda: Local
    healthy_status = m1.status()
    assert healthy_status["networks"]["shared"]["owner"] == "net1" and "record_error" not in healthy_status
    assert healthy_status["record_backend"].startswith("etcd http://192.0.2.21:2379")
    names = list(healthy.members)
    healthy.kill(names[0])
    healthy.kill(names[1])
    data = failover.report("net2", "net1", failover.DOWN, time.time() - 0.1, nonce="n-" + uuid.uuid4().hex)
    t0 = time.monotonic()
    got = m1.liveness(failover.liveness_tag("net2", "net1", failover.DOWN), data, "engine")
    took = time.monotonic() - t0
    assert got["result"] is False and got["reason"].startswith("no decision: etcd cannot read the record")
    assert took < TIMEOUT + 0.5
    assert published == []  # fail static: no order
    st = m1.status()
    assert "etcd cannot read the record" in st["record_error"]
    assert st["record"] is None
    assert st["networks"]["shared"]["serving"] == ["net1"]  # the owner keeps serving
    assert st["networks"]["shared"]["owner"] is None
    print(f"quorum lost: liveness refused in {took:.2f} s; status: {st['record_error']}")
    healthy.start_member(names[0])
    healthy.start_member(names[1])
    healthy.wait_healthy(timeout=30)
    data = failover.report("net2", "net1", failover.DOWN, time.time() - 0.1, nonce="n-" + uuid.uuid4().hex)
    got = m1.liveness(failover.liveness_tag("net2", "net1", failover.DOWN), data, "engine")
    assert got["moved"] == {"shared": "net2"}
    assert len(published) == 2


# --------------------------------------------------------------------------- authentication


def _post(url, body, token=None):
    import json
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    if token:
        req.add_header("Authorization", token)
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read())


def test_user_and_password(etcd, tmp_path, monkeypatch):
    """A member of its own (auth is cluster-wide), with tokens that expire after 1 s:
    no user, or a wrong password, is a RecordError saying so; the right one reads and
    saves, and authenticates again once its token expired."""
    from hanet_lab.etcd import EtcdCluster

    ns = next(iter(etcd.members.values())).ns
    from hanet_lab import nslib

    nslib.add_address(ns, "lo", "192.0.2.24/32")
    # its own directory (down() removes it and kills what names it), inside the run dir
    auth = EtcdCluster(
        etcd.prefix + "-auth",
        [("a1", ns, "192.0.2.24")],
        os.path.join(os.path.dirname(etcd.dir), "auth"),
        extra_args=["--auth-token-ttl", "1"],
    )
    try:
        auth.start()
        ep = auth.endpoints[0]
        _post(ep + "/v3/auth/user/add", {"name": "root", "password": "root-pw"})
        _post(ep + "/v3/auth/user/grant", {"user": "root", "role": "root"})
        _post(ep + "/v3/auth/enable", {})
        base = {"cachedir": str(tmp_path), "hanet_record": {"backend": "etcd", "endpoints": [ep], "timeout": TIMEOUT}}

        def opts(**more):
            return dict(base, hanet_record=dict(base["hanet_record"], **more))

        with pytest.raises(failover.RecordError, match="refused to read the record: etcdserver: user name is empty"):
            record.read_owners(base)
        with pytest.raises(failover.RecordError, match="authentication as root failed"):
            record.read_owners(opts(user="root", password="wrong"))
        good = opts(user="root", password="root-pw")
        logins = []
        authenticate = record.EtcdStore._authenticate
        monkeypatch.setattr(
            record.EtcdStore, "_authenticate", lambda self, client: logins.append(1) or authenticate(self, client)
        )
        with record.open(good) as rec:
            rec.record([move("shared", "net1", "net2", 1)], 1.0, "with auth")
        assert len(logins) == 1
        time.sleep(2.5)  # the token expired: authenticated again
        with record.open(good) as rec:
            assert rec.owners["shared"]["epoch"] == 1
            rec.record([move("shared", "net2", "net1", 2)], 2.0, "after the token expired")
        assert record.read_owners(good)["shared"]["epoch"] == 2
        assert len(logins) == 2
    finally:
        auth.down()
