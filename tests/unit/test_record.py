"""The record backends' pure parts (_hanet/record.py): the hanet_record option, the
entry encoding, a save's changes and its compare-and-swap transaction, and the retry
of a decision after a conflict. The etcd backend against a real cluster:
tests/integration/test_record_etcd.py."""

import base64
import json
import socket
import time

import pytest

from _hanet import failover, record

EPS = ["http://192.0.2.21:2379", "http://192.0.2.22:2379", "http://192.0.2.23:2379"]


def cfg_of(**raw):
    return record.config({"hanet_record": raw})


def problems_of(**raw):
    with pytest.raises(record.RecordConfigError) as err:
        record.config({"hanet_record": raw})
    return str(err.value)


# --------------------------------------------------------------------------- configuration


def test_no_option_is_the_file_backend():
    assert record.config({}).backend == "file"
    assert record.config({"hanet_record": None}).backend == "file"
    assert record.config({"hanet_record": {}}).backend == "file"
    assert cfg_of(backend="file").backend == "file"


def test_etcd_config_defaults_and_normalisation():
    cfg = cfg_of(backend="etcd", endpoints=[e + "/" for e in EPS], prefix="/site-a")
    assert cfg.backend == "etcd"
    assert cfg.endpoints == tuple(EPS)
    assert cfg.prefix == "/site-a/"
    assert cfg.timeout == record.DEFAULT_TIMEOUT
    assert cfg_of(backend="etcd", endpoints=EPS[0]).endpoints == (EPS[0],)  # one URL as a string
    assert "etcd http://192.0.2.21:2379" in cfg.describe()


def test_the_option_must_be_a_mapping():
    with pytest.raises(record.RecordConfigError, match=r"^hanet_record: must be a mapping"):
        record.config({"hanet_record": "etcd"})


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"backend": "etdc"}, "hanet_record.backend"),
        ({"backend": "etcd", "endpoint": EPS}, "hanet_record.endpoint"),  # unknown (typo)
        ({"backend": "etcd"}, "hanet_record.endpoints"),
        ({"backend": "etcd", "endpoints": []}, "hanet_record.endpoints"),
        ({"backend": "etcd", "endpoints": ["192.0.2.21:2379"]}, "hanet_record.endpoints.0"),
        ({"backend": "etcd", "endpoints": [EPS[0], "http://192.0.2.22"]}, "hanet_record.endpoints.1"),
        ({"backend": "etcd", "endpoints": ["ftp://192.0.2.21:2379"]}, "hanet_record.endpoints.0"),
        ({"backend": "etcd", "endpoints": ["http://192.0.2.21:2379/v3"]}, "hanet_record.endpoints.0"),
        ({"backend": "etcd", "endpoints": [EPS[0], EPS[0]]}, "hanet_record.endpoints"),
        ({"backend": "etcd", "endpoints": [2379]}, "hanet_record.endpoints.0"),
        ({"backend": "etcd", "endpoints": EPS, "timeout": 0}, "hanet_record.timeout"),
        ({"backend": "etcd", "endpoints": EPS, "timeout": "2s"}, "hanet_record.timeout"),
        ({"backend": "etcd", "endpoints": EPS, "timeout": True}, "hanet_record.timeout"),
        ({"backend": "etcd", "endpoints": EPS, "timeout": 600}, "hanet_record.timeout"),
        ({"backend": "etcd", "endpoints": EPS, "prefix": ""}, "hanet_record.prefix"),
        ({"backend": "etcd", "endpoints": EPS, "prefix": "/hänet/"}, "hanet_record.prefix"),
        ({"backend": "etcd", "endpoints": EPS, "user": "hanet"}, "hanet_record.password"),
        ({"backend": "etcd", "endpoints": EPS, "password": "x"}, "hanet_record.user"),
        ({"backend": "etcd", "endpoints": EPS, "user": ""}, "hanet_record.user"),
        ({"backend": "file", "endpoints": EPS}, "hanet_record.endpoints"),
    ],
)
def test_each_bad_option_is_named(raw, key):
    msg = problems_of(**raw)
    assert f"{key}:" in msg
    assert "no decision is made" in msg


def test_tls_options(tmp_path):
    ca, cert, key = (tmp_path / n for n in ("ca.pem", "client.pem", "client.key"))
    for p in (ca, cert, key):
        p.write_text("x")
    https = [e.replace("http:", "https:") for e in EPS]
    cfg = cfg_of(backend="etcd", endpoints=https, ca_cert=str(ca), cert_cert=str(cert), cert_key=str(key))
    assert (cfg.ca_cert, cfg.cert_cert, cfg.cert_key) == (str(ca), str(cert), str(key))
    assert "hanet_record.ca_cert: " in problems_of(
        backend="etcd", endpoints=https, ca_cert=str(tmp_path / "missing.pem")
    )
    assert "hanet_record.cert_key:" in problems_of(backend="etcd", endpoints=https, cert_cert=str(cert))
    assert "hanet_record.cert_cert:" in problems_of(backend="etcd", endpoints=https, cert_key=str(key))
    # TLS options with only http endpoints: a mistake, said so
    assert "hanet_record.ca_cert: set, but no endpoint is https://" in problems_of(
        backend="etcd", endpoints=EPS, ca_cert=str(ca)
    )


