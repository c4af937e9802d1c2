"""dnsmasq applier: rendering (argv, hosts, opts) and the planner, without processes."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from _hanet import dnsmasq
from _hanet.common import Change, Managed, Paths
from _hanet.desired import DhcpHost, Dnsmasq

PATHS = Paths(root_dir="/r")
H1 = DhcpHost(mac="fa:16:3e:00:00:01", hostname="web1.novalocal", ip="192.168.0.10")
H2 = DhcpHost(mac="fa:16:3e:00:00:02", hostname="web2.novalocal", ip="192.168.0.11")
N1 = ("192.168.0.10", "web1.novalocal", "web1")
N2 = ("192.168.0.11", "db1.novalocal", "db1")  # on another host: named, not served
H3 = DhcpHost(mac="FA:16:3E:00:00:03", hostname="web3.novalocal", ip="192.168.0.12", default_route=False)


def spec(hosts=(H1,), **kw):
    values = dict(
        network="private",
        bridge="br100",
        listen_address="192.168.0.3",
        range_start="192.168.0.2",
        netmask="255.255.255.0",
        lease_time=86400,
        lease_max=256,
        domain="novalocal",
        router="192.168.0.3",
        hosts=tuple(hosts),
    )
    values.update(kw)
    return Dnsmasq(**values)


# --------------------------------------------------------------------------- argv


def test_argv_nova_flags():
    assert dnsmasq.argv(spec(), PATHS) == [
        "dnsmasq",
        "--strict-order",
        "--bind-interfaces",
        "--conf-file=",
        "--pid-file=/r/run/hanet/dnsmasq-private.pid",
        "--dhcp-optsfile=/r/var/lib/hanet/dnsmasq/private.opts",
        "--listen-address=192.168.0.3",
        "--except-interface=lo",
        "--dhcp-range=set:'private',192.168.0.2,static,255.255.255.0,86400s",
        "--tag-if=set:private,tag:'private',tag:!private-nogw",
        "--dhcp-lease-max=256",
        "--dhcp-hostsfile=/r/var/lib/hanet/dnsmasq/private.hosts",
        "--dhcp-leasefile=/r/var/lib/hanet/dnsmasq/private.leases",
        "--no-hosts",
        "--addn-hosts=/r/var/lib/hanet/dnsmasq/private.names",
        "--dhcp-authoritative",
        "--user=root",  # argv's default; _start passes run_as's user
        "--log-facility=/r/var/lib/hanet/dnsmasq/private.log",
        "--dhcp-option=option:router,192.168.0.3",
        "--domain=novalocal",
    ]


def test_argv_conf_file_passed_through():
    assert "--conf-file=/etc/hanet/extra.conf" in dnsmasq.argv(spec(conf_file="/etc/hanet/extra.conf"), PATHS)


def test_argv_dns_servers_no_resolv():
    argv = dnsmasq.argv(spec(dns_servers=("8.8.8.8", "1.1.1.1")), PATHS)
    assert argv[-3:] == ["--no-resolv", "--server=8.8.8.8", "--server=1.1.1.1"]
    assert "--no-resolv" not in dnsmasq.argv(spec(), PATHS)


def test_argv_no_router():
    argv = dnsmasq.argv(spec(router=None), PATHS)
    assert "--dhcp-option=option:router" in argv
    assert not any(a.startswith("--dhcp-option=option:router,") for a in argv)


def test_argv_hardware_router():
    assert "--dhcp-option=option:router,172.16.100.1" in dnsmasq.argv(spec(network="red", router="172.16.100.1"), PATHS)


def test_argv_mtu_only_when_set():
    assert "--dhcp-option-force=tag:private,option:mtu,1400" in dnsmasq.argv(spec(mtu=1400), PATHS)
    assert not any("mtu" in a for a in dnsmasq.argv(spec(), PATHS))


def test_argv_no_domain():
    assert not any(a.startswith("--domain") for a in dnsmasq.argv(spec(domain=""), PATHS))


def test_argv_under_root_dir():
    argv = dnsmasq.argv(spec(), Paths(root_dir="/srv/m1"))
    for arg in argv:
        if arg.startswith(("--pid-file", "--dhcp-hostsfile", "--dhcp-leasefile", "--dhcp-optsfile", "--log")):
            assert arg.split("=", 1)[1].startswith("/srv/m1/")


# --------------------------------------------------------------------------- hosts, opts


def test_hostsfile_sorted_nova_order():
    assert dnsmasq.hostsfile(spec(hosts=(H2, H1))) == (
        "fa:16:3e:00:00:01,web1.novalocal,192.168.0.10\nfa:16:3e:00:00:02,web2.novalocal,192.168.0.11\n"
    )


def test_no_default_route_tagged_by_mac_not_in_hostsfile():
    # dnsmasq 2.90 segfaults on SIGHUP with set: tags in the hosts file
    assert dnsmasq.hostsfile(spec(hosts=(H3,))) == "fa:16:3e:00:00:03,web3.novalocal,192.168.0.12\n"
    argv = dnsmasq.argv(spec(hosts=(H1, H3)), PATHS)
    assert "--dhcp-mac=set:private-nogw,fa:16:3e:00:00:03" in argv
    assert not any(a.startswith("--dhcp-mac") for a in dnsmasq.argv(spec(hosts=(H1,)), PATHS))


def test_hostsfile_empty():
    assert dnsmasq.hostsfile(spec(hosts=())) == ""


def test_optsfile_no_router_for_nogw_tag():
    assert dnsmasq.optsfile(spec()) == "tag:private-nogw,option:router\n"
    assert dnsmasq.optsfile(spec(hosts=(H3,))) == dnsmasq.optsfile(spec())


def test_parse_hosts_and_leases():
    text = dnsmasq.hostsfile(spec(hosts=(H1, H3)))
    assert dnsmasq.parse_hosts(text) == {"fa:16:3e:00:00:01": "192.168.0.10", "fa:16:3e:00:00:03": "192.168.0.12"}
    leases = "1700000000 fa:16:3e:00:00:01 192.168.0.10 web1 01:fa:16:3e:00:00:01\nduid 00:01:00:01\n"
    assert dnsmasq.parse_leases(leases) == [("fa:16:3e:00:00:01", "192.168.0.10")]


def test_options_digest_ignores_hosts_but_not_nogw():
    assert dnsmasq.options_digest(spec(hosts=(H1,))) == dnsmasq.options_digest(spec(hosts=(H1, H2)))
    assert dnsmasq.options_digest(spec(hosts=(H1,))) != dnsmasq.options_digest(spec(hosts=(H1, H3)))
    assert dnsmasq.options_digest(spec()) != dnsmasq.options_digest(spec(lease_time=60))


def test_spec_round_trip():
    s = spec(hosts=(H1, H3), dns_servers=("8.8.8.8",), mtu=1400, names=(N1, N2))
    assert dnsmasq.spec_from_dict(json.loads(json.dumps(dnsmasq.spec_to_dict(s)))) == s


# --------------------------------------------------------------------------- plan


def simulate(desired, pid=100, leases=()):
    """``current`` as it reads right after ``apply`` made ``desired`` true."""
    return {
        s.network: {
            "pid": pid,
            "alive": True,
            "argv_digest": dnsmasq.options_digest(s),
            "hosts_text": dnsmasq.hostsfile(s),
            "names_text": dnsmasq.namesfile(s),
            "bridge": s.bridge,
            "leases": [[m, ip] for m, ip in leases],
        }
        for s in desired
    }


def actions(changes):
    return [(c.action, c.target) for c in changes]


def test_plan_start():
    changes = dnsmasq.plan((spec(),), {})
    assert actions(changes) == [("start", "private")]
    assert dnsmasq.spec_from_dict(changes[0].detail["spec"]) == spec()


def test_plan_noop():
    assert dnsmasq.plan((spec(),), simulate((spec(),))) == []


def test_plan_reload_when_only_hosts_change():
    changes = dnsmasq.plan((spec(hosts=(H1, H2)),), simulate((spec(),)))
    assert actions(changes) == [("reload", "private")]
    assert changes[0].detail["pid"] == 100


def test_namesfile_lists_every_instance_of_the_network_sorted():
    assert dnsmasq.namesfile(spec(names=(N2, N1))) == (
        "192.168.0.10 web1.novalocal web1\n192.168.0.11 db1.novalocal db1\n"
    )
    assert dnsmasq.namesfile(spec()) == ""


def test_plan_reload_when_only_names_change():
    """An instance on another host came or went: this host's DNS learns it by SIGHUP."""
    assert dnsmasq.options_digest(spec(names=(N1,))) == dnsmasq.options_digest(spec(names=(N1, N2)))
    changes = dnsmasq.plan((spec(names=(N1, N2)),), simulate((spec(names=(N1,)),)))
    assert actions(changes) == [("reload", "private")]
    assert dnsmasq.plan((spec(names=(N1, N2)),), simulate((spec(names=(N1, N2)),))) == []


