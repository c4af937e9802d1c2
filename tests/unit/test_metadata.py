"""Metadata service: rendering per source IP, the planner, and a real server on loopback."""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.request

import pytest

from _hanet import metadata
from _hanet.common import Managed, Paths
from _hanet.desired import InstanceRecord, Metadata

WEB1 = InstanceRecord(
    name="web1",
    uuid="11111111-2222-3333-4444-555555555555",
    hostname="web1.novalocal",
    ips=("192.168.0.10", "10.20.0.10"),
    public_keys=(("mykey", "ssh-ed25519 AAAA web1"),),
    user_data="#cloud-config\n",
)
DB1 = InstanceRecord(
    name="db1", uuid="99999999-8888-7777-6666-555555555555", hostname="db1.novalocal", ips=("127.0.0.1",)
)
META = Metadata(bridges=("br100",), host="127.0.0.1", port=8775, local_service=True)


def rec(r):
    return json.loads(metadata.records_text([r]))["records"][0]


def test_openstack_meta_data():
    status, ctype, body = metadata.render(rec(WEB1), "192.168.0.10", "/openstack/latest/meta_data.json")
    assert status == 200 and ctype == "application/json"
    data = json.loads(body)
    assert data["uuid"] == WEB1.uuid and data["name"] == "web1" and data["hostname"] == "web1.novalocal"
    assert data["public_keys"] == {"mykey": "ssh-ed25519 AAAA web1"}
    assert data["availability_zone"] == "nova"
    assert metadata.render(rec(WEB1), "x", "/openstack/2012-08-10/meta_data.json")[2] == body


def test_openstack_listing_and_user_data():
    assert metadata.render(rec(WEB1), "x", "/openstack/")[2] == "latest\n"
    assert metadata.render(rec(WEB1), "x", "/openstack/latest/")[2] == "meta_data.json\nuser_data\n"
    assert metadata.render(rec(WEB1), "x", "/openstack/latest/user_data")[2] == "#cloud-config\n"
    assert metadata.render(rec(DB1), "x", "/openstack/latest/user_data")[0] == 404
    assert metadata.render(rec(DB1), "x", "/openstack/latest/")[2] == "meta_data.json\n"


def test_ec2():
    r = rec(WEB1)
    assert metadata.render(r, "192.168.0.10", "/latest/meta-data/instance-id")[2] == "i-11111111"
    assert metadata.render(r, "192.168.0.10", "/latest/meta-data/hostname")[2] == "web1.novalocal"
    assert metadata.render(r, "192.168.0.10", "/latest/meta-data/local-ipv4")[2] == "192.168.0.10"
    assert metadata.render(r, "10.20.0.10", "/2009-04-04/meta-data/local-ipv4")[2] == "10.20.0.10"
    assert metadata.render(r, "x", "/latest/meta-data/public-keys/")[2] == "0=mykey\n"
    assert metadata.render(r, "x", "/latest/meta-data/public-keys/0/openssh-key")[2] == "ssh-ed25519 AAAA web1"
    assert metadata.render(r, "x", "/latest/meta-data/public-keys/1/openssh-key")[0] == 404
    assert metadata.render(r, "x", "/latest/user-data")[2] == "#cloud-config\n"
    listing = metadata.render(r, "x", "/latest/meta-data/")[2].split()
    assert {"instance-id", "hostname", "local-ipv4", "public-keys/"} <= set(listing)
    assert "public-keys/" not in metadata.render(rec(DB1), "x", "/latest/meta-data/")[2]
    for bad in ("/latest/meta-data/nope", "/nope", "/openstack/nope/x", "/latest/../../etc/passwd"):
        assert metadata.render(r, "x", bad)[0] == 404


def test_records_round_trip(tmp_path):
    paths = Paths(root_dir=str(tmp_path))
    assert metadata.write_records([WEB1, DB1], paths) is True
    assert metadata.write_records([DB1, WEB1], paths) is False
    by_ip = metadata.load_records(metadata.files(paths)["records"])
    assert by_ip["10.20.0.10"]["name"] == "web1" and by_ip["127.0.0.1"]["name"] == "db1"
    assert metadata.load_records(str(tmp_path / "missing")) == {}


def sim(records, port=8775):
    return {
        "pid": 1,
        "alive": True,
        "port": port,
        "bind": "0.0.0.0",
        "version": metadata.SERVICE_VERSION,
        "records_text": metadata.records_text(records),
    }


