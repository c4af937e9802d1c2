"""The failover protocol without Salt: reports (shape, freshness, signatures), the
decision table (every reject reason, every standby choice, epochs), orders, and the
durable record."""

import json
import os

import pytest

from _hanet import failover, model
from _hanet.failover import DOWN, UP, Move, Rejected

NOW = 1_800_000_000.0


def pillar(hosts=("net1", "net2"), **net):
    """One network-host network ``shared`` carried by ``hosts`` (its network hosts, in
    order), a compute host ``compute1`` with an instance on it, and a multi_host net."""
    all_hosts = list(hosts) + ["compute1", "compute2"]
    return {
        "networks": {
            "shared": dict(
                {
                    "cidr": "10.20.0.0/24",
                    "bridge": "br200",
                    "bridge_interface": "eth1",
                    "multi_host": False,
                    "gateway": "10.20.0.1",
                    "network_hosts": list(hosts),
                },
                **net,
            ),
            "private": {"cidr": "10.30.0.0/24", "bridge": "br300", "bridge_interface": "eth2", "multi_host": True},
        },
        "hosts": {
            h: {
                "public_interface": "eth0",
                "networks": dict(
                    {"shared": {"address": f"10.20.0.{10 + i}"}} if h != "compute2" else {},
                    private={"address": f"10.30.0.{10 + i}"},
                ),
            }
            for i, h in enumerate(all_hosts)
        },
        "instances": {
            "web1": {
                "host": "compute1",
                "nics": [{"network": "shared", "mac": "52:54:00:00:00:01", "ip": "10.20.0.100"}],
                "floating_ips": [{"address": "203.0.113.50", "fixed_ip": "10.20.0.100"}],
            }
        },
    }


@pytest.fixture
def cfg():
    return model.load(pillar())


def rep(observer="net2", peer="net1", state=DOWN, detected_at=NOW - 0.2, nonce="n1"):
    return failover.Report(observer, peer, state, detected_at, nonce)


# --------------------------------------------------------------------------- tags and reports


def test_tags_round_trip():
    tag = failover.liveness_tag("net2", "net1", DOWN)
    assert tag == "salt/beacon/net2/hanet_liveness/net1/down"
    assert failover.parse_liveness_tag(tag) == ("net2", "net1", DOWN)
    assert failover.failover_tag("shared", "complete") == "hanet/failover/shared/complete"
    assert failover.failover_tag(None, "rejected") == "hanet/failover/unknown/rejected"
    import fnmatch

    assert fnmatch.fnmatchcase(tag, failover.LIVENESS_GLOB)


@pytest.mark.parametrize(
    "tag",
    [
        "salt/beacon/net2/hanet_liveness/net1/sideways",
        "salt/beacon/net2/other/net1/down",
        "salt/beacon/net2/hanet_liveness/net1",
        "hanet/failover/x/complete",
        "",
        None,
        7,
    ],
)
def test_malformed_tags_are_not_liveness_tags(tag):
    assert failover.parse_liveness_tag(tag) is None


def test_a_report_parses_with_its_fields():
    data = failover.report("net2", "net1", DOWN, NOW - 1, ["br200:10.20.0.10"], nonce="abc")
    got = failover.parse_report(failover.liveness_tag("net2", "net1", DOWN), data, NOW)
    assert got == failover.Report("net2", "net1", DOWN, NOW - 1, "abc")


@pytest.mark.parametrize(
    "mutate,reason",
    [
        (lambda t, d: (t, "not a dict"), "malformed event"),
        (lambda t, d: ("salt/beacon/net2/hanet_liveness/net1/maybe", d), "malformed tag"),
        (lambda t, d: (t, dict(d, observer="compute1")), "tag and data disagree"),
        (lambda t, d: (t, dict(d, peer="net9")), "tag and data disagree"),
        (lambda t, d: (t, dict(d, state=UP)), "tag and data disagree"),
        (lambda t, d: (t, dict(d, detected_at="yesterday")), "malformed data"),
        (lambda t, d: (t, dict(d, detected_at=True)), "malformed data"),
        (lambda t, d: (t, {k: v for k, v in d.items() if k != "nonce"}), "malformed data"),
        (lambda t, d: (t, dict(d, detected_at=NOW - 31)), "stale event"),
        (lambda t, d: (t, dict(d, detected_at=NOW + 31)), "stale event"),
    ],
)
def test_every_malformed_report_is_rejected_with_its_reason(mutate, reason):
    tag, data = failover.liveness_tag("net2", "net1", DOWN), failover.report("net2", "net1", DOWN, NOW)
    tag, data = mutate(tag, data)
    with pytest.raises(Rejected) as err:
        failover.parse_report(tag, data, NOW)
    assert reason in err.value.reason