def test_plan_restart_when_options_change():
    changes = dnsmasq.plan((spec(lease_time=120, hosts=(H1, H2)),), simulate((spec(),)))
    assert actions(changes) == [("restart", "private")]
    assert changes[0].detail["reason"] == "options changed"


def test_plan_restart_when_no_default_route_set_changes():
    changes = dnsmasq.plan((spec(hosts=(H1, H3)),), simulate((spec(),)))
    assert actions(changes) == [("restart", "private")]


def test_plan_restart_when_dead():
    cur = simulate((spec(),))
    cur["private"]["alive"] = False
    changes = dnsmasq.plan((spec(),), cur)
    assert actions(changes) == [("restart", "private")]
    assert changes[0].detail["reason"] == "dead"


def test_plan_stop_unserved():
    changes = dnsmasq.plan((), simulate((spec(),)))
    assert actions(changes) == [("stop", "private")]


def test_plan_release_removed_host_with_lease():
    cur = simulate((spec(hosts=(H1, H2)),), leases=[(H1.mac, H1.ip), (H2.mac, H2.ip)])
    changes = dnsmasq.plan((spec(hosts=(H1,)),), cur)
    assert actions(changes) == [("release", "private/192.168.0.11/fa:16:3e:00:00:02"), ("reload", "private")]
    assert changes[0].detail == {
        "network": "private",
        "bridge": "br100",
        "ip": "192.168.0.11",
        "mac": "fa:16:3e:00:00:02",
        "pid": 100,
        "server": "192.168.0.3",
    }


