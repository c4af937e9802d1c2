"""Gratuitous ARP and duplicate address detection (``_hanet.arp``) between two real
namespaces: the peer's ARP cache follows a GARP, and a probe finds who holds an address."""

import os
import subprocess
import time

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")


def sh(*args):
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def test_probe_finds_the_holder_and_nobody_for_a_free_address(ns_pair):
    from pyroute2 import netns

    from _hanet import arp

    a, b = ns_pair
    b_mac = sh("ip", "-n", b, "-o", "link", "show", "eth0").split("link/ether ")[1].split()[0]
    netns.pushns(a)
    try:
        assert arp.probe("10.9.0.2", "eth0", timeout=0.3) == b_mac
        assert arp.probe("10.9.0.9", "eth0", timeout=0.1) is None
    finally:
        netns.popns()


def test_garp_moves_the_peers_arp_entry(ns_pair):
    from pyroute2 import netns

    from _hanet import arp

    a, b = ns_pair
    # b believes 10.9.0.50 is at some other MAC
    sh("ip", "-n", b, "neigh", "replace", "10.9.0.50", "lladdr", "02:00:00:00:00:99", "dev", "eth0", "nud", "stale")
    sh("ip", "-n", a, "addr", "add", "10.9.0.50/32", "dev", "eth0")
    a_mac = sh("ip", "-n", a, "-o", "link", "show", "eth0").split("link/ether ")[1].split()[0]
    time.sleep(1.1)  # the kernel ignores ARP updates within locktime (1 s) of the last change
    netns.pushns(a)
    try:
        out = arp.garp("10.9.0.50", count=2)
    finally:
        netns.popns()
    assert out == {"ip": "10.9.0.50", "interface": "eth0", "mac": a_mac, "sent": 4}
    neigh = sh("ip", "-n", b, "neigh", "show", "10.9.0.50")
    assert a_mac in neigh, neigh