def test_plan():
    assert [c.action for c in metadata.plan(META, {}, [WEB1])] == ["records", "start"]
    assert metadata.plan(META, sim([WEB1]), [WEB1]) == []
    assert [c.action for c in metadata.plan(META, sim([WEB1]), [WEB1, DB1])] == ["records"]
    port = metadata.plan(Metadata(bridges=(), host="127.0.0.1", port=9000, local_service=True), sim([WEB1]), [WEB1])
    assert [(c.action, c.detail["reason"]) for c in port] == [("restart", "port changed")]
    dead = dict(sim([WEB1]), alive=False)
    assert [c.action for c in metadata.plan(META, dead, [WEB1])] == ["restart"]
    assert [c.action for c in metadata.plan(None, sim([WEB1]))] == ["stop"]
    remote = Metadata(bridges=("br100",), host="10.0.0.5", port=8775, local_service=False)
    assert [c.action for c in metadata.plan(remote, sim([WEB1]))] == ["stop"]
    assert metadata.plan(None, {}) == []
    # a service an older hanet started (no limits, no deadline) is restarted once
    old = dict(sim([WEB1]), version=None)
    assert [(c.action, c.detail["reason"]) for c in metadata.plan(META, old, [WEB1])] == [
        ("restart", f"service version None -> {metadata.SERVICE_VERSION}")
    ]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture
def service(tmp_path):
    paths = Paths(root_dir=str(tmp_path))
    managed = Managed(paths)
    started = []
    yield paths, managed, started
    pid_path = metadata.files(paths)["pid"]
    metadata.apply([metadata.Change("metadata", "stop", "metadata")], paths, managed)
    for pid in started:  # whatever is left, by the pids we started
        if metadata._alive(pid, pid_path):
            os.kill(pid, 9)


def test_service_lifecycle(service):
    paths, managed, started = service
    port = _free_port()
    meta = Metadata(bridges=(), host="127.0.0.1", port=port, local_service=True)
    # DB1 is "at" 127.0.0.1, the source address of these requests
    changes = metadata.plan(meta, metadata.current(paths, managed), [DB1])
    metadata.apply(changes, paths, managed)
    cur = metadata.current(paths, managed)
    started.append(cur["pid"])
    assert cur["alive"] and cur["port"] == port
    assert metadata.plan(meta, cur, [DB1]) == []
    status, body = _get(port, "/openstack/latest/meta_data.json")
    assert status == 200 and json.loads(body)["uuid"] == DB1.uuid
    # garbage on the socket does not kill it
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"\x00\xff garbage\r\n\r\n")
        s.recv(1024)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.close()
    assert _get(port, "/latest/meta-data/instance-id") == (200, "i-99999999")
    # record change: file rewritten, no restart, picked up
    changes = metadata.plan(meta, metadata.current(paths, managed), [WEB1])
    assert [c.action for c in changes] == ["records"]
    time.sleep(0.01)
    metadata.apply(changes, paths, managed)
    assert _get(port, "/openstack/latest/meta_data.json")[0] == 404
    assert metadata.current(paths, managed)["pid"] == cur["pid"]
    assert metadata.status(paths, managed) == {"pid": cur["pid"], "running": True, "port": port, "instances": 1}
    # port change: restart
    port2 = _free_port()
    meta2 = Metadata(bridges=(), host="127.0.0.1", port=port2, local_service=True)
    changes = metadata.plan(meta2, metadata.current(paths, managed), [DB1])
    assert [c.action for c in changes] == ["records", "restart"]
    metadata.apply(changes, paths, managed)
    cur2 = metadata.current(paths, managed)
    started.append(cur2["pid"])
    assert cur2["pid"] != cur["pid"] and not metadata._alive(cur["pid"], metadata.files(paths)["pid"])
    assert _get(port2, "/latest/meta-data/hostname") == (200, "db1.novalocal")
    # stop: process and files gone, the rotated log too
    with open(metadata.files(paths)["log_old"], "w") as fh:
        fh.write("an older log line\n")
    metadata.apply(metadata.plan(None, metadata.current(paths, managed)), paths, managed)
    assert not metadata._alive(cur2["pid"], metadata.files(paths)["pid"])
    assert not any(os.path.exists(p) for p in metadata.files(paths).values())
    assert metadata.current(paths, Managed(paths)) == {}
    assert metadata.status(paths) == {}