def test_release_packet_names_the_listen_address_as_server():
    import socket

    pkt = dnsmasq.release_packet("10.20.0.1", "10.20.0.20", "fa:16:3e:00:20:02")
    assert len(pkt) == 300 and pkt[0] == 1 and pkt[2] == 6
    assert pkt[12:16] == socket.inet_aton("10.20.0.20")  # ciaddr
    assert pkt[28:34] == bytes.fromhex("fa163e002002")  # chaddr
    assert pkt[236:240] == bytes.fromhex("63825363")
    assert pkt[240:250] == bytes([53, 1, 7, 54, 4]) + socket.inet_aton("10.20.0.1") + bytes([255])


def test_plan_no_release_without_lease():
    cur = simulate((spec(hosts=(H1, H2)),), leases=[(H1.mac, H1.ip)])
    assert actions(dnsmasq.plan((spec(hosts=(H1,)),), cur)) == [("reload", "private")]


def test_plan_release_before_restart():
    cur = simulate((spec(hosts=(H1, H2)),), leases=[(H2.mac, H2.ip)])
    changes = dnsmasq.plan((spec(hosts=(H1,), lease_time=60),), cur)
    assert [c.action for c in changes] == ["release", "restart"]


def test_plan_no_release_when_dead():
    cur = simulate((spec(hosts=(H1, H2)),), leases=[(H2.mac, H2.ip)])
    cur["private"]["alive"] = False
    assert [c.action for c in dnsmasq.plan((spec(hosts=(H1,)),), cur)] == ["restart"]


def test_plan_release_when_ip_changes():
    moved = DhcpHost(mac=H2.mac, hostname=H2.hostname, ip="192.168.0.99")
    cur = simulate((spec(hosts=(H1, H2)),), leases=[(H2.mac, H2.ip)])
    assert [c.action for c in dnsmasq.plan((spec(hosts=(H1, moved)),), cur)] == ["release", "reload"]


def test_plan_several_networks():
    red = spec(
        network="red",
        bridge="br101",
        listen_address="172.16.100.3",
        range_start="172.16.100.2",
        router="172.16.100.1",
        hosts=(),
    )
    changes = dnsmasq.plan((spec(), red), simulate((spec(),)))
    assert actions(changes) == [("start", "red")]
    assert actions(dnsmasq.plan((red,), simulate((spec(), red)))) == [("stop", "private")]


# --------------------------------------------------------------------------- property