def test_the_signature_covers_the_canonical_form_only(tmp_path):
    import salt.crypt

    priv, pub_pem = salt.crypt.gen_keys(2048)
    (tmp_path / "minion.pem").write_text(priv)
    (tmp_path / "minion.pub").write_text(pub_pem)
    key = salt.crypt.PrivateKey.from_file(str(tmp_path / "minion.pem"))
    pub = str(tmp_path / "minion.pub")
    data = failover.sign(key, failover.report("net2", "net1", DOWN, NOW, nonce="n"))
    assert failover.verify(pub, data) is None
    assert failover.verify(pub, dict(data, targets=["anything"])) is None, "targets are not signed"
    for field in failover.SIGNED:
        forged = dict(data, **{field: "forged" if field != "detected_at" else NOW + 1})
        assert failover.verify(pub, forged) == "bad signature", field
    assert failover.verify(pub, {k: v for k, v in data.items() if k != "sig"}) == "unsigned"
    assert failover.verify(pub, dict(data, sig="!!notbase64")).startswith("bad signature")
    assert failover.verify(str(tmp_path / "nobody.pub"), data).startswith("no accepted key")


# --------------------------------------------------------------------------- the decision


def test_a_confirmed_down_moves_every_network_the_peer_holds_to_the_observer(cfg):
    v = failover.decide(cfg, {}, rep(), "dead")
    assert v.moves == [Move("shared", "net1", "net2", 1)] and v.rejected == []


def test_the_epoch_steps_from_the_record(cfg):
    owners = {"shared": {"owner": "net1", "epoch": 7}}
    assert failover.decide(cfg, owners, rep(), "dead").moves == [Move("shared", "net1", "net2", 8)]


def test_a_compute_host_observer_moves_the_network_to_the_first_standby():
    cfg = model.load(pillar(hosts=("net1", "net2", "net3")))
    v = failover.decide(cfg, {}, rep(observer="compute1"), "dead")
    assert v.moves == [Move("shared", "net1", "net2", 1)]
    v = failover.decide(cfg, {}, rep(observer="net3"), "dead")
    assert v.moves == [Move("shared", "net1", "net3", 1)], "the observing standby takes it"


@pytest.mark.parametrize(
    "opinion,reason",
    [
        ("alive", "second opinion: net1 answers the master (192.0.2.11)"),
        (None, "second opinion: the master cannot check net1 (192.0.2.11)"),
    ],
)
def test_a_suspect_the_master_sees_alive_or_cannot_see_is_not_moved(cfg, opinion, reason):
    v = failover.decide(cfg, {}, rep(), opinion, "192.0.2.11")
    assert v.moves == [] and v.rejected == [("shared", reason)]


@pytest.mark.parametrize(
    "report,owners",
    [
        (rep(peer="net2"), {}),  # net2 holds nothing (net1 does)
        (rep(peer="compute1", observer="net1"), {}),  # a compute host holds no network
        (rep(observer="compute2"), {}),  # compute2 does not carry shared
        (rep(observer="net1", peer="net1"), {}),  # nobody watches itself
        (rep(), {"shared": {"owner": "net2", "epoch": 3}}),  # moved already
    ],
)
def test_a_report_about_nothing_the_observer_watches_is_rejected(cfg, report, owners):
    v = failover.decide(cfg, owners, report, "dead")
    assert v.moves == []
    assert v.rejected == [(None, f"{report.observer} watches no network that {report.peer} holds")]


def test_an_up_report_decides_nothing(cfg):
    assert failover.decide(cfg, {}, rep(state=UP), "dead") == failover.Verdict()


def test_a_network_without_standby_is_rejected_by_name():
    cfg = model.load(pillar(hosts=("net1",)))
    v = failover.decide(cfg, {}, rep(observer="compute1"), "dead")
    assert v.moves == [] and v.rejected == [("shared", "no live standby for shared")]