def test_a_start_planned_before_another_applier_started_it_keeps_that_service(service):
    """Two takeovers on one host plan from the same moment: the first starts the
    metadata service, the second's start (carried out after it) leaves it alone."""
    paths, managed, started = service
    port = _free_port()
    meta = Metadata(bridges=(), host="127.0.0.1", port=port, local_service=True)
    first = metadata.plan(meta, metadata.current(paths, managed), [DB1])
    second = metadata.plan(meta, metadata.current(paths, managed), [DB1])
    metadata.apply(first, paths, managed)
    cur = metadata.current(paths, managed)
    started.append(cur["pid"])
    done = metadata.apply(second, paths, managed)
    assert any("started meanwhile" in d for d in done), done
    assert metadata.current(paths, managed)["pid"] == cur["pid"] and metadata.current(paths)["alive"]
    assert _get(port, "/latest/meta-data/hostname") == (200, "db1.novalocal")


# --------------------------------------------------------------------------- a hostile VM


@pytest.fixture
def server(tmp_path):
    """The service's Server on loopback (port 0), DB1 at 127.0.0.1, its log in tmp_path."""
    import threading

    records = tmp_path / "records.json"
    records.write_text(metadata.records_text([DB1]))
    srv = metadata.Server(("127.0.0.1", 0), str(records), metadata.Log())
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_idle_connections_of_one_vm_cannot_starve_the_service(server, monkeypatch):
    """One source holds MAX_PER_SOURCE connections that send nothing: its next one is
    closed unanswered; when it lets go, it is served again."""
    port = server.server_address[1]
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(metadata.MAX_PER_SOURCE)]
    try:
        deadline = time.monotonic() + 5
        while sum(server._active.values()) < metadata.MAX_PER_SOURCE and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server._active == {"127.0.0.1": metadata.MAX_PER_SOURCE}
        extra = socket.create_connection(("127.0.0.1", port))
        extra.sendall(b"GET /openstack/latest/meta_data.json HTTP/1.0\r\n\r\n")
        extra.settimeout(5)
        assert extra.recv(100) == b""  # closed, no answer
        extra.close()
    finally:
        for s in idle:
            s.close()
    deadline = time.monotonic() + 5
    while server._active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _get(port, "/openstack/latest/meta_data.json")[0] == 200


def test_a_trickling_connection_is_closed_at_its_deadline(server, monkeypatch):
    """A client that sends a byte well within each read timeout still loses its
    connection at the deadline (it cannot hold a slot for ever)."""
    monkeypatch.setattr(metadata.Handler, "deadline", 0.5)
    port = server.server_address[1]
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(0.05)
    t0, closed = time.monotonic(), False
    while time.monotonic() - t0 < 5 and not closed:
        try:
            s.sendall(b"G")
            closed = s.recv(100) == b""
        except socket.timeout:
            time.sleep(0.05)
        except OSError:  # reset or broken pipe: closed all the same
            closed = True
    s.close()
    assert closed and 0.4 < time.monotonic() - t0 < 4


def test_an_idle_connection_is_closed_after_the_timeout(server, monkeypatch):
    monkeypatch.setattr(metadata.Handler, "timeout", 0.3)
    port = server.server_address[1]
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(5)
    t0 = time.monotonic()
    assert s.recv(100) == b""  # the server hung up on a client that said nothing
    assert 0.2 < time.monotonic() - t0 < 4
    s.close()
    assert _get(port, "/latest/meta-data/hostname") == (200, "db1.novalocal")


def test_the_log_is_bounded(tmp_path):
    """Past max_bytes the log moves to <log>.1 and a new one starts: at most two files of
    about max_bytes each, whatever a VM does. (Run in a child: the log owns fd 2.)"""
    import subprocess
    import sys

    log = tmp_path / "metadata.log"
    code = (
        "import sys; from _hanet import metadata\n"
        f"lg = metadata.Log({str(log)!r}, max_bytes=1000)\n"
        "for i in range(300): lg.write('x' * 49 + '\\n')\n"
    )
    with open(log, "ab") as fh:
        subprocess.run([sys.executable, "-c", code], stderr=fh, check=True, env=dict(os.environ, PYTHONPATH=_modules()))
    assert os.path.getsize(log) <= 1000
    assert 900 <= os.path.getsize(str(log) + ".1") <= 1000
    assert set((tmp_path / "metadata.log.1").read_text().splitlines()) == {"x" * 49}  # whole lines


def _modules():
    return os.path.join(os.path.dirname(__file__), "..", "..", "_modules")
