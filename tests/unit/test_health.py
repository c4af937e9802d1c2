"""A network host's own health (``_hanet.health``) and the master's handover decision
(``_hanet.failover.handover``, and the reconcile loop's half), without Salt or a kernel."""

import pytest

from _hanet import desired, failover, health, host, model
from _hanet.failover import Move, Order, Rejected
from _hanet.health import IFF_LOWER_UP, IFF_UP, UPLINK

from test_failover_decision import NOW, pillar

UP_FLAGS = IFF_UP | IFF_LOWER_UP


# --------------------------------------------------------------------------- the tracker


def test_an_item_is_lost_after_misses_bad_checks_and_back_after_rise_good_ones():
    t = health.Tracker(misses=3, rise=2)
    assert [t.update(["a"], {"a"}, n) for n in (1, 2)] == [False, False] and t.lost == set()
    assert t.update(["a"], {"a"}, 3) and t.lost == {"a"} and t.since == 3
    assert not t.update(["a"], set(), 4), "one good check is not enough"
    assert not t.update(["a"], {"a"}, 5) and t.lost == {"a"}, "a bad one starts the count again"
    assert not t.update(["a"], set(), 6)
    assert t.update(["a"], set(), 7) and t.lost == set() and t.since == 7


def test_a_certain_failure_is_lost_at_once():
    t = health.Tracker(misses=3, rise=2)
    assert t.update(["a", "b"], {"a", "b"}, 1, certain={"a"}) and t.lost == {"a"}


def test_a_flap_shorter_than_misses_is_never_lost():
    t = health.Tracker(misses=3, rise=3)
    for n in range(30):
        assert not t.update(["a"], {"a"} if n % 3 != 2 else set(), n)
    assert t.lost == set() and t.since == 0


def test_a_lost_uplink_loses_every_network():
    assert health.networks_lost({UPLINK}, ["b", "a"]) == ["a", "b"]
    assert health.networks_lost({"a"}, ["a", "b"]) == ["a"]
    assert health.networks_lost(set(), ["a"]) == []


# --------------------------------------------------------------------------- the checks


class Probe:
    misses, rise, interval_s = 2, 2, 0.1


def watcher(known=None):
    got = []
    h = health.Health(
        "eth0", {"shared": "eth3", "other": ""}, Probe, lambda lost, at: got.append(lost), known=known, next_hop=False
    )
    return h, got


LINKS = {"eth0": UP_FLAGS, "eth3": UP_FLAGS}


@pytest.mark.parametrize(
    "links,hop_ok,lost",
    [
        (LINKS, True, []),
        (LINKS, None, []),  # no next hop / no verdict: no evidence
        (dict(LINKS, eth0=IFF_UP), True, ["other", "shared"]),  # no carrier on the uplink
        (dict(LINKS, eth0=IFF_LOWER_UP), True, ["other", "shared"]),  # administratively down
        (LINKS, False, ["other", "shared"]),  # the next hop does not answer
        (dict(LINKS, eth3=IFF_UP), True, ["shared"]),  # the segment link of one network
        ({"eth0": UP_FLAGS}, True, ["shared"]),  # a link that is gone
    ],
)
def test_what_each_failure_loses(links, hop_ok, lost):
    h, got = watcher()
    for n in range(3):
        h.check(links, hop_ok, now=NOW + n)
    assert got == ([lost] if lost else [])
    assert h.tracker.since in ((NOW + 1 if hop_ok is False else NOW) if lost else 0,)
    assert h.snapshot()["lost"] == lost


def test_a_restarted_watch_reports_only_a_change_from_its_last_report():
    h, got = watcher(known=["shared"])
    bad = dict(LINKS, eth3=IFF_UP)
    for n in range(4):
        h.check(bad, True, now=NOW + n)
    assert got == [], "still lost, as last reported: nothing new"
    h, got = watcher(known=["shared"])
    h.check(LINKS, True, now=NOW)
    assert got == [], "too early after a start for a verdict"
    h.check(LINKS, True, now=NOW + 1)
    assert got == [[]], "healthy again: reported"


def test_the_host_state_names_what_a_network_host_watches_of_itself():
    cfg = model.load(pillar())
    st = desired.compute(cfg, "net1")
    assert st.health_uplink == "eth0" and st.health_segments == (("shared", "eth1"),)
    cfg_items = dict(kv for item in host.beacon_config(st) for kv in item.items())
    assert cfg_items["health"] == {"uplink": "eth0", "segments": {"shared": "eth1"}}
    assert desired.compute(cfg, "compute1").health_segments == ()


