"""Gratuitous ARP pacing: the schedule (pure), and a large announcement on a real veth in
a network namespace, received and timed on the other end."""

import contextlib
import os
import select
import shutil
import socket
import threading
import time

import kernel_ns
import pytest

from _hanet import arp

needs_root = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"), reason="needs root (network namespaces)")


@contextlib.contextmanager
def veth_pair():
    """A veth pair ga <-> gb in a fresh namespace, this thread inside it: yields a packet
    socket receiving the ARP frames that arrive on gb."""
    with kernel_ns.fresh("hg") as ns:
        kernel_ns.sh("ip", "-n", ns, "link", "add", "ga", "type", "veth", "peer", "name", "gb")
        kernel_ns.sh("ip", "-n", ns, "link", "set", "ga", "up")
        kernel_ns.sh("ip", "-n", ns, "link", "set", "gb", "up")
        with kernel_ns.inside(ns):
            rx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
            try:
                rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
                rx.bind(("gb", 0x0806))
                yield rx
            finally:
                rx.close()


def test_a_small_announcement_is_not_paced():
    """A gateway and a few floating IPs: every frame of a round at once, rounds 20 ms apart."""
    got = arp.garp_schedule({"eth0": 8, "br200": 2}, rounds=3, interval=0.02)
    assert len(got) == 30
    assert {at for at, _, _ in got} == {0.0, 0.02, 0.04}
    assert [i for at, iface, i in got if iface == "eth0" and at == 0.0] == list(range(8))


def test_a_large_announcement_is_paced_per_interface_after_the_burst():
    burst, pps = 256, 2000
    got = arp.garp_schedule({"eth0": 2000, "eth1": 300}, rounds=2, interval=0.02, burst=burst, pps=pps)
    for iface, per_round in (("eth0", 2000), ("eth1", 300)):
        times = [at for at, i_, _ in got if i_ == iface]
        assert len(times) == 2 * per_round
        # never more than the bucket allows: by time t, at most burst + pps * t frames
        for k, at in enumerate(times):
            assert k + 1 <= burst + pps * at + 1e-9, (iface, k, at)
        assert times[burst - 1] == 0.0
    eth0 = [(at, i) for at, iface, i in got if iface == "eth0"]
    # the first frame of every address (the first 1,000 of a round) goes before the rest:
    # the last first-announcement at (1000 - 256) / 2000 s
    firsts = [at for at, i in eth0[:2000] if i < 1000]
    assert max(firsts) == pytest.approx((1000 - burst) / pps)
    # round 2 starts at least `interval` after round 1's last frame, on every interface
    end1 = max(at for at, i in eth0[:2000])
    assert min(at for at, i in eth0[2000:]) >= end1 + 0.02 - 1e-9
    assert got == sorted(got, key=lambda x: x[0])


@needs_root
def test_a_thousand_addresses_are_announced_paced_on_the_wire():
    """1,000 floating IPs, one round: 2,000 frames leave a veth; the other end receives
    all of them, every address's request before any reply, no faster than the bucket."""
    n = 1000
    ips = [f"10.{99}.{i // 250}.{1 + i % 250}" for i in range(n)]
    with veth_pair() as rx:
        seen, stop = [], threading.Event()

        def receive():
            while not stop.is_set():
                if select.select([rx], [], [], 0.1)[0]:
                    frame = rx.recv(128)
                    seen.append((time.monotonic(), frame[21], socket.inet_ntoa(frame[28:32])))

        t = threading.Thread(target=receive, daemon=True)
        t.start()
        try:
            t0 = time.monotonic()
            sent = arp.garp_many([(ip, "ga") for ip in ips], count=1)
            took = time.monotonic() - t0
            deadline = time.monotonic() + 5
            while len(seen) < 2 * n and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            stop.set()
            t.join(2)
    assert sent == 2 * n and len(seen) == 2 * n
    ops = [op for _, op, _ in seen]
    assert ops == [1] * n + [2] * n  # every request (first announcement), then every reply
    assert [ip for _, _, ip in seen[:n]] == ips
    least = (2 * n - arp.GARP_BURST) / arp.GARP_PPS
    assert took >= least * 0.95, f"2,000 frames in {took:.3f} s: not paced (at least {least:.3f} s)"
    span = seen[-1][0] - seen[0][0]
    assert took < least + 1.0 and span >= least * 0.9, (took, span)
    print(f"1,000 addresses: {2 * n} frames in {took:.3f} s (paced: {least:.3f} s at the least)")


@needs_root
@pytest.mark.parametrize("frames_of, ops", [((0,), {1}), ((1,), {2})], ids=["requests", "replies"])
def test_an_announcement_can_send_only_the_requests_or_only_the_replies(frames_of, ops):
    """A takeover sends every address's request at the binding, the replies later."""
    ips = ["10.98.0.1", "10.98.0.2", "10.98.0.3"]
    with veth_pair() as rx:
        sent = arp.garp_many([(ip, "ga") for ip in ips], count=2, interval=0.0, frames_of=frames_of)
        seen = []
        while select.select([rx], [], [], 0.5)[0]:
            frame = rx.recv(128)
            seen.append((frame[21], socket.inet_ntoa(frame[28:32])))
    assert sent == 6 and sorted(seen) == sorted((op, ip) for op in ops for ip in ips * 2)