def test_planned_moves_and_evacuation(cfg):
    owners = {"shared": {"owner": "net2", "epoch": 4}}
    assert failover.planned_move(cfg, owners, "shared", "net2") is None
    # a planned move is a handover: the old owner lets go first (never two holders)
    assert failover.planned_move(cfg, owners, "shared", "net1") == Move("shared", "net2", "net1", 5, handover=True)
    assert failover.evacuation(cfg, owners, "net2") == [("shared", Move("shared", "net2", "net1", 5))]
    assert failover.evacuation(cfg, owners, "net1") == []
    lone = model.load(pillar(hosts=("net1",)))
    assert failover.evacuation(lone, {}, "net1") == [("shared", None)]


def test_record_move_and_owner_of(cfg):
    owners = {}
    assert failover.owner_of(cfg, owners, "shared") == "net1", "first network host by default"
    failover.record_move(owners, Move("shared", "net1", "net2", 1), NOW, "why")
    assert owners == {
        "shared": {"owner": "net2", "epoch": 1, "since": NOW, "reason": "why", "previous": "net1", "confirmed": False}
    }
    assert not failover.confirmed(owners, "shared")
    assert not failover.confirm(owners, "shared", "net1", 1), "not the owner"
    assert not failover.confirm(owners, "shared", "net2", 2), "not the epoch"
    assert failover.confirm(owners, "shared", "net2", 1) and failover.confirmed(owners, "shared")
    assert not failover.confirm(owners, "shared", "net2", 1), "once"
    assert failover.confirmed({}, "shared"), "never moved: the highstate binds it"
    assert failover.owner_of(cfg, owners, "shared") == "net2"


def test_merge_takes_the_higher_epoch_per_network():
    pill = {"a": {"owner": "x", "epoch": 3}, "b": {"owner": "x", "epoch": 1}, "bad": {"epoch": 9}}
    local = {"a": {"owner": "y", "epoch": 2}, "b": {"owner": "y", "epoch": 2}, "c": "junk"}
    assert failover.merge(pill, local) == {"a": {"owner": "x", "epoch": 3}, "b": {"owner": "y", "epoch": 2}}


def test_vouching_addresses_leave_out_what_moves(cfg):
    got = failover.vouching_addresses(cfg, ["127.0.0.1", "10.20.0.1", "203.0.113.50", "192.0.2.11"])
    assert got == ["192.0.2.11"]
    assert failover.watched_hosts(cfg) == ["net1", "net2"]


# --------------------------------------------------------------------------- orders


def test_a_takeover_order_round_trips_through_the_publication():
    args, kwargs = failover.takeover_order("shared", 3, "net1", detected_at=1.5, decision={"via": "engine"})
    load = {
        "fun": failover.TAKEOVER_FUN,
        "tgt": "net2",
        "tgt_type": "glob",
        "jid": "9",
        "arg": args + [dict(kwargs, __kwarg__=True)],
    }
    assert failover.parse_order({"load": load}, "net2") == {
        "jid": "9",
        "fun": failover.TAKEOVER_FUN,
        "args": args,
        "kwargs": kwargs,
    }
    assert set(kwargs) <= failover.TAKEOVER_KWARGS
    args, kwargs = failover.takeover_order("shared", 3, "net1", handover=True)
    assert kwargs == {"previous": "net1", "handover": True}


def test_a_relinquish_order_is_heard_too_and_nothing_else():
    load = {
        "fun": failover.RELINQUISH_FUN,
        "tgt": "net1",
        "tgt_type": "glob",
        "jid": "10",
        "arg": ["shared", 4, "net2"],
    }
    assert failover.parse_order({"load": load}, "net1") == {
        "jid": "10",
        "fun": failover.RELINQUISH_FUN,
        "args": ["shared", 4, "net2"],
        "kwargs": {},
    }
    assert failover.parse_order({"load": dict(load, arg=["shared", 4])}, "net1") is None
    assert failover.parse_order({"load": dict(load, tgt="net2")}, "net1") is None
    assert failover.parse_order({"load": dict(load, fun="cmd.run")}, "net1") is None