# --------------------------------------------------------------------------- reports


def test_a_health_report_parses_and_its_networks_are_signed(tmp_path):
    import salt.crypt

    data = failover.health_report("net1", ["shared"], NOW)
    tag = failover.liveness_tag("net1", "net1", data["state"])
    assert tag == "salt/beacon/net1/hanet_liveness/net1/impaired"
    got = failover.parse_report(tag, data, NOW)
    assert got.state == failover.IMPAIRED and got.lost == ("shared",)
    healthy = failover.health_report("net1", [], NOW)
    assert failover.parse_report(failover.liveness_tag("net1", "net1", "healthy"), healthy, NOW).lost == ()
    priv, pub = salt.crypt.gen_keys(2048)
    (tmp_path / "k.pem").write_text(priv)
    (tmp_path / "k.pub").write_text(pub)
    signed = failover.sign(salt.crypt.PrivateKey.from_file(str(tmp_path / "k.pem")), data)
    assert failover.verify(str(tmp_path / "k.pub"), signed) is None
    assert failover.verify(str(tmp_path / "k.pub"), dict(signed, lost=["other"])) == "bad signature"


@pytest.mark.parametrize(
    "mutate",
    [
        lambda t, d: (t.replace("net1/impaired", "net2/impaired"), dict(d, peer="net2")),  # about another
        lambda t, d: (t, dict(d, lost="shared")),
        lambda t, d: (t, dict(d, lost=[])),  # impaired with nothing lost
        lambda t, d: (t.replace("impaired", "healthy"), dict(d, state="healthy")),  # healthy, lost
    ],
)
def test_a_malformed_health_report_is_rejected(mutate):
    data = failover.health_report("net1", ["shared"], NOW)
    tag, data = mutate(failover.liveness_tag("net1", "net1", "impaired"), data)
    with pytest.raises(Rejected):
        failover.parse_report(tag, data, NOW)


def test_a_report_from_a_clock_far_off_says_so():
    data = failover.report("net2", "net1", failover.DOWN, NOW + 60)
    with pytest.raises(Rejected) as err:
        failover.parse_report(failover.liveness_tag("net2", "net1", "down"), data, NOW)
    assert "in the future" in err.value.reason and "clock" in err.value.reason


# --------------------------------------------------------------------------- the handover


@pytest.fixture
def cfg3():
    return model.load(pillar(hosts=("net1", "net2", "net3")))


def test_an_owner_that_cannot_serve_hands_over_to_the_first_standby_that_can(cfg3):
    v = failover.handover(cfg3, {}, "net1", ["shared"], {}, now=NOW)
    assert v.moves == [Move("shared", "net1", "net2", 1, handover=True)] and v.rejected == []
    hl = {"net2": {"lost": ["shared"], "since": NOW - 100}}
    assert failover.handover(cfg3, {}, "net1", ["shared"], hl, now=NOW).moves == [
        Move("shared", "net1", "net3", 1, handover=True)
    ], "net2 lost it too"
    assert failover.handover(cfg3, {}, "net1", ["shared"], {}, dead={"net2"}, now=NOW).moves == [
        Move("shared", "net1", "net3", 1, handover=True)
    ], "net2 is dead"


def test_when_no_standby_can_serve_the_owner_keeps_the_network(cfg3):
    hl = {"net2": {"lost": ["shared"], "since": NOW - 100}, "net3": {"lost": [], "since": NOW - 1}}
    v = failover.handover(cfg3, {}, "net1", ["shared"], hl, now=NOW)
    assert v.moves == [] and v.rejected and "net1 keeps it" in v.rejected[0][1]


def test_a_flapping_standby_is_not_trusted_until_it_held_still_for_the_dwell_time(cfg3):
    hl = {
        "net2": {"lost": [], "since": NOW - failover.DWELL_S + 1},
        "net3": {"lost": [], "since": NOW - failover.DWELL_S - 1},
    }
    assert failover.handover(cfg3, {}, "net1", ["shared"], hl, now=NOW).moves[0].new == "net3"


