"""The ARP prober against a real peer namespace: down after `misses` silent periods,
up only after `rise` answered ones, a transition reported once."""

import os
import subprocess
import threading
import time

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")


def sh(*args):
    subprocess.run(args, check=True, capture_output=True)


def test_prober_sees_a_peer_go_down_and_come_back(ns_pair):
    a, b = ns_pair
    from pyroute2 import netns

    from _hanet.liveness import DOWN, UP, Prober
    from _hanet.model import Probe

    events = []
    cond = threading.Condition()

    def on_change(peer, state, at, initial):
        with cond:
            events.append((peer, state, initial, time.monotonic()))
            cond.notify_all()

    def wait_for(n, timeout=5):
        with cond:
            assert cond.wait_for(lambda: len(events) >= n, timeout), events

    netns.pushns(a)
    try:
        prober = Prober({"b": [("eth0", "10.9.0.2")]}, on_change, Probe(interval_ms=50, misses=3, rise=4)).start()
    finally:
        netns.popns()
    try:
        wait_for(1)
        assert events[0][:3] == ("b", UP, True)
        t0 = time.monotonic()
        sh("ip", "-n", b, "link", "set", "eth0", "down")
        wait_for(2)
        assert events[1][:3] == ("b", DOWN, False)
        # three missed periods of 50 ms, plus at most one period of phase
        assert events[1][3] - t0 < 1.0
        sh("ip", "-n", b, "link", "set", "eth0", "up")
        wait_for(3)
        assert events[2][:3] == ("b", UP, False)
        time.sleep(0.3)
        assert len(events) == 3, "one report per transition"
        assert prober.view()["b"]["state"] == UP
    finally:
        prober.stop()
    assert not prober.alive


def test_master_watch_vouches_for_a_live_host_and_gives_up_on_a_dead_one(ns_pair):
    """The master's continuous ICMP watch (the engine's second opinion): alive while the
    host answers, dead after `dead_after` silent rounds, alive again when it answers."""
    a, b = ns_pair
    from pyroute2 import netns

    from _hanet import icmp

    def wait_verdict(watch, host, want, timeout=3):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if watch.verdict(host) == want:
                return True
            time.sleep(0.01)
        return False

    netns.pushns(a)
    try:
        watch = icmp.Watch(interval=0.03, dead_after=3)
        watch.watch({"b": ["10.9.0.2"], "nobody": ["10.9.0.77"]})
        assert watch.verdict("b") is None, "no verdict before the watch runs"
        watch.start()
    finally:
        netns.popns()
    try:
        assert wait_verdict(watch, "b", "alive")
        assert wait_verdict(watch, "nobody", "dead"), "an address nobody holds never vouches"
        sh("ip", "-n", b, "link", "set", "eth0", "down")
        t0 = time.monotonic()
        assert wait_verdict(watch, "b", "dead")
        assert time.monotonic() - t0 >= 0.06, "dead only after several silent rounds"
        sh("ip", "-n", b, "link", "set", "eth0", "up")
        assert wait_verdict(watch, "b", "alive")
        assert watch.verdict("unknown-host") is None
    finally:
        watch.stop()
    assert watch.verdict("b") is None, "a stopped watch gives no verdict"


def test_a_one_shot_check_says_alive_dead_or_no_verdict(ns_pair):
    """The runner's second opinion without the engine's watch: "alive" when the host
    answers, "dead" when nobody does, and None (never "dead") when nothing can be
    asked."""
    a, b = ns_pair
    from pyroute2 import netns

    from _hanet import icmp

    netns.pushns(a)
    try:
        assert icmp.check(["10.9.0.2"]) == "alive"
        assert icmp.check(["10.9.0.77"], timeout=0.1) == "dead"
        assert icmp.check([]) is None, "no address to ask: no verdict"
        assert icmp.check(["192.0.2.200"]) is None, "no route: nothing was asked"
    finally:
        netns.popns()


def test_a_reply_from_another_mac_does_not_keep_the_peer_alive(ns_pair):
    """Proxy ARP, or another device answering for the peer's address: the peer is down
    all the same. (Here the peer's own link takes a new MAC: the address still
    answers, from a MAC the prober has not learnt for it.)"""
    a, b = ns_pair
    from pyroute2 import netns

    from _hanet.liveness import DOWN, UP, Prober
    from _hanet.model import Probe

    events = []
    cond = threading.Condition()

    def on_change(peer, state, at, initial):
        with cond:
            events.append((peer, state))
            cond.notify_all()

    netns.pushns(a)
    try:
        prober = Prober({"b": [("eth0", "10.9.0.2")]}, on_change, Probe(interval_ms=50, misses=3, rise=3)).start()
    finally:
        netns.popns()
    try:
        with cond:
            assert cond.wait_for(lambda: events == [("b", UP)], 5), events
        sh("ip", "-n", b, "link", "set", "eth0", "address", "02:00:00:00:99:99")
        with cond:
            assert cond.wait_for(lambda: len(events) >= 2, 5), events
        assert events[1] == ("b", DOWN)
        time.sleep(0.5)
        assert len(events) == 2, "the other MAC never brings it back"
        out = subprocess.run(
            ["ip", "netns", "exec", a, "arping", "-c", "1", "-w", "2", "-I", "eth0", "10.9.0.2"],
            capture_output=True,
            text=True,
        ).stdout
        assert "02:00:00:00:99:99" in out.lower(), "the address itself still answers (from the new MAC)"
    finally:
        prober.stop()


