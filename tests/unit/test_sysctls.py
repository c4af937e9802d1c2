"""sysctls: key paths, the pure planner, and apply inside a throw-away network namespace."""

import os
import secrets

import pytest

from _hanet import sysctls
from _hanet.common import Change


def test_path_of():
    assert sysctls.path_of("net.ipv4.ip_forward") == "/proc/sys/net/ipv4/ip_forward"
    assert sysctls.path_of("net.ipv4.conf.br100.forwarding") == "/proc/sys/net/ipv4/conf/br100/forwarding"
    assert sysctls.path_of("net.ipv4.conf.eth2.101.rp_filter") == "/proc/sys/net/ipv4/conf/eth2.101/rp_filter"
    assert sysctls.path_of("net/ipv4/conf/eth2.101/rp_filter", "/x") == "/x/net/ipv4/conf/eth2.101/rp_filter"


def test_plan_is_pure_and_minimal():
    desired = (
        ("net.ipv4.ip_forward", "1"),
        ("net.ipv4.conf.br100.forwarding", "1"),
        ("net.ipv4.tcp_rmem", "4096 87380 6291456"),
    )
    current = (
        ("net.ipv4.ip_forward", "0"),
        ("net.ipv4.conf.br100.forwarding", None),
        ("net.ipv4.tcp_rmem", "4096\t87380\t6291456"),
    )
    changes = sysctls.plan(desired, current)
    assert changes == [
        Change("sysctls", "set", "net.ipv4.ip_forward"),
        Change("sysctls", "set", "net.ipv4.conf.br100.forwarding"),
    ]
    assert changes[0].detail == {"value": "1", "old": "0"}
    assert changes[1].detail == {"value": "1", "old": None}
    assert sysctls.plan(desired, desired) == []
    assert sysctls.plan((), current) == []


def test_apply_against_a_directory(tmp_path):
    (tmp_path / "net/ipv4").mkdir(parents=True)
    (tmp_path / "net/ipv4/ip_forward").write_text("0\n")
    desired = (("net.ipv4.ip_forward", 1),)
    changes = sysctls.plan(desired, sysctls.current(["net.ipv4.ip_forward"], str(tmp_path)))
    assert sysctls.apply(changes, str(tmp_path)) == ["set net.ipv4.ip_forward = 1"]
    assert (tmp_path / "net/ipv4/ip_forward").read_text() == "1\n"
    assert sysctls.plan(desired, sysctls.current(["net.ipv4.ip_forward"], str(tmp_path))) == []
    with pytest.raises(sysctls.SysctlError, match="net.ipv4.conf.br9.forwarding"):
        sysctls.apply(sysctls.plan((("net.ipv4.conf.br9.forwarding", "1"),), ()), str(tmp_path))


def _root_value(key):
    with open(sysctls.path_of(key)) as fh:
        return fh.read().strip()


def test_apply_in_a_namespace_leaves_the_root_namespace_alone():
    from pyroute2 import IPRoute
    from pyroute2 import netns as nsapi

    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    root_forward = _root_value("net.ipv4.ip_forward")
    name = f"hu-{os.getpid()}-{secrets.token_hex(3)}"
    nsapi.create(name)
    try:
        nsapi.pushns(name)
        try:
            with IPRoute() as ipr:
                ipr.link("add", ifname="br100", kind="bridge")
            want = "0" if root_forward == "1" else "1"
            desired = (
                ("net.ipv4.ip_forward", want),
                ("net.ipv4.conf.br100.forwarding", want),
                ("net.ipv4.conf.br100.rp_filter", "1"),
            )
            keys = [k for k, _ in desired]
            changes = sysctls.plan(desired, sysctls.current(keys))
            assert [c.target for c in changes][:2] == keys[:2]
            done = sysctls.apply(changes)
            assert f"set net.ipv4.ip_forward = {want}" in done
            assert dict(sysctls.current(keys)) == dict(desired)
            assert sysctls.plan(desired, sysctls.current(keys)) == []
        finally:
            nsapi.popns()
    finally:
        nsapi.remove(name)
    assert _root_value("net.ipv4.ip_forward") == root_forward
    assert name not in nsapi.listnetns()
