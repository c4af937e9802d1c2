"""Rule 2's timing: the fence checks right after each verdict of the prober, and a
takeover after a report binds no earlier than the owner's fence can have silenced it."""

import threading
import time
from types import SimpleNamespace

from _hanet import fence, model, takeover


class _Prober:
    def __init__(self, misses):
        self.peers = {"net2": SimpleNamespace(misses=misses)}
        self.judged = threading.Event()


def test_the_fence_checks_at_the_verdict_not_a_period_later(monkeypatch):
    """A 1 s period: the fence reacts within milliseconds of the prober's verdict (it
    used to check on a schedule of its own, up to a period after it: rule 2's margin)."""
    monkeypatch.setattr(fence.icmp, "check", lambda targets, timeout, tries: "dead")
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


def test_the_fence_guard_is_the_icmp_check_and_the_unbind():
    assert fence.guard_s(model.Probe.of(100, 3)) == 0.025 + fence.UNBIND_S
    assert fence.guard_s(model.Probe.of(50, 3)) == 0.02 + fence.UNBIND_S


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