@pytest.mark.parametrize("rebooted", [False, True], ids=["link rebuilt", "host rebooted"])
def test_a_new_mac_is_learnt_when_the_peer_answers_on_its_other_link(ns_pair, rebooted):
    """The peer answers on two links; one of them takes a new MAC (a bridge on a VXLAN
    segment, rebuilt by the peer's apply or its reboot). Its other link still answers
    from the MAC the prober knows: the host is there, so the new MAC is its own and the
    link is up again (without it, the peer looked cut off from that segment for good,
    and the master moved the network away after every reboot)."""
    a, b = ns_pair
    from pyroute2 import netns

    from _hanet.liveness import DOWN, UP, Prober
    from _hanet.model import Probe

    sh("ip", "-n", a, "link", "add", "eth1", "type", "veth", "peer", "name", "eth1", "netns", b)
    for ns, addr in ((a, "10.9.1.1/24"), (b, "10.9.1.2/24")):
        sh("ip", "-n", ns, "addr", "add", addr, "dev", "eth1")
        sh("ip", "-n", ns, "link", "set", "eth1", "up")
    events = []
    cond = threading.Condition()

    def on_change(peer, state, at, initial):
        with cond:
            events.append((peer, state))
            cond.notify_all()

    targets = [("eth0", "10.9.0.2"), ("eth1", "10.9.1.2")]
    netns.pushns(a)
    try:
        prober = Prober({"b": targets}, on_change, Probe(interval_ms=50, misses=3, rise=3)).start()
    finally:
        netns.popns()
    try:
        with cond:
            assert cond.wait_for(lambda: events == [("b", UP)], 5), events
        if rebooted:
            for link in ("eth0", "eth1"):
                sh("ip", "-n", b, "link", "set", link, "down")
            with cond:
                assert cond.wait_for(lambda: events[-1:] == [("b", DOWN)], 5), events
        sh("ip", "-n", b, "link", "set", "eth1", "address", "02:00:00:00:99:98")
        changed = time.time()
        if rebooted:
            for link in ("eth0", "eth1"):
                sh("ip", "-n", b, "link", "set", link, "up")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not (prober.view()["b"]["seen"]["eth1:10.9.1.2"] or 0) > changed + 0.2:
            time.sleep(0.05)
        seen = prober.view()["b"]["seen"]
        assert (seen["eth1:10.9.1.2"] or 0) > changed + 0.2, f"eth1 answers from its new MAC, never counted: {seen}"
        assert events == ([("b", UP), ("b", DOWN), ("b", UP)] if rebooted else [("b", UP)]), events
    finally:
        prober.stop()


@pytest.mark.parametrize("reachable", [False, True])
def test_an_isolated_owner_fences_itself_and_only_then(ns_pair, reachable):
    """Rule 2: every peer silent and the master silent too: fence, once. With
    the master still answering (here: the host's own loopback stands for it), never."""
    a, b = ns_pair
    from pyroute2 import netns

    from _hanet.fence import Fence
    from _hanet.liveness import Prober
    from _hanet.model import Probe

    fenced = []
    probe = Probe(interval_ms=50, misses=3, rise=3)
    netns.pushns(a)
    try:
        prober = Prober({"b": [("eth0", "10.9.0.2")]}, lambda *x: None, probe).start()
        fence = Fence(
            prober,
            probe,
            ["127.0.0.1" if reachable else "10.9.0.2"],
            lambda: fenced.append(time.monotonic()),
            route=False,
        ).start()
    finally:
        netns.popns()
    try:
        time.sleep(0.5)
        assert fenced == [], "not while the peer answers"
        t0 = time.monotonic()
        sh("ip", "-n", b, "link", "set", "eth0", "down")
        time.sleep(1.0)
        if reachable:
            assert fenced == [], "the master still answers: keep serving"
        else:
            assert len(fenced) == 1 and fenced[0] > t0, "fenced once, after the peer went"
        sh("ip", "-n", b, "link", "set", "eth0", "up")
        time.sleep(0.5)
        assert len(fenced) == (0 if reachable else 1), "a peer back: no new fence"
    finally:
        fence.stop()
        prober.stop()