MACS = [f"fa:16:3e:00:00:{i:02x}" for i in range(1, 9)]
hosts_st = st.lists(
    st.builds(
        lambda i, dr: DhcpHost(mac=MACS[i], hostname=f"vm{i}.novalocal", ip=f"10.0.0.{10 + i}", default_route=dr),
        st.integers(0, 7),
        st.booleans(),
    ),
    max_size=6,
    unique_by=lambda h: h.mac,
).map(tuple)
spec_st = st.builds(
    lambda label, hosts, lt, router, mtu, dns: spec(
        network=label, bridge=f"br-{label}", hosts=hosts, lease_time=lt, router=router, mtu=mtu, dns_servers=dns
    ),
    st.sampled_from(["private", "red", "green", "blue"]),
    hosts_st,
    st.sampled_from([60, 86400]),
    st.sampled_from([None, "10.0.0.1", "10.0.0.3"]),
    st.sampled_from([None, 1400]),
    st.sampled_from([(), ("8.8.8.8",)]),
)
desired_st = st.lists(spec_st, max_size=4, unique_by=lambda s: s.network).map(tuple)


@settings(max_examples=200, deadline=None)
@given(desired_st, desired_st, st.booleans())
def test_plan_property(desired, before, dead):
    # converged: nothing to do
    assert dnsmasq.plan(desired, simulate(desired)) == []
    # from any other state: never crashes, touches each network at most once (releases aside)
    cur = simulate(before, leases=[(m, f"10.0.0.{10 + i}") for i, m in enumerate(MACS)])
    if dead:
        for value in cur.values():
            value["alive"] = False
    changes = dnsmasq.plan(desired, cur)
    main = [c for c in changes if c.action != "release"]
    assert len({c.target for c in main}) == len(main)
    wanted = {s.network for s in desired}
    assert {c.target for c in main if c.action == "stop"} == set(cur) - wanted
    for c in changes:
        assert isinstance(c, Change) and c.facet == "dnsmasq"
        if c.action == "release":
            assert not dead
            assert c.detail["network"] in wanted


# --------------------------------------------------------------------------- current (files only)


def test_current_reads_files_and_dead_pid(tmp_path):
    paths = Paths(root_dir=str(tmp_path))
    paths.ensure()
    f = dnsmasq.files("private", paths)
    os.makedirs(os.path.dirname(f["hosts"]), exist_ok=True)
    with open(f["hosts"], "w") as fh:
        fh.write(dnsmasq.hostsfile(spec()))
    with open(f["record"], "w") as fh:
        json.dump({"argv_digest": dnsmasq.options_digest(spec()), "bridge": "br100"}, fh)
    with open(f["pid"], "w") as fh:
        fh.write(f"{os.getpid()}\n")  # alive, but not our dnsmasq
    with open(f["leases"], "w") as fh:
        fh.write("1700000000 fa:16:3e:00:00:01 192.168.0.10 web1 *\n")
    cur = dnsmasq.current(paths, Managed(paths))
    assert cur["private"]["alive"] is False
    assert cur["private"]["pid"] == os.getpid()
    assert cur["private"]["leases"] == [["fa:16:3e:00:00:01", "192.168.0.10"]]
    assert [c.action for c in dnsmasq.plan((spec(),), cur)] == ["restart"]
    assert dnsmasq.status(paths)["private"] == {
        "pid": None,
        "running": False,
        "leases": 1,
        "hosts": 1,
        "bridge": "br100",
    }


def test_current_empty(tmp_path):
    assert dnsmasq.current(Paths(root_dir=str(tmp_path)), None) == {}
    assert dnsmasq.status(Paths(root_dir=str(tmp_path))) == {}


def test_apply_stop_without_process_removes_files(tmp_path):
    paths = Paths(root_dir=str(tmp_path))
    managed = Managed(paths)
    managed.set("dnsmasq", ["private"])
    f = dnsmasq.files("private", paths)
    os.makedirs(os.path.dirname(f["hosts"]), exist_ok=True)
    for p in (f["hosts"], f["opts"], f["record"]):
        with open(p, "w") as fh:
            fh.write("x")
    changes = dnsmasq.plan((), dnsmasq.current(paths, managed))
    assert actions(changes) == [("stop", "private")]
    dnsmasq.apply(changes, paths, managed)
    assert not any(os.path.exists(p) for p in f.values())
    assert managed.get("dnsmasq") == set()
    assert dnsmasq.current(paths, Managed(paths)) == {}