def test_every_order_keyword_is_one_hanet_takeover_takes():
    import inspect

    from _hanet import takeover

    params = set(inspect.signature(takeover.run).parameters)
    assert failover.TAKEOVER_KWARGS <= params


# --------------------------------------------------------------------------- the record


def test_the_record_survives_a_round_trip_and_keeps_nonces_apart(tmp_path):
    cache = str(tmp_path)
    with failover.Record(cache) as rec:
        assert rec.owners == {} and rec.seen == {}
        rec.seen["n1"] = [NOW, "engine"]
        rec.save_seen(NOW)
        failover.record_move(rec.owners, Move("shared", "net1", "net2", 1), NOW, "test")
        rec.save()
    assert failover.read_owners(cache)["shared"]["owner"] == "net2"
    with open(os.path.join(cache, "hanet", "owners.json")) as fh:
        assert "seen" not in json.load(fh)
    with failover.Record(cache) as rec:
        assert rec.seen == {"n1": [NOW, "engine"]}
        rec.save_seen(NOW + 10 * failover.FRESH_S + 1)
    with failover.Record(cache) as rec:
        assert rec.seen == {}, "old nonces are forgotten"


@pytest.mark.parametrize("text", ["", "{", "[]", '{"owners": []}', "\0\0\0"])
def test_a_torn_or_empty_record_stops_decisions_loudly(tmp_path, text):
    d = tmp_path / "hanet"
    d.mkdir()
    (d / "owners.json").write_text(text)
    with pytest.raises(failover.RecordError):
        failover.read_owners(str(tmp_path))
    with pytest.raises(failover.RecordError):
        with failover.Record(str(tmp_path)):
            pass
    import fcntl

    with open(d / "owners.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the failed Record let its lock go


def test_a_missing_record_is_the_empty_one(tmp_path):
    assert failover.read_owners(str(tmp_path)) == {}


def test_the_engine_heartbeat(tmp_path):
    cache = str(tmp_path)
    assert not failover.engine_alive(cache)
    os.makedirs(failover.record_dir(cache))
    with open(failover.engine_beat(cache), "w") as fh:
        fh.write("1\n")
    assert failover.engine_alive(cache)
    assert not failover.engine_alive(cache, now=os.stat(failover.engine_beat(cache)).st_mtime + 60)


def test_a_host_record_never_goes_back_in_epochs(tmp_path):
    from _hanet import takeover
    from _hanet.common import Paths

    paths = Paths(root_dir=str(tmp_path))
    assert takeover.write_local_owner(paths, "shared", "net2", 5)
    assert not takeover.write_local_owner(paths, "shared", "net1", 4), "a late order of an older epoch"
    assert takeover.local_owners(paths) == {"shared": {"owner": "net2", "epoch": 5}}
    assert takeover.write_local_owner(paths, "shared", "net1", 6)
    assert takeover.write_local_owner(paths, "other", "net1", 1)
    assert takeover.local_owners(paths)["shared"] == {"owner": "net1", "epoch": 6}


# --------------------------------------------------------------------------- reconcile

from _hanet.failover import Order  # noqa: E402

ALIVE3 = {"net1": "alive", "net2": "alive", "net3": "alive"}


@pytest.fixture
def cfg3():
    return model.load(pillar(hosts=("net1", "net2", "net3")))


def test_a_report_never_goes_to_a_standby_the_master_sees_dead(cfg3):
    v = failover.decide(cfg3, {}, rep(observer="compute1"), "dead", dead={"net2"})
    assert v.moves == [Move("shared", "net1", "net3", 1)]
    v = failover.decide(cfg3, {}, rep(observer="compute1"), "dead", dead={"net2", "net3"})
    assert v.moves == [] and v.rejected == [("shared", "no live standby for shared")]


def test_reconcile_does_nothing_when_all_agree(cfg3):
    owners = {"shared": {"owner": "net2", "epoch": 3, "since": NOW - 60, "confirmed": True}}
    holdings = {"net1": {"shared": False}, "net2": {"shared": True}, "net3": {"shared": False}}
    assert failover.reconcile(cfg3, owners, ALIVE3, {}, holdings, NOW, {}) == ([], [])


def test_a_dead_owner_that_a_live_host_sees_down_is_replaced_without_a_report(cfg3):
    """The master was down when the owner died, or the report was lost or rejected."""
    verdicts = dict(ALIVE3, net1="dead")
    views = {"net3": {"net1": "down"}, "compute1": {"net1": "down"}}
    moves, orders = failover.reconcile(cfg3, {}, verdicts, views, None, NOW, {})
    assert moves == [Move("shared", "net1", "net3", 1)], "a standby that sees it down first"
    assert orders == [
        Order("takeover", "net3", "shared", 1, previous="net1"),
        Order("relinquish", "net1", "shared", 1, owner="net3"),
    ]
    moves, _ = failover.reconcile(cfg3, {}, verdicts, {"compute1": {"net1": "down"}}, None, NOW, {})
    assert moves == [Move("shared", "net1", "net2", 1)], "else the first live standby"


@pytest.mark.parametrize(
    "verdicts,views",
    [
        (dict(ALIVE3, net1="dead"), {}),  # nobody else asked
        (dict(ALIVE3, net1="dead"), {"net2": {"net1": "up"}}),  # the segment sees it
        (dict(ALIVE3, net1="dead"), {"compute2": {"net1": "down"}}),  # not a host of shared
        (dict(ALIVE3, net1="dead", net2="dead"), {"net2": {"net1": "down"}}),  # a dead witness
        (dict(net1="dead", net2="dead", net3="dead"), {"compute1": {"net1": "down"}}),  # no live standby
        (dict(ALIVE3, net1=None), {"net2": {"net1": "down"}}),  # the master cannot tell
    ],
)
def test_the_masters_view_alone_moves_nothing(cfg3, verdicts, views):
    assert failover.reconcile(cfg3, {}, verdicts, views, None, NOW, {})[0] == []


def test_owner_and_first_standby_dead_together_the_third_serves(cfg3):
    owners = {"shared": {"owner": "net2", "epoch": 4, "since": NOW - 1, "confirmed": False}}
    verdicts = dict(ALIVE3, net1="dead", net2="dead")
    moves, _ = failover.reconcile(cfg3, owners, verdicts, {"compute1": {"net2": "down"}}, None, NOW, {})
    assert moves == [Move("shared", "net2", "net3", 5)]


def test_an_unconfirmed_move_is_ordered_again_until_confirmed(cfg3):
    """The master died between recording the decision and publishing the order, or the
    order was lost, or the takeover failed."""
    owners = {"shared": {"owner": "net2", "epoch": 4, "since": NOW - 10, "previous": "net1", "confirmed": False}}
    order = Order("takeover", "net2", "shared", 4, previous="net1")
    assert failover.reconcile(cfg3, owners, ALIVE3, {}, None, NOW, {}) == ([], [order])
    assert failover.reconcile(cfg3, owners, ALIVE3, {}, None, NOW, {order.key: NOW - 1}) == ([], []), (
        "not more often than every confirm_s"
    )
    assert failover.reconcile(cfg3, owners, ALIVE3, {}, None, NOW, {order.key: NOW - 6})[1] == [order]
    fresh = {"shared": dict(owners["shared"], since=NOW - 1)}
    assert failover.reconcile(cfg3, fresh, ALIVE3, {}, None, NOW, {}) == ([], []), "give it time first"
    failover.confirm(owners, "shared", "net2", 4)
    assert failover.reconcile(cfg3, owners, ALIVE3, {}, None, NOW, {}) == ([], [])


def test_an_unconfirmed_handover_is_ordered_again_as_a_handover(cfg3):
    """The record keeps the kind of move: sent again, the old owner (alive) is told to
    let go first and the new one waits for every address to fall silent, as the first
    time, not one quick probe that a still-answering old owner would fail."""
    verdict = failover.handover(cfg3, {}, "net1", ["shared"], {}, now=NOW)
    owners = {}
    failover.record_move(owners, verdict.moves[0], NOW - 10, "handover")
    assert owners["shared"]["handover"] is True
    assert failover.reconcile(cfg3, owners, ALIVE3, {}, None, NOW, {})[1] == [
        Order("relinquish", "net1", "shared", 1, owner="net2"),
        Order("takeover", "net2", "shared", 1, previous="net1", handover=True),
    ]


def test_fencing_a_second_holder_and_rebinding_a_lost_gateway(cfg3):
    owners = {"shared": {"owner": "net2", "epoch": 4, "since": NOW - 60, "confirmed": True}}
    healed = {"net1": {"shared": True}, "net2": {"shared": True}, "net3": {"shared": False}}
    assert failover.reconcile(cfg3, owners, ALIVE3, {}, healed, NOW, {})[1] == [
        Order("relinquish", "net1", "shared", 4, owner="net2")
    ]
    lost = {"net1": {"shared": False}, "net2": {"shared": False}}
    assert failover.reconcile(cfg3, owners, ALIVE3, {}, lost, NOW, {})[1] == [Order("takeover", "net2", "shared", 4)]
    # never moved, nobody holds it yet (a fresh cluster): left to the highstate
    assert failover.reconcile(cfg3, {}, ALIVE3, {}, lost, NOW, {}) == ([], [])


def test_two_appliers_at_once_keep_each_others_records(tmp_path):
    """Two takeovers of different networks on one host (the warm path of one, the job
    of the other) each read managed.json, then record what they bound: neither loses
    the other's entry, and a removal by one removes only that."""
    from _hanet.common import Managed, Paths

    paths = Paths(root_dir=str(tmp_path))
    Managed(paths).set("links", {"br100", "br100 10.0.0.1/24"})
    a, b = Managed(paths), Managed(paths)
    a.set("links", a.get("links") | {"br200 10.20.0.1/24"})
    b.set("links", b.get("links") | {"br300 10.30.0.1/24"})
    assert Managed(paths).get("links") == {"br100", "br100 10.0.0.1/24", "br200 10.20.0.1/24", "br300 10.30.0.1/24"}
    a.set("links", a.get("links") - {"br100 10.0.0.1/24"})
    assert Managed(paths).get("links") == {"br100", "br200 10.20.0.1/24", "br300 10.30.0.1/24"}
    # an applier that records twice from the set it read first (dnsmasq does, per change)
    # keeps what another process recorded in between
    c, d = Managed(paths), Managed(paths)
    names = c.get("links") | {"br400 10.40.0.1/24"}
    d.set("links", d.get("links") | {"br500 10.50.0.1/24"})  # after c read, before c writes
    c.set("links", names)
    c.set("links", names | {"br400"})
    assert {"br500 10.50.0.1/24", "br400", "br400 10.40.0.1/24"} <= Managed(paths).get("links")


def test_the_cluster_view_says_who_serves_and_whether_all_agree(cfg):
    def st(role, addrs, fips=()):
        return {
            "networks": {
                "shared": {"role": role, "addresses": addrs, "present": True},
                "private": {"role": "serving", "addresses": [], "present": True},
            },
            "floating_ips": [{"address": a, "interface": "eth0"} for a in fips],
        }

    owners = {"shared": {"owner": "net2", "epoch": 2, "confirmed": True}}
    answers = {
        "net1": st("standby", ["10.20.0.11/24"]),
        "net2": st("serving", ["10.20.0.12/24", "10.20.0.1/24"], ["203.0.113.50"]),
        "compute1": {"networks": {"private": {"present": True}}},
    }
    got = failover.cluster_status(cfg, owners, answers)
    shared = got["networks"]["shared"]
    assert (shared["owner"], shared["epoch"], shared["confirmed"], shared["agree"]) == ("net2", 2, True, True)
    assert shared["serving"] == ["net2"] and shared["standby"] == ["net1"] and shared["gateway_on"] == ["net2"]
    assert shared["unreachable"] == [] and got["floating_ips"] == {"203.0.113.50": ["net2"]}
    assert got["networks"]["private"]["unreachable"] == ["compute2"]
    assert got["problems"] == [{"network": "private", "problem": "compute2 did not answer"}]
    answers["net1"] = st("standby", ["10.20.0.11/24", "10.20.0.1/24"], ["203.0.113.50"])  # a second holder
    got = failover.cluster_status(cfg, owners, answers)
    assert not got["networks"]["shared"]["agree"]
    assert {"network": "shared", "problem": "2 hosts hold the gateway 10.20.0.1: net1, net2"} in got["problems"]
    assert {"floating_ip": "203.0.113.50", "problem": "held by 2 hosts: net1, net2"} in got["problems"]


def test_the_operators_screen_names_owner_holders_and_problems(cfg):
    def st(role, addrs, dnsmasq=True):
        return {
            "networks": {
                "shared": {"role": role, "addresses": addrs, "present": True, "dnsmasq": {"running": dnsmasq}}
            },
            "floating_ips": [],
        }

    owners = {
        "shared": {
            "owner": "net2",
            "epoch": 3,
            "confirmed": False,
            "since": 0.0,
            "reason": "net1 down (seen by compute1)",
        }
    }
    answers = {"net2": st("serving", ["10.20.0.1/24"], dnsmasq=False)}
    got = failover.cluster_status(cfg, owners, answers)
    problems = [p["problem"] for p in got["problems"] if p.get("network") == "shared"]
    assert problems == [
        "compute1 did not answer",
        "dnsmasq is not running on net2",
        "net1 did not answer",
        "no standby answered",
        "the move to net2 (epoch 3) is not confirmed yet",
    ]
    text = failover.status_table(got)
    row = next(line for line in text.splitlines() if line.startswith("shared"))
    assert row.split()[:6] == ["shared", "network", "hosts", "net2", "3", "1970-01-01"]
    assert "net1 down (seen by compute1)" in row
    assert "PROBLEMS (" in text and "network shared: dnsmasq is not running on net2" in text
    answers["net2"] = st("standby", [])  # nobody holds the gateway
    got = failover.cluster_status(cfg, owners, answers)
    assert {"network": "shared", "problem": "no host holds the gateway 10.20.0.1 (the record says net2)"} in got[
        "problems"
    ]
    got.update(record_error="etcd cannot read the record", record_backend="etcd x")
    assert "RECORD UNAVAILABLE (etcd x): etcd cannot read the record" in failover.status_table(got)


def test_clock_skew_is_a_problem_past_five_seconds(cfg):
    answers = {
        "net1": {"time": 1000.0},
        "net2": {"time": 1012.0},
        "compute1": {"time": 990.0},
        "compute2": {"time": 1001.0},
        "old": {},
    }
    skew = failover.clock_skew(answers, 1000.0, 1002.0)
    assert skew == {"net1": 0.0, "net2": 10.0, "compute1": -10.0, "compute2": 0.0}
    got = failover.cluster_status(cfg, {}, {h: {"networks": {}} for h in answers}, skew)
    clocks = [p for p in got["problems"] if "clock" in p["problem"]]
    assert clocks == [
        {
            "host": "compute1",
            "problem": "its clock is 10.0 s behind the master's: its reports go stale past 30 s (NTP)",
        },
        {"host": "net2", "problem": "its clock is 10.0 s ahead of the master's: its reports go stale past 30 s (NTP)"},
    ]


def test_a_report_after_the_decision_is_late_not_wrong(cfg):
    owners = {"shared": {"owner": "net2", "epoch": 1, "previous": "net1", "confirmed": False}}
    assert failover.at_stake(cfg, owners, "compute1", "net1") == []
    assert failover.moved_away(cfg, owners, "compute1", "net1") == ["shared"]
    assert failover.moved_away(cfg, owners, "compute2", "net1") == [], "compute2 carries no shared"
    assert failover.moved_away(cfg, owners, "compute1", "net2") == [], "net2 holds it"
    assert failover.moved_away(cfg, {}, "compute1", "net1") == []


def test_a_confirmed_move_keeps_how_long_it_took_and_its_path():
    owners = {"shared": {"owner": "net2", "epoch": 3, "since": 100.0, "confirmed": False}}
    complete = {
        "network": "shared",
        "to": "net2",
        "epoch": 3,
        "detected_at": 100.2,
        "completed_at": 100.55,
        "bound_by": "warm",
        "decision": {"via": "engine"},
        "timings": {"dhcp_s": 0.21},
    }
    assert not failover.confirm(owners, "shared", "net1", 3, complete), "not the owner"
    assert failover.confirm(owners, "shared", "net2", 3, complete)
    assert owners["shared"] == {
        "owner": "net2",
        "epoch": 3,
        "since": 100.0,
        "confirmed": True,
        "took": 0.35,
        "path": "engine/warm",
    }
    assert not failover.confirm(owners, "shared", "net2", 3, complete), "once"
    planned = dict(complete, planned=True, decision=None, bound_by="job")
    assert failover.move_summary(planned) == {"took": 0.21, "path": "planned/job"}
    assert failover.move_summary(None) == {}
    status = {
        "networks": {
            "shared": {
                "multi_host": False,
                "owner": "net2",
                "epoch": 3,
                "gateway_on": ["net2"],
                "serving": ["net2"],
                "standby": ["net1"],
            }
        },
        "record": owners,
    }
    row = next(line for line in failover.status_table(status).splitlines() if line.startswith("shared"))
    assert "0.350 s" in row and "engine/warm" in row, row


def test_an_owner_cut_off_from_its_segment_without_losing_carrier(cfg3):
    alive = {"net1": "alive", "net2": "alive", "net3": "alive"}

    def seg(state, uplink="up"):  # a peer as seen on the segment's bridge and on the uplink
        return {"br200": state, "eth0": uplink}

    links = {
        "net2": {"net1": seg("down"), "net3": seg("up")},
        "net3": {"net1": seg("down"), "net2": seg("up")},
        "compute1": {"net1": seg("down"), "net2": seg("up"), "net3": seg("up")},
    }
    # net1 still answers on its uplink (its peers see it up as a peer): cut off all the same
    assert failover.segment_cuts(cfg3, {}, alive, links) == {"shared": ("net1", "net2", 3, 3)}
    # the first standby looks cut off too to a witness: the next one
    links["compute1"]["net2"] = seg("down")
    assert failover.segment_cuts(cfg3, {}, alive, links) == {"shared": ("net1", "net3", 3, 3)}
    # only a minority sees it down (the standby's own link may be the broken one)
    few = {"net2": {"net1": seg("down")}, "net3": {"net1": seg("up")}, "compute1": {"net1": seg("up")}}
    assert failover.segment_cuts(cfg3, {}, alive, few) == {}
    # silent on the uplink only is not a segment cut
    upl = {h: {p: seg("up", "down") for p in v} for h, v in links.items()}
    assert failover.segment_cuts(cfg3, {}, alive, upl) == {}
    # one witness is not enough, a dead owner is another rule's, and a moved network's owner is asked
    assert failover.segment_cuts(cfg3, {}, alive, {"net2": {"net1": seg("down")}}) == {}
    assert failover.segment_cuts(cfg3, {}, dict(alive, net1="dead"), links) == {}
    moved = {"shared": {"owner": "net2", "epoch": 1}}
    assert failover.segment_cuts(cfg3, moved, alive, links) == {}, "net2 is not seen down"
    # the reconcile loop asks the hosts carrying a suspect's networks
    assert failover.to_ask(cfg3, {}, alive, audit=False) == set()
    assert failover.to_ask(cfg3, {}, alive, audit=False, suspects={"net1": 0}) == {"net1", "net2", "net3", "compute1"}


def test_whom_the_reconcile_loop_asks(cfg3):
    verdicts = dict(ALIVE3)
    assert failover.to_ask(cfg3, {}, verdicts, audit=False) == set()
    assert failover.to_ask(cfg3, {}, verdicts, audit=True) == {"net1", "net2", "net3"}
    verdicts["net1"] = "dead"
    assert failover.to_ask(cfg3, {}, verdicts, audit=False) == {"net2", "net3", "compute1"}, (
        "the dead owner's witnesses, not the dead"
    )
    move = Move("shared", "net1", "net2", 1)
    assert failover.still_valid(cfg3, {}, move)
    assert not failover.still_valid(cfg3, {"shared": {"owner": "net2", "epoch": 1}}, move)


def test_a_report_is_handled_once_by_one_path(tmp_path):
    with failover.Record(str(tmp_path)) as rec:
        assert rec.handle("n1", "engine", NOW) is None
        assert rec.handle("n1", "reactor", NOW + 1) == "engine", "the other path took it"
        with pytest.raises(Rejected, match="replayed"):
            rec.handle("n1", "engine", NOW + 1)
        with pytest.raises(Rejected, match="replayed"):
            rec.handle("n1", "reactor", NOW + failover.FRESH_S + 1)
        rec.record([], NOW, "nothing")
    assert not os.path.exists(tmp_path / "hanet" / "owners.json"), "no move: nothing written"
