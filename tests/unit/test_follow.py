"""The beacon's owner watch (``_hanet.follow``): what it takes from an ARP frame, and,
in network namespaces with real ARP, that it learns the owner's MAC by asking and
follows the owner to another host by its announcement alone."""

import os
import struct
import time

import kernel_ns
import pytest

from _hanet import arp, follow
from _hanet.common import Paths

MAC1, MAC2 = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")


def arp_frame(op, sender_mac, sender_ip, target_ip="10.9.0.9"):
    import socket

    eth = b"\xff" * 6 + sender_mac + b"\x08\x06"
    body = struct.pack("!HHBBH", 1, 0x0800, 6, 4, op) + sender_mac + socket.inet_aton(sender_ip)
    return eth + body + b"\x00" * 6 + socket.inet_aton(target_ip)


def test_the_sender_of_a_request_or_a_reply_is_taken_and_nothing_else():
    assert follow.sender_of(arp_frame(1, MAC1, "10.9.0.2", "10.9.0.2")) == ("10.9.0.2", "02:00:00:00:00:01")
    assert follow.sender_of(arp_frame(2, MAC2, "10.9.0.2")) == ("10.9.0.2", "02:00:00:00:00:02")
    assert follow.sender_of(arp_frame(1, MAC1, "0.0.0.0")) is None  # a probe says nothing
    assert follow.sender_of(arp_frame(3, MAC1, "10.9.0.2")) is None  # RARP and the like
    assert follow.sender_of(arp_frame(2, b"\x01" + MAC1[1:], "10.9.0.2")) is None  # a multicast MAC
    assert follow.sender_of(arp_frame(2, MAC1, "10.9.0.2")[:40]) is None
    ip = b"\xff" * 6 + MAC1 + b"\x08\x00" + b"\x00" * 40
    assert follow.sender_of(ip) is None


def test_a_change_is_written_and_bound_once(tmp_path):
    bound = []
    w = follow.Follow(Paths(root_dir=str(tmp_path)), [("br0", "10.9.0.2")], lambda macs: bound.append(macs))
    assert w.learn("10.9.0.2", "02:00:00:00:00:01") and not w.learn("10.9.0.2", "02:00:00:00:00:01")
    assert w.learn("10.9.0.2", "02:00:00:00:00:02")
    assert len(bound) == 2 and follow.learnt(Paths(root_dir=str(tmp_path))) == {"10.9.0.2": "02:00:00:00:00:02"}
    # a restarted watch starts from what was learnt
    again = follow.Follow(Paths(root_dir=str(tmp_path)), [("br0", "10.9.0.2")], lambda macs: None)
    assert again.macs == {"10.9.0.2": "02:00:00:00:00:02"}


def _wait(fn, timeout=3.0):
    deadline = time.monotonic() + timeout
    while not fn() and time.monotonic() < deadline:
        time.sleep(0.01)
    return fn()


def _mac(ns, dev):
    return kernel_ns.sh("ip", "-n", ns, "-br", "link", "show", "dev", dev).stdout.split()[2]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")
def test_the_owner_is_found_by_asking_and_followed_by_its_announcement(tmp_path):
    """A bridge with two ports towards two owners' namespaces: the watch asks until the
    first answers; the address then moves to the second owner, which announces it once;
    the watch, not due to ask again for a minute, follows on the announcement."""
    with kernel_ns.fresh("hfw") as w, kernel_ns.fresh("hfa") as a, kernel_ns.fresh("hfb") as b:
        sh = kernel_ns.sh
        sh("ip", "-n", w, "link", "add", "br0", "type", "bridge")
        for port, peer, ns in (("p1", "q1", a), ("p2", "q2", b)):
            sh("ip", "-n", w, "link", "add", port, "type", "veth", "peer", "name", peer, "netns", ns)
            sh("ip", "-n", w, "link", "set", port, "master", "br0", "up")
            sh("ip", "-n", ns, "link", "set", peer, "up")
        sh("ip", "-n", w, "link", "set", "br0", "up")
        sh("ip", "-n", a, "addr", "add", "10.9.0.2/24", "dev", "q1")
        macs = {ns: _mac(ns, q) for ns, q in ((a, "q1"), (b, "q2"))}
        bound = []
        with kernel_ns.inside(w):
            watch = follow.Follow(
                Paths(root_dir=str(tmp_path)),
                [("br0", "10.9.0.2")],
                lambda macs: bound.append(macs),
                probe_s=60,
                local=dict,
            ).start()
        try:
            assert _wait(lambda: watch.macs.get("10.9.0.2") == macs[a]), watch.macs
            sh("ip", "-n", a, "addr", "del", "10.9.0.2/24", "dev", "q1")
            sh("ip", "-n", b, "addr", "add", "10.9.0.2/24", "dev", "q2")
            with kernel_ns.inside(b):
                arp.garp_many([("10.9.0.2", "q2")], count=1)
            assert _wait(lambda: watch.macs.get("10.9.0.2") == macs[b], 1.0), watch.macs
            assert _wait(lambda: len(bound) == 2, 1.0)  # (the rebind follows the learning)
        finally:
            watch.stop()
        assert not watch.alive and len(bound) == 2


def test_a_failed_rebind_is_tried_again_every_round(tmp_path):
    calls = []

    def rebind(macs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("nft: busy")

    w = follow.Follow(Paths(root_dir=str(tmp_path)), [("hanet-nope0", "10.9.0.2")], rebind, local=dict)
    assert w.learn("10.9.0.2", "02:00:00:00:00:01") and len(calls) == 1
    w._round({})  # the bridge does not exist: nothing to ask, but the bind is due again
    assert len(calls) == 2
    w._round({})
    assert len(calls) == 2


def test_what_was_learnt_goes_when_nothing_is_followed(tmp_path):
    paths = Paths(root_dir=str(tmp_path))
    follow.Follow(paths, [("br0", "10.9.0.2")], lambda macs: None).learn("10.9.0.2", "02:00:00:00:00:01")
    assert os.path.exists(paths.run(follow.FILE))
    follow.forget(paths)
    follow.forget(paths)  # twice: nothing to do
    assert not os.path.exists(paths.run(follow.FILE)) and follow.learnt(paths) == {}