def test_release_carries_the_leases_client_id():
    """A lease taken with a client identifier (udhcpc sends one) is released only by a
    DHCPRELEASE that carries it: dnsmasq ignores one without."""
    from _hanet.dnsmasq import lease_client_id, release_packet

    leases = (
        "1795800000 fa:16:3e:00:00:03 192.168.0.12 web2 01:fa:16:3e:00:00:03\n"
        "1795800000 fa:16:3e:00:00:01 192.168.0.10 web1 *\n"
    )
    assert lease_client_id(leases, "FA:16:3E:00:00:03", "192.168.0.12") == "01:fa:16:3e:00:00:03"
    assert lease_client_id(leases, "fa:16:3e:00:00:01", "192.168.0.10") is None
    with_id = release_packet("192.168.0.3", "192.168.0.12", "fa:16:3e:00:00:03", "01:fa:16:3e:00:00:03")
    without = release_packet("192.168.0.3", "192.168.0.12", "fa:16:3e:00:00:03")
    assert bytes([61, 7, 1, 0xFA, 0x16, 0x3E, 0, 0, 3]) in with_id
    assert bytes([61]) + bytes([7]) not in without


def test_apply_start_planned_before_another_applier_started_it(tmp_path, monkeypatch):
    """Two takeovers on one host plan from the same moment; the first starts the
    network's dnsmasq. The second's start, carried out after it, must leave that dnsmasq
    and its pid file alone (a second dnsmasq fails on the address in use, and without
    the pid file every later apply failed the same way)."""
    import signal
    import subprocess
    import sys

    paths = Paths(root_dir=str(tmp_path))
    managed = Managed(paths)
    changes = dnsmasq.plan((spec(),), dnsmasq.current(paths, managed))
    assert actions(changes) == [("start", "private")]
    f = dnsmasq.files("private", paths)
    dnsmasq._write_files(spec(), paths)  # what the first applier did, and its dnsmasq
    with open(f["record"], "w") as fh:
        json.dump({"argv_digest": dnsmasq.options_digest(spec()), "bridge": "br100"}, fh)
    stand_in = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, sys, time; signal.signal(signal.SIGHUP, signal.SIG_IGN); print(flush=True); time.sleep(60)",
            f"--pid-file={f['pid']}",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        stand_in.stdout.readline()
        with open(f["pid"], "w") as fh:
            fh.write(f"{stand_in.pid}\n")
        monkeypatch.setattr(dnsmasq, "_launch", lambda *a: pytest.fail("started a second dnsmasq"))
        done = dnsmasq.apply(changes, paths, managed)
        assert done == [f"dnsmasq private was started meanwhile: SIGHUP pid {stand_in.pid}"]
        assert dnsmasq.current(paths, managed)["private"]["alive"] is True
        assert managed.get("dnsmasq") == {"private"}
    finally:
        stand_in.send_signal(signal.SIGKILL)
        stand_in.wait()


# --------------------------------------------------------------------------- the user


def test_argv_drops_privileges_to_the_user_given():
    assert "--user=dnsmasq" in dnsmasq.argv(spec(), PATHS, "dnsmasq")
    assert [a for a in dnsmasq.argv(spec(), PATHS, "dnsmasq") if a.startswith("--user")] == ["--user=dnsmasq"]


def test_the_pillars_user_is_used_and_a_missing_one_is_an_error_naming_the_key(tmp_path):
    paths = Paths(root_dir=str(tmp_path))
    assert dnsmasq.run_as(spec(user="root"), paths) == ("root", None)
    with pytest.raises(ValueError, match="dnsmasq_user 'no-such-user-here'"):
        dnsmasq.run_as(spec(user="no-such-user-here"), paths)


def test_the_distributions_user_where_it_can_read_the_files_else_root():
    """dnsmasq reads its hosts, opts and names files again on SIGHUP, as the user it
    dropped to: under a directory that user cannot enter it stays root, and says why."""
    import pwd
    import shutil
    import tempfile

    top = tempfile.mkdtemp(prefix="hanet-test-user-")  # /tmp: pytest's tmp_path is private
    try:
        os.chmod(top, 0o755)
        paths = Paths(root_dir=top)
        dnsmasq._write_files(spec(), paths)
        try:
            pwd.getpwnam(dnsmasq.DEFAULT_USER)
        except KeyError:
            assert dnsmasq.run_as(spec(), paths) == ("root", "this host has no 'dnsmasq' user")
            return
        assert dnsmasq.run_as(spec(), paths) == ("dnsmasq", None)
        os.chmod(top, 0o700)
        user, why = dnsmasq.run_as(spec(), paths)
        assert user == "root" and "user 'dnsmasq' cannot read" in why and "private.hosts" in why
    finally:
        shutil.rmtree(top, ignore_errors=True)