def test_only_an_owner_hands_over(cfg3):
    owners = {"shared": {"owner": "net2", "epoch": 4}}
    assert failover.handover(cfg3, owners, "net1", ["shared"], {}, now=NOW).moves == []
    assert failover.handover(cfg3, owners, "net2", ["shared", "private", "nope"], {}, now=NOW).moves == [
        Move("shared", "net2", "net1", 5, handover=True)
    ]


def test_the_old_owner_lets_go_before_the_new_one_binds():
    assert failover.handover_orders(Move("shared", "net1", "net2", 5)) == [
        Order("relinquish", "net1", "shared", 5, owner="net2"),
        Order("takeover", "net2", "shared", 5, previous="net1", handover=True),
    ]


ALIVE3 = {"net1": "alive", "net2": "alive", "net3": "alive"}


def test_reconcile_hands_over_when_the_report_was_lost(cfg3):
    owners = {"shared": {"owner": "net1", "epoch": 2, "since": NOW - 60, "confirmed": True}}
    hl = {"net1": {"lost": ["shared"], "since": NOW - 1}}
    moves, orders = failover.reconcile(cfg3, owners, ALIVE3, {}, None, NOW, {}, health=hl)
    assert moves == [Move("shared", "net1", "net2", 3, handover=True)]
    assert orders == failover.handover_orders(moves[0])
    hl.update(net2={"lost": ["shared"], "since": NOW - 60}, net3={"lost": ["shared"], "since": NOW - 60})
    assert failover.reconcile(cfg3, owners, ALIVE3, {}, None, NOW, {}, health=hl) == ([], []), (
        "nobody else can serve it: no move"
    )


# --------------------------------------------------------------------------- DAD on apply


def test_an_apply_adds_a_moving_gateway_last_and_only_when_nobody_answers(monkeypatch):
    from _hanet import arp, links
    from _hanet.common import Change

    applied, probed = [], []
    monkeypatch.setattr(links, "apply", lambda changes, managed: applied.extend(changes) or [str(c) for c in changes])
    answers = {"10.20.0.1": "02:00:00:00:00:09", "10.30.0.1": None}
    monkeypatch.setattr(arp, "probe", lambda ip, link, timeout, tries: probed.append(ip) or answers[ip])
    gw = Change("links", "add", "br200 10.20.0.1/24", {"link": "br200", "address": "10.20.0.1/24"})
    own = Change("links", "add", "br200 10.20.0.2/24", {"link": "br200", "address": "10.20.0.2/24"})
    free = Change("links", "add", "br300 10.30.0.1/24", {"link": "br300", "address": "10.30.0.1/24"})
    create = Change("links", "create", "br200", {})
    guarded = {("br200", "10.20.0.1/24"), ("br300", "10.30.0.1/24")}
    with pytest.raises(RuntimeError) as err:
        host.apply_links([create, gw, own, free], guarded, None)
    assert "10.20.0.1 on br200 is answered by 02:00:00:00:00:09" in str(err.value)
    assert applied == [create, own, free], "the others first; the held gateway never"
    assert probed == ["10.20.0.1", "10.30.0.1"]


def test_an_apply_announces_the_gateways_it_binds_when_send_arp_for_ha(monkeypatch):
    """nova's send_arp_for_ha on a plain apply: a moving gateway bound after DAD is
    announced with send_arp_for_ha_count rounds; nothing is announced when it is off."""
    from _hanet import arp, links
    from _hanet.common import Change

    monkeypatch.setattr(links, "apply", lambda changes, managed: [str(c) for c in changes])
    monkeypatch.setattr(arp, "probe", lambda ip, link, timeout, tries: None)
    sent = []
    monkeypatch.setattr(arp, "garp_many", lambda pairs, count: sent.append((list(pairs), count)) or 0)
    gw = Change("links", "add", "br200 10.20.0.1/24", {"link": "br200", "address": "10.20.0.1/24"})
    own = Change("links", "add", "br200 10.20.0.2/24", {"link": "br200", "address": "10.20.0.2/24"})
    guarded = {("br200", "10.20.0.1/24")}
    done = host.apply_links([gw, own], guarded, None, garp_count=3)
    assert sent == [([("10.20.0.1", "br200")], 3)], "the moving gateway only, not the host's own address"
    assert "announced 10.20.0.1 on br200 (3 gratuitous ARP rounds)" in done
    sent.clear()
    host.apply_links([gw, own], guarded, None, garp_count=0)
    assert sent == []
