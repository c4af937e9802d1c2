"""A small etcd cluster for the lab and the tests: N members, each an ``etcd`` process
(Debian's etcd-server) started with ``ip netns exec <ns>`` in a given network namespace,
listening on a given address there and nowhere else.

    cluster = EtcdCluster("hl-1a2b3c", [("e1", ns, "192.0.2.21"), ("e2", ns, "192.0.2.22"),
                                        ("e3", ns, "192.0.2.23")], rundir)
    with cluster:                 # start() on entry (waits until healthy), down() on exit
        cluster.endpoints         # ["http://192.0.2.21:2379", ...]
        cluster.kill("e1")        # SIGKILL one member (stop(): SIGTERM)
        cluster.start_member("e1")  # it rejoins with its data dir
        cluster.wait_healthy()

Member names and the cluster token carry the run's prefix; each member's data dir and
log live under ``<rundir>/etcd/`` and carry it too, so a lab sweep (``hanet_lab down
--stale``: processes whose command line names the run dir) finds what a killed run
left. ``down()`` kills every member (SIGKILL to its process group, and anything else
whose command line names the data dirs) and removes the data dirs, also after a failed
start. The namespaces and addresses are the caller's: this module creates neither.

Health is asked from inside each member's namespace (a thread that enters it), over
etcd's own HTTP endpoints (``/health``, ``/v3/maintenance/status``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass
from typing import Optional

from . import nslib

ETCD = os.environ.get("HANET_ETCD", "etcd")
CLIENT_PORT, PEER_PORT = 2379, 2380


@dataclass(frozen=True)
class Member:
    name: str  # the short name the caller uses ("e1")
    ns: str  # the network namespace it runs in
    address: str  # where it listens in that namespace
    client_port: int = CLIENT_PORT
    peer_port: int = PEER_PORT

    @property
    def client_url(self) -> str:
        return f"http://{self.address}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.address}:{self.peer_port}"


def in_netns(ns: str, fn, timeout: float = 10.0):
    """``fn()``'s result, run in a thread that entered network namespace ``ns`` (the
    calling thread stays where it is); its exception is raised here."""
    from pyroute2 import netns

    box = {}

    def run():
        try:
            netns.setns(ns, flags=0)
            box["value"] = fn()
        except BaseException as err:  # pylint: disable=broad-except  (handed to the caller)
            box["error"] = err

    t = threading.Thread(target=run, name=f"netns-{ns}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"no answer within {timeout} s in namespace {ns}")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _get(url: str, timeout: float, data: Optional[bytes] = None):
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (http only, in a lab ns)
        return json.loads(resp.read() or b"{}")


class EtcdCluster:
    def __init__(
        self,
        prefix: str,
        members,
        rundir: str,
        etcd: str = ETCD,
        heartbeat_ms: int = 100,
        election_ms: int = 1000,
        extra_args=(),
    ):
        self.prefix = prefix
        self.members = {}
        for m in members:
            m = m if isinstance(m, Member) else Member(*m)
            if m.name in self.members:
                raise ValueError(f"etcd member {m.name} named twice")
            self.members[m.name] = m
        if not self.members:
            raise ValueError("an etcd cluster needs at least one member")
        self.dir = os.path.join(rundir, "etcd")
        self.etcd = etcd
        self.heartbeat_ms, self.election_ms = heartbeat_ms, election_ms
        self.extra_args = list(extra_args)  # more etcd flags for every member (TLS, token TTL)
        self.procs: dict[str, subprocess.Popen] = {}

    # -- names --------------------------------------------------------------------------------
    def etcd_name(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def data_dir(self, name: str) -> str:
        return os.path.join(self.dir, f"{self.prefix}-{name}.data")

    def log_path(self, name: str) -> str:
        return os.path.join(self.dir, f"{self.prefix}-{name}.log")

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members.values()]

    def endpoint(self, name: str) -> str:
        return self.members[name].client_url

    def argv(self, name: str) -> list[str]:
        m = self.members[name]
        initial = ",".join(f"{self.etcd_name(o.name)}={o.peer_url}" for o in self.members.values())
        return [
            "ip",
            "netns",
            "exec",
            m.ns,
            self.etcd,
            "--name",
            self.etcd_name(name),
            "--data-dir",
            self.data_dir(name),
            "--listen-client-urls",
            m.client_url,
            "--advertise-client-urls",
            m.client_url,
            "--listen-peer-urls",
            m.peer_url,
            "--initial-advertise-peer-urls",
            m.peer_url,
            "--initial-cluster",
            initial,
            "--initial-cluster-token",
            f"{self.prefix}-etcd",
            "--initial-cluster-state",
            "new",  # ignored once the data dir exists
            "--heartbeat-interval",
            str(self.heartbeat_ms),
            "--election-timeout",
            str(self.election_ms),
            "--logger",
            "zap",
            "--log-outputs",
            "stderr",
        ] + self.extra_args

    # -- life ---------------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> "EtcdCluster":
        """Start every member and wait until each says it is healthy; on any failure
        everything started is torn down before the error is raised."""
        try:
            os.makedirs(self.dir, exist_ok=True)
            for name in self.members:
                self.start_member(name, wait=False)
            self.wait_healthy(timeout=timeout)
        except BaseException:
            self.down()
            raise
        return self

    def start_member(self, name: str, wait: bool = False, timeout: float = 30.0) -> None:
        """Start (or start again, with its data dir) member ``name``."""
        if self.running(name):
            raise RuntimeError(f"etcd member {name} runs already")
        os.makedirs(self.dir, exist_ok=True)
        with open(self.log_path(name), "ab") as log:
            self.procs[name] = subprocess.Popen(
                self.argv(name),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.dir,
            )
        if wait:
            self.wait_healthy([name], timeout=timeout)

    restart = start_member

    def running(self, name: str) -> bool:
        p = self.procs.get(name)
        return p is not None and p.poll() is None

    def _signal(self, name: str, sig: int, wait: float) -> None:
        p = self.procs.get(name)
        if p is None or p.poll() is not None:
            return
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        try:
            p.wait(wait)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(10)

    def stop(self, name: str, grace: float = 5.0) -> None:
        """SIGTERM member ``name`` (SIGKILL after ``grace`` s) and wait for it."""
        self._signal(name, signal.SIGTERM, grace)

    def kill(self, name: str) -> None:
        """SIGKILL member ``name`` (a power loss, as far as etcd can tell)."""
        self._signal(name, signal.SIGKILL, 10.0)

    def down(self) -> None:
        """Kill every member, and anything else whose command line names this cluster's
        directory; remove the data dirs and logs. Idempotent; never raises for what is
        gone already."""
        for name in list(self.procs):
            try:
                self.kill(name)
            except Exception:  # pylint: disable=broad-except  (go on with the others)
                pass
        mark = self.dir.rstrip("/") + "/"
        nslib.kill_all(lambda: nslib.pids_in((), [mark]), grace=0.5)
        self.procs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "EtcdCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.down()

    # -- health -------------------------------------------------------------------------------
    def healthy(self, name: str, timeout: float = 1.0) -> bool:
        """Whether member ``name`` runs and answers ``/health`` with health true (it has
        a leader and its cluster a quorum)."""
        if not self.running(name):
            return False
        m = self.members[name]
        try:
            got = in_netns(m.ns, lambda: _get(f"{m.client_url}/health", timeout), timeout + 1)
        except Exception:  # pylint: disable=broad-except  (down, refused, no leader: not healthy)
            return False
        return str(got.get("health")).lower() == "true"

    def wait_healthy(self, names=None, timeout: float = 30.0) -> None:
        names = list(names or [n for n in self.members if self.running(n)])
        deadline = time.monotonic() + timeout
        while True:
            dead = [n for n in names if self.procs.get(n) is not None and self.procs[n].poll() is not None]
            if dead:
                raise RuntimeError(
                    f"etcd member(s) {', '.join(dead)} exited; see " + ", ".join(self.log_path(n) for n in dead)
                )
            sick = [n for n in names if not self.healthy(n)]
            if not sick:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"etcd member(s) {', '.join(sick)} not healthy after {timeout} s; see {self.dir}")
            time.sleep(0.2)

    def status(self, name: str, timeout: float = 1.0) -> dict:
        """Member ``name``'s ``/v3/maintenance/status`` (its id in header.member_id, the
        leader's id in leader)."""
        m = self.members[name]
        return in_netns(m.ns, lambda: _get(f"{m.client_url}/v3/maintenance/status", timeout, b"{}"), timeout + 1)

    def leader(self, timeout: float = 1.0) -> Optional[str]:
        """The member that leads now, by a running member's own status; None without one."""
        ids = {}
        lead = None
        for name in self.members:
            if not self.running(name):
                continue
            try:
                st = self.status(name, timeout)
            except Exception:  # pylint: disable=broad-except  (that member cannot say)
                continue
            ids[str(st.get("header", {}).get("member_id"))] = name
            lead = str(st.get("leader")) if st.get("leader") else lead
        return ids.get(lead) if lead else None
