"""addrbatch against the real kernel (in a namespace of its own), and floating.apply,
which binds through it: what `ip addr` shows afterwards, and each address's answer."""

import errno
import ipaddress
import os

import kernel_ns
import pytest

from _hanet import addrbatch, floating
from _hanet.common import Change

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")


def many(n):
    hosts = ipaddress.ip_network("198.18.0.0/22").hosts()
    return [str(next(hosts)) for _ in range(n)]


def addresses(ns, dev):
    out = kernel_ns.sh("ip", "-n", ns, "-4", "-o", "addr", "show", "dev", dev).stdout
    return {line.split()[3] for line in out.splitlines()}


@pytest.fixture
def ns():
    with kernel_ns.fresh("hab") as name:
        kernel_ns.sh("ip", "-n", name, "link", "add", "pub0", "type", "veth", "peer", "name", "pub1")
        kernel_ns.sh("ip", "-n", name, "link", "add", "oth0", "type", "veth", "peer", "name", "oth1")
        yield name


def index(ns, dev):
    return int(kernel_ns.sh("ip", "-n", ns, "-o", "link", "show", dev).stdout.split(":")[0])


def test_a_thousand_addresses_added_and_deleted_each_with_its_answer(ns):
    ips = many(1000)
    pub = index(ns, "pub0")
    with kernel_ns.inside(ns):
        assert addrbatch.change([("add", pub, ip, 32) for ip in ips]) == [0] * 1000
        assert addresses(ns, "pub0") == {f"{ip}/32" for ip in ips}
        # again: every one exists; one more in the same batch is added
        got = addrbatch.change([("add", pub, ip, 32) for ip in ips[:3]] + [("add", pub, "203.0.113.9", 32)])
        assert got == [errno.EEXIST] * 3 + [0]
        got = addrbatch.change([("del", pub, ip, 32) for ip in ips] + [("del", pub, "198.51.100.1", 32)])
        assert got == [0] * 1000 + [errno.EADDRNOTAVAIL]
    assert addresses(ns, "pub0") == {"203.0.113.9/32"}


def test_the_messages_are_what_the_kernel_expects():
    msg = addrbatch.message("add", 7, "198.18.0.2", 32, seq=5)
    assert len(msg) == 40 and msg[:4] == (40).to_bytes(4, "little")
    with pytest.raises(ValueError, match="add or del"):
        addrbatch.message("replace", 7, "198.18.0.2", 32, seq=5)


class Managed:
    def __init__(self):
        self.names = set()

    def get(self, facet):
        return set(self.names)

    def set(self, facet, names):
        self.names = set(names)


def test_floating_apply_binds_and_unbinds_in_one_batch_and_records_what_it_did(ns):
    managed = Managed()
    binds = [Change("floating", "bind", ip, {"interface": "pub0"}) for ip in many(300)]
    binds.append(Change("floating", "bind", "203.0.113.70", {"interface": "oth0"}))
    with kernel_ns.inside(ns):
        done = floating.apply(binds, managed)
        assert len(done) == 301 and done[-1] == "bind 203.0.113.70 on oth0"
        assert managed.names == {ch.target for ch in binds}
        assert len(addresses(ns, "pub0")) == 300 and addresses(ns, "oth0") == {"203.0.113.70/32"}
        unbinds = [Change("floating", "unbind", ch.target, ch.detail) for ch in binds[:299]]
        floating.apply(unbinds, managed)
        assert managed.names == {binds[299].target, "203.0.113.70"}
        assert addresses(ns, "pub0") == {f"{binds[299].target}/32"}
        with pytest.raises(RuntimeError, match="public interface nope0 does not exist"):
            floating.apply([Change("floating", "bind", "203.0.113.71", {"interface": "nope0"})], managed)
        assert "203.0.113.71" not in managed.names


def test_the_takeover_binds_the_gateway_as_the_links_state_would(ns):
    """takeover.links_add: one netlink message, the prefix and broadcast address an
    apply gives the gateway (`ip addr` shows the same line either way); again: nothing."""
    from types import SimpleNamespace

    from _hanet import links, takeover
    from _hanet.common import Change as Ch

    net = SimpleNamespace(bridge="pub0", service_address="10.20.0.1", prefixlen=24, service_cidr="10.20.0.1/24")

    def brd_line():
        out = kernel_ns.sh("ip", "-n", ns, "-4", "-o", "addr", "show", "dev", "pub0").stdout
        return [line.split(" ", 2)[2].split("\\")[0].strip() for line in out.splitlines()]

    with kernel_ns.inside(ns):
        assert takeover.links_add(net) == ["added 10.20.0.1/24 to pub0"]
        assert takeover.links_add(net) == []
        fast = brd_line()
        addrbatch.change([("del", index(ns, "pub0"), "10.20.0.1", 24)])
        links.apply([Ch("links", "add", "pub0 10.20.0.1/24", {"link": "pub0", "address": "10.20.0.1/24"})])
        assert brd_line() == fast and "brd 10.20.0.255" in fast[0], fast
        with pytest.raises(links.LinkError, match="nope0 does not exist"):
            takeover.links_add(SimpleNamespace(**dict(vars(net), bridge="nope0")))