def test_every_problem_is_listed_and_the_password_never():
    msg = problems_of(backend="etcd", endpoints=["nope"], timeout=-1, user="hanet", password=7)
    assert "3 problems" in msg and "7" not in msg.split("password:")[1]
    for key in ("endpoints.0", "timeout", "password"):
        assert f"hanet_record.{key}:" in msg
    cfg = cfg_of(backend="etcd", endpoints=EPS, user="hanet", password="s3cret")
    assert "s3cret" not in repr(cfg)


def test_open_and_read_owners_with_the_file_backend(tmp_path):
    opts = {"cachedir": str(tmp_path)}
    assert record.read_owners(opts) == {}
    with record.open(opts) as rec:
        assert isinstance(rec, failover.Record)
        rec.record([failover.Move("shared", "net1", "net2", 1)], 10.0, "test")
    assert record.read_owners(opts)["shared"]["owner"] == "net2"
    assert failover.read_owners(str(tmp_path))["shared"]["epoch"] == 1
    assert record.describe(opts).startswith("file ")
    with pytest.raises(record.RecordConfigError):
        record.open({"cachedir": str(tmp_path), "hanet_record": {"backend": "etcd"}})


# --------------------------------------------------------------------------- entries, changes, transaction


def test_entry_round_trip_and_refusals():
    entry = {"owner": "net2", "epoch": 3, "since": 1.5, "reason": "x", "previous": "net1", "confirmed": False}
    text = record.encode_entry(entry)
    assert text == json.dumps(entry, sort_keys=True, separators=(",", ":"))
    assert record.decode_entry("/hanet/owners/shared", text.encode()) == entry
    for bad in (
        b"{",
        b"[]",
        b'{"owner": "net2"}',
        b'{"owner": 1, "epoch": 1}',
        b'{"owner": "a", "epoch": true}',
        b"\xff",
    ):
        with pytest.raises(failover.RecordError, match="/hanet/owners/shared"):
            record.decode_entry("/hanet/owners/shared", bad)


def test_changes_are_only_what_the_decision_changed():
    a1 = {"owner": "net1", "epoch": 1}
    b4 = {"owner": "net2", "epoch": 4}
    read = {"a": (dict(a1), 11), "b": (dict(b4), 12), "gone": ({"owner": "x", "epoch": 1}, 13)}
    owners = {"a": dict(a1), "b": dict(b4, confirmed=True), "new": {"owner": "net3", "epoch": 1}}
    chg = record.changes(read, owners)
    assert [c.network for c in chg] == ["b", "gone", "new"]
    by = {c.network: c for c in chg}
    assert by["b"].mod_revision == 12 and json.loads(by["b"].value)["confirmed"] is True
    assert by["gone"].value is None and by["gone"].mod_revision == 13
    assert by["new"].mod_revision == 0
    assert record.changes(read, {k: v[0] for k, v in read.items()}) == []


def test_the_transaction_compares_each_changed_key():
    chg = [
        record.Change("b", '{"epoch":5,"owner":"net1"}', 12),
        record.Change("new", '{"epoch":1,"owner":"n"}', 0),
        record.Change("gone", None, 13),
    ]
    txn = record.txn_payload("/hanet/", chg)

    def key(net):
        return base64.b64encode(f"/hanet/owners/{net}".encode()).decode()

    assert txn["compare"] == [
        {"key": key("b"), "result": "EQUAL", "target": "MOD", "mod_revision": "12"},
        {"key": key("new"), "result": "EQUAL", "target": "CREATE", "create_revision": "0"},
        {"key": key("gone"), "result": "EQUAL", "target": "MOD", "mod_revision": "13"},
    ]
    assert txn["success"][0] == {
        "request_put": {"key": key("b"), "value": base64.b64encode(b'{"epoch":5,"owner":"net1"}').decode()}
    }
    assert txn["success"][2] == {"request_delete_range": {"key": key("gone")}}
    assert txn["failure"] == [{"request_range": {"key": key(n)}} for n in ("b", "new", "gone")]


def _kv(value, rev):
    return {"key": "", "value": base64.b64encode(json.dumps(value).encode()).decode(), "mod_revision": str(rev)}


