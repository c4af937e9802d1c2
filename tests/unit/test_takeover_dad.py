"""Duplicate address detection before a takeover binds (takeover._dad), with the ARP
probe replaced by a script: which answers stop a takeover, which are waited out."""

import time
from types import SimpleNamespace

import pytest

from _hanet import arp, takeover

NET = SimpleNamespace(
    gateway="10.20.0.1", service_address="10.20.0.1", dhcp_server=None, bridge="br200", label="shared"
)
MOVING = [("10.20.0.1", "br200"), ("203.0.113.60", "eth0"), ("203.0.113.61", "eth0")]


def script(monkeypatch, answers):
    """Each probe_many call returns the next of ``answers`` ({ip: mac}), restricted to
    what was asked; records what was asked."""
    asked = []

    def probe_many(pairs, timeout=0, tries=1):
        asked.append(sorted(ip for ip, _ in pairs))
        got = answers[min(len(asked), len(answers)) - 1]
        return {ip: mac for ip, mac in got.items() if ip in dict(pairs)}

    monkeypatch.setattr(arp, "probe_many", probe_many)
    return asked


def marks():
    got = []
    return got, got.append


def test_nothing_answers_one_probe_for_everything(monkeypatch):
    asked = script(monkeypatch, [{}])
    got, mark = marks()
    takeover._dad(NET, False, None, mark, MOVING)
    assert asked == [["10.20.0.1", "203.0.113.60", "203.0.113.61"]] and got == ["dad"]


def test_what_the_beacon_found_silent_a_moment_ago_is_not_asked_again(monkeypatch):
    asked = script(monkeypatch, [{}])
    now = time.time()
    pre = {"10.20.0.1": [now, None], "203.0.113.60": [now, None], "203.0.113.61": [now - 5, None]}
    takeover._dad(NET, False, pre, marks()[1], MOVING)
    assert asked == [["203.0.113.61"]]  # its precheck is too old


def test_a_gateway_answered_on_the_segment_stops_the_takeover_at_once(monkeypatch):
    asked = script(monkeypatch, [{"10.20.0.1": "02:00:00:00:00:01"}])
    with pytest.raises(RuntimeError, match="gateway 10.20.0.1 is still answered by 02:00:00:00:00:01"):
        takeover._dad(NET, False, None, marks()[1], MOVING)
    assert len(asked) == 1


def test_a_floating_ip_still_answered_on_the_uplink_is_waited_out(monkeypatch):
    """The old owner lost the segment, not its uplink: it falls silent when it finds
    itself cut off; nothing is bound before."""
    asked = script(monkeypatch, [{"203.0.113.60": "02:00:00:00:00:01"}] * 3 + [{}])
    got, mark = marks()
    takeover._dad(NET, False, None, mark, MOVING)
    assert asked[1:] == [["203.0.113.60"]] * 3 and got == ["dad"]


def test_a_floating_ip_answered_for_too_long_is_not_bound(monkeypatch):
    monkeypatch.setattr(takeover, "HANDOVER_WAIT_S", 0.05)
    script(monkeypatch, [{"203.0.113.61": "02:00:00:00:00:01"}])
    with pytest.raises(RuntimeError, match="203.0.113.61 is still answered by 02:00:00:00:00:01 on eth0"):
        takeover._dad(NET, False, None, marks()[1], MOVING)


def test_a_handover_waits_for_the_gateway_too(monkeypatch):
    asked = script(monkeypatch, [{"10.20.0.1": "02:00:00:00:00:01"}, {}])
    takeover._dad(NET, False, None, marks()[1], MOVING, handover=True)
    assert asked == [["10.20.0.1", "203.0.113.60", "203.0.113.61"], ["10.20.0.1"]]


def test_a_planned_move_waits_for_the_old_owner_to_let_go(monkeypatch):
    asked = script(monkeypatch, [{"10.20.0.1": "x"}, {}])
    takeover._dad(NET, True, None, marks()[1], MOVING, handover=True)
    assert asked == [["10.20.0.1", "203.0.113.60", "203.0.113.61"], ["10.20.0.1"]]


def test_an_old_style_planned_order_probes_nothing(monkeypatch):
    asked = script(monkeypatch, [{"10.20.0.1": "x"}])
    takeover._dad(NET, True, None, marks()[1], MOVING)
    assert asked == []


