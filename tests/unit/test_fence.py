"""Rule 2's timing: the fence checks right after each verdict of the prober, and a
takeover after a report binds no earlier than the owner's fence can have silenced it."""

import threading
import time
from types import SimpleNamespace

from _hanet import fence, icmp, model, takeover


class _Silent:
    """The master fell silent (icmp.Silence's view, without its socket)."""

    alive = True

    def __init__(self, targets, period):
        self.targets = targets

    def start(self):
        return self

    def stop(self):
        pass

    def silent(self, target, window, grace):
        return True


class _Prober:
    def __init__(self, misses):
        self.peers = {"net2": SimpleNamespace(misses=misses)}
        self.judged = threading.Event()


def test_the_fence_checks_at_the_verdict_not_a_period_later(monkeypatch):
    """A 1 s period: the fence reacts within milliseconds of the prober's verdict (it
    used to check on a schedule of its own, up to a period after it: rule 2's margin)."""
    monkeypatch.setattr(fence.icmp, "Silence", _Silent)
    probe = model.Probe.of(1000, 3)
    prober = _Prober(misses=2)
    fenced = threading.Event()
    f = fence.Fence(prober, probe, ["192.0.2.1"], fenced.set, route=False).start()
    try:
        time.sleep(0.05)
        t0 = time.monotonic()
        prober.judged.set()
        assert fenced.wait(0.5)
        assert time.monotonic() - t0 < 0.2
    finally:
        f.stop()


def test_the_fence_guard_is_the_unbind_and_the_master_window_fits_the_earliest_verdict():
    """The fence asks nothing at its verdict (the master is watched all along): the
    guard is the unbind alone. The master must have been silent half a period: the
    earliest verdict comes misses - 1.5 periods after the cut. With 1 miss the fence
    counts what a standby counts, and a period is added."""
    for ms, misses in ((100, 3), (50, 3), (50, 2), (200, 5), (10, 2)):
        probe = model.Probe.of(ms, misses)
        assert fence.guard_s(probe) == fence.UNBIND_S
        assert fence.master_window(probe) <= (misses - 1.5) * probe.interval_s
        # at least two echoes that had time to be answered fall in every window
        window, period = fence.master_window(probe), fence.echo_period(probe)
        assert window - period >= 2.5 * period
    assert fence.master_window(model.Probe.of(100, 3)) == 0.05
    assert fence.guard_s(model.Probe.of(100, 1)) == fence.UNBIND_S + 0.1


def test_a_master_lost_after_the_peers_is_noticed_without_waiting_for_a_verdict(monkeypatch):
    """The links fail one after the other: the peers first, the master 0.3 s later. The
    fence checks every echo period while the peers are gone, so it falls silent within
    one of the master falling silent, not at the prober's next verdict (none comes
    here)."""
    flag = threading.Event()

    class _Later(_Silent):
        def silent(self, target, window, grace):
            return flag.is_set()

    monkeypatch.setattr(fence.icmp, "Silence", _Later)
    probe = model.Probe.of(1000, 3)  # a verdict a second; echo period 0.125 s
    prober = _Prober(misses=2)
    fenced = threading.Event()
    f = fence.Fence(prober, probe, ["192.0.2.1"], fenced.set, route=False).start()
    try:
        time.sleep(0.3)
        assert not fenced.is_set()  # the master answers
        t0 = time.monotonic()
        flag.set()
        assert fenced.wait(0.5)
        assert time.monotonic() - t0 <= fence.echo_period(probe) + 0.1
    finally:
        f.stop()


class _Alive:
    def is_alive(self):
        return True


def _silence(sent, heard):
    s = icmp.Silence(["192.0.2.1"], 0.0125)
    s._thread = _Alive()
    now = time.monotonic()
    s._sent["192.0.2.1"] = [now - a for a in sent]
    s._heard["192.0.2.1"] = now - heard if heard is not None else 0.0
    return s


def test_the_master_is_silent_only_after_echoes_that_had_time_to_be_answered():
    window, grace = 0.05, 0.0125
    # echoes every quarter window, none answered for long: silent
    assert _silence([0.05, 0.0375, 0.025, 0.0125, 0.0], heard=5.0).silent("192.0.2.1", window, grace)
    # one answered 20 ms ago: not silent
    assert not _silence([0.05, 0.0375, 0.025, 0.0125, 0.0], heard=0.02).silent("192.0.2.1", window, grace)
    # the watch's thread was starved: one echo in the window, no evidence
    assert not _silence([0.5, 0.03], heard=5.0).silent("192.0.2.1", window, grace)
    # echoes too recent to have been answered yet
    assert not _silence([0.01, 0.005, 0.0], heard=5.0).silent("192.0.2.1", window, grace)
    # a target not watched
    assert not _silence([0.05, 0.025], heard=5.0).silent("192.0.2.9", window, grace)
    # a watch whose thread ended says nothing
    dead = _silence([0.05, 0.0375, 0.025, 0.0125, 0.0], heard=5.0)
    dead._thread = None
    assert not dead.silent("192.0.2.1", window, grace)


def _ctx():
    return SimpleNamespace(cfg=SimpleNamespace(ha=SimpleNamespace(probe=model.Probe.of(100, 3))))


def test_a_takeover_right_after_the_report_waits_for_the_fence():
    detected = time.time()
    t0 = time.monotonic()
    assert takeover._fence_wait(_ctx(), detected, cooperative=False) is True
    assert time.monotonic() - t0 >= fence.guard_s(model.Probe.of(100, 3)) - 0.005


def test_a_late_or_planned_takeover_does_not_wait():
    t0 = time.monotonic()
    assert takeover._fence_wait(_ctx(), time.time() - 1.0, cooperative=False) is False
    assert takeover._fence_wait(_ctx(), time.time(), cooperative=True) is False
    assert takeover._fence_wait(_ctx(), None, cooperative=False) is False
    assert time.monotonic() - t0 < 0.05