def test_a_failed_compare_is_a_conflict_unless_the_store_holds_our_change(monkeypatch):
    store = record.EtcdStore(cfg_of(backend="etcd", endpoints=EPS))
    ours = {"owner": "net2", "epoch": 2}
    chg = [record.Change("shared", record.encode_entry(ours), 7)]

    def answer(kvs):
        monkeypatch.setattr(
            store,
            "call",
            lambda what, fn: {"header": {"revision": "9"}, "responses": [{"response_range": {"kvs": kvs}}]},
        )

    answer([_kv({"owner": "net3", "epoch": 2}, 8)])  # another master won
    with pytest.raises(record.RecordConflict, match="shared .now net3 at epoch 2") as err:
        store.transact(chg)
    assert err.value.current == {"shared": {"owner": "net3", "epoch": 2}}
    assert isinstance(err.value, failover.RecordError)  # callers that do not retry: no decision
    answer([_kv(ours, 8)])  # an earlier try of this same save went through
    assert store.transact(chg) == {"shared": 8}
    monkeypatch.setattr(store, "call", lambda what, fn: {"header": {"revision": "9"}, "succeeded": True})
    assert store.transact(chg) == {"shared": 9}


# --------------------------------------------------------------------------- attempts


def test_attempts_decide_again_after_a_conflict(tmp_path, monkeypatch):
    opts = {"cachedir": str(tmp_path)}
    seen = []
    for attempt in record.attempts(opts, tries=3):
        with attempt as rec:
            seen.append(attempt.number)
            if attempt.number < 2:
                raise record.RecordConflict("lost")
            rec.record([failover.Move("shared", "net1", "net2", 1)], 1.0, "won")
    assert seen == [0, 1, 2]
    assert record.read_owners(opts)["shared"]["reason"] == "won"
    with pytest.raises(record.RecordConflict):
        for attempt in record.attempts(opts, tries=2):
            with attempt:
                raise record.RecordConflict("always lost")
    n = 0
    for attempt in record.attempts(opts):  # no conflict: one attempt only
        with attempt:
            n += 1
    assert n == 1


# --------------------------------------------------------------------------- unavailable, quickly


def test_unreachable_endpoints_are_unavailable_within_the_timeout(tmp_path):
    ports = []
    for _ in range(2):  # two loopback ports nobody listens on
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        ports.append(s.getsockname()[1])
        s.close()
    eps = [f"http://127.0.0.1:{p}" for p in ports]
    opts = {"cachedir": str(tmp_path), "hanet_record": {"backend": "etcd", "endpoints": eps, "timeout": 1}}
    t0 = time.monotonic()
    with pytest.raises(record.RecordUnavailable) as err:
        record.read_owners(opts)
    assert time.monotonic() - t0 < 1.5
    for ep in eps:
        assert f"{ep}: connection refused" in str(err.value)
    with pytest.raises(record.RecordUnavailable):
        with record.open(opts):
            pass
    import fcntl

    with open(tmp_path / "hanet" / "owners.lock") as lock:  # the failed open let its lock go
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_seeded_first_attempt_reads_nothing_and_a_conflict_reads_again(tmp_path, monkeypatch):
    """The decision reads the record once (``seed_of``) for its checks and decides on
    that read; a change since is caught by the compare-and-swap, and the next attempt
    reads afresh."""
    opts = {"cachedir": str(tmp_path), "hanet_record": {"backend": "etcd", "endpoints": EPS}}
    reads = []
    stored = {"shared": ({"owner": "net1", "epoch": 1}, 5)}

    def read_owners(self):
        reads.append(1)
        return ({n: dict(e) for n, (e, _) in stored.items()}, {n: (dict(e), r) for n, (e, r) in stored.items()})

    monkeypatch.setattr(record.EtcdStore, "read_owners", read_owners)
    saved = []

    def transact(self, chg):
        for c in chg:
            if c.mod_revision != stored[c.network][1]:
                raise record.RecordConflict("lost", {c.network: stored[c.network][0]})
        saved.extend(chg)
        return {c.network: 9 for c in chg}

    monkeypatch.setattr(record.EtcdStore, "transact", transact)
    with record.open(opts) as rec:
        seed = record.seed_of(rec)
    assert len(reads) == 1 and seed[1] == {"shared": ({"owner": "net1", "epoch": 1}, 5)}
    for attempt in record.attempts(opts, seed=seed):  # unchanged since: no read, saved
        with attempt as rec:
            rec.record([failover.Move("shared", "net1", "net2", 2)], 1.0, "down")
    assert len(reads) == 1 and [c.network for c in saved] == ["shared"]
    stored["shared"] = ({"owner": "net2", "epoch": 2}, 7)  # another master moved it meanwhile
    numbers = []
    for attempt in record.attempts(opts, seed=seed):
        with attempt as rec:
            numbers.append(attempt.number)
            if rec.owners["shared"]["owner"] == "net1":
                rec.record([failover.Move("shared", "net1", "net2", 2)], 1.0, "down")
    assert numbers == [0, 1] and len(reads) == 2  # the stale seed lost; a fresh read found the move
    assert record.seed_of(failover.Record(str(tmp_path))) is None  # the file backend: no seed