def test_the_hand_built_announcements_are_scapys_byte_for_byte():
    mac = "02:11:22:33:44:55"
    want = [bytes(f) for f in arp.garp_frames("203.0.113.60", mac)]
    assert arp.garp_bytes("203.0.113.60", bytes.fromhex(mac.replace(":", ""))) == want


# --------------------------------------------------------------------------- the repeats


def repeats_ctx(tmp_path, monkeypatch):
    """A context with a real run/state directory, GARPs recorded instead of sent."""
    from _hanet.common import Paths

    paths = Paths(root_dir=str(tmp_path))
    paths.ensure()
    sent = []
    monkeypatch.setattr(
        takeover, "_garp", lambda ctx, pairs, count, frames_of: sent.append((list(pairs), count, frames_of)) or 0
    )
    return SimpleNamespace(paths=paths, me="net2"), sent


def test_the_repeats_go_while_this_host_owns_the_network_at_that_epoch(tmp_path, monkeypatch):
    ctx, sent = repeats_ctx(tmp_path, monkeypatch)
    takeover.write_local_owner(ctx.paths, "shared", "net2", 4)
    takeover.repeat_announcement(ctx, "shared", 4, MOVING, 2)
    # the first round's replies (its requests went at the binding), then two full rounds
    assert sent == [(MOVING, 1, (1,)), (MOVING, 1, (0, 1)), (MOVING, 1, (0, 1))]


@pytest.mark.parametrize(
    "after_first",
    [
        lambda paths: takeover.write_local_owner(paths, "shared", "net1", 5),  # relinquished to net1
        lambda paths: takeover.write_local_owner(paths, "shared", "net2", 5),  # a newer order: its own
        lambda paths: takeover._set_fenced(paths, lambda rec: rec.update({"shared": 4})),  # fenced
    ],
    ids=["relinquished", "newer-epoch", "fenced"],
)
def test_the_repeats_stop_once_the_host_let_go(tmp_path, monkeypatch, after_first):
    """No frame announces an address after a relinquish, a newer takeover or a fence."""
    ctx, sent = repeats_ctx(tmp_path, monkeypatch)
    takeover.write_local_owner(ctx.paths, "shared", "net2", 4)
    real = takeover._garp

    def garp_then_let_go(c, pairs, count, frames_of):
        real(c, pairs, count, frames_of)
        after_first(ctx.paths)

    monkeypatch.setattr(takeover, "_garp", garp_then_let_go)
    takeover.repeat_announcement(ctx, "shared", 4, MOVING, 3)
    assert len(sent) == 1


def test_a_large_announcement_s_rounds_are_as_far_apart_as_the_bucket_needs(tmp_path, monkeypatch):
    ctx, _sent = repeats_ctx(tmp_path, monkeypatch)
    takeover.write_local_owner(ctx.paths, "shared", "net2", 4)
    slept = []
    monkeypatch.setattr(takeover.time, "sleep", slept.append)
    many = [(f"198.18.0.{i}", "eth0") for i in range(2, 202)] + [("10.20.0.1", "br200")]
    takeover.repeat_announcement(ctx, "shared", 4, many, 2)
    assert slept == [arp.GARP_BURST / arp.GARP_PPS] * 3  # 400 frames on eth0: a full bucket
    slept.clear()
    takeover.repeat_announcement(ctx, "shared", 4, MOVING, 1)
    assert slept == [arp.GARP_INTERVAL] * 2


def test_a_failed_repeat_is_logged_and_the_takeover_still_returns(tmp_path, monkeypatch, caplog):
    ctx, _sent = repeats_ctx(tmp_path, monkeypatch)
    monkeypatch.setattr(takeover, "_run", lambda *a, repeats, **kw: repeats.append((MOVING, 2)) or {"ok": 1})

    def boom(*a, **kw):
        raise OSError(100, "Network is down")

    monkeypatch.setattr(takeover, "repeat_announcement", boom)
    assert takeover.run(ctx, "shared", 4) == {"ok": 1}
    assert "the announcement's repeats failed" in caplog.text


def test_a_malformed_stamp_is_left_out_not_a_failed_takeover():
    """heard_at comes from the beacon (or a hand-made order): a stamp that is no
    (name, time) is dropped with a warning; the takeover goes on."""
    assert takeover.stamps(1000.5) == [("heard", 1000.5)]
    assert takeover.stamps([["thread", 1.0], ["looked_up", "2.5"], "junk", ["x"], ["y", None]]) == [
        ("thread", 1.0),
        ("looked_up", 2.5),
    ]
    assert takeover.stamps("soon") == []
