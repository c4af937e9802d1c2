"""Rule 2's timing: the fence checks right after each verdict of the prober, and a
takeover after a report binds no earlier than the owner's fence can have silenced it."""

import threading
import time
from types import SimpleNamespace

from _hanet import fence, icmp, model, takeover


class _Silent:
    """The master fell silent (icmp.Silence's view, without its socket)."""

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
    guard is the unbind alone. The master must have been silent a period (half of one
    with 2 misses): the earliest verdict comes misses - 1.5 periods after the cut."""
    for ms, misses in ((100, 3), (50, 3), (50, 2), (200, 5)):
        probe = model.Probe.of(ms, misses)
        assert fence.guard_s(probe) == fence.UNBIND_S
        assert fence.master_window(probe) <= (misses - 1.5) * probe.interval_s
        assert fence.master_window(probe) >= 2 * fence.echo_period(probe)  # several echoes unanswered
    assert fence.master_window(model.Probe.of(100, 3)) == 0.1


class _Alive:
    def is_alive(self):
        return True


def _silence(sent, heard):
    s = icmp.Silence(["192.0.2.1"], 0.025)
    s._thread = _Alive()
    now = time.monotonic()
    s._sent["192.0.2.1"] = [now - a for a in sent]
    s._heard["192.0.2.1"] = now - heard if heard is not None else 0.0
    return s


def test_the_master_is_silent_only_after_echoes_that_had_time_to_be_answered():
    window, grace = 0.1, 0.025
    # echoes every quarter period, none answered for long: silent
    assert _silence([0.1, 0.075, 0.05, 0.025, 0.0], heard=5.0).silent("192.0.2.1", window, grace)
    # one answered 20 ms ago: not silent
    assert not _silence([0.1, 0.075, 0.05, 0.025, 0.0], heard=0.02).silent("192.0.2.1", window, grace)
    # the watch's thread was starved: one echo in the window, no evidence
    assert not _silence([0.5, 0.05], heard=5.0).silent("192.0.2.1", window, grace)
    # echoes too recent to have been answered yet
    assert not _silence([0.02, 0.01, 0.0], heard=5.0).silent("192.0.2.1", window, grace)
    # a target not watched
    assert not _silence([0.1, 0.05], heard=5.0).silent("192.0.2.9", window, grace)


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
