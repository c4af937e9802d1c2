"""The supervisor's restart policy (pure: its view of the daemons and the restarts are
stand-ins); the daemons themselves are restarted for real in
tests/integration/test_dhcp_real.py and test_open_connections.py."""

import time

from _hanet import supervise


def test_backoff_grows_for_a_daemon_that_keeps_dying():
    assert supervise.backoff(1) == 0.0  # the first restart: at once
    assert [supervise.backoff(n) for n in (2, 3, 4)] == [0.5, 1.0, 2.0]
    assert supervise.backoff(50) == supervise.BACKOFF_MAX_S


def test_a_crash_loop_is_restarted_at_once_then_after_a_delay(monkeypatch):
    state = {"pid": 100}
    started = []

    def revive(paths, name):
        state["pid"] += 1
        started.append(time.monotonic())
        return state["pid"]

    monkeypatch.setattr(supervise, "running", lambda paths: {("conntrackd", "conntrackd"): state["pid"] or None})
    monkeypatch.setitem(supervise.REVIVE, "conntrackd", revive)
    sup = supervise.Supervisor(None, lambda *a: None)
    assert sup.check() == []  # seen running
    state["pid"] = 0  # it died
    assert [r[:2] for r in sup.check()] == [("conntrackd", "conntrackd")]  # at once
    state["pid"] = 0  # and died again at once
    assert sup.check() == []  # the second restart waits (backoff)
    time.sleep(supervise.BACKOFF_S + 0.05)
    assert len(sup.check()) == 1
    assert len(started) == 2


def test_a_daemon_stopped_on_purpose_and_started_again_owes_no_backoff(monkeypatch):
    """dnsmasq crash-looped, then its network was given up (its record gone) and taken
    over again: the new dnsmasq dying is restarted at once, not after the old backoff."""
    state = {"pid": 100, "record": True}
    monkeypatch.setattr(
        supervise, "running", lambda paths: {("dnsmasq", "shared"): state["pid"] or None} if state["record"] else {}
    )

    def revive(paths, name):
        state["pid"] += 1
        return state["pid"]

    monkeypatch.setitem(supervise.REVIVE, "dnsmasq", revive)
    sup = supervise.Supervisor(None, lambda *a: None)
    sup.check()
    for _ in range(2):  # died twice: the next restart would wait
        state["pid"] = 0
        sup.check()
        time.sleep(supervise.BACKOFF_S + 0.05)
    state["pid"] = 0
    assert sup.check() == []  # in backoff
    state["record"] = False  # relinquished: stopped on purpose
    assert sup.check() == []
    state.update(record=True, pid=500)  # taken over again: a new dnsmasq
    assert sup.check() == []
    state["pid"] = 0
    assert [r[:2] for r in sup.check()] == [("dnsmasq", "shared")]
