"""The namespace lab: a cluster of network namespaces running a real salt-master and
real salt-minions, built from a :class:`~hanet_lab.topology.Topology`, always cleaned up.

    from hanet_lab import Lab, default_topology

    with Lab(default_topology(hosts=2)) as lab:
        print(lab.salt("*", "hanet.links"))
        lab.set_pillar({"hanet": {...}})
        lab.salt("compute1", "state.apply", ["hanet"], timeout=120)
        lab.plug_vm("web1")
        print(lab.dhcp("web1"))

See lab/README.md for the full API and the CLI.
"""

from __future__ import annotations

import atexit
import ipaddress
import itertools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Optional, Sequence, Union

import yaml

from . import nslib, state
from .topology import Topology, default_topology

HIDDEN_IN_ROOTS = r"(^|/)\.[^/]+(/|$)"  # master file_ignore_regex: .venv, .git, caches

log = logging.getLogger("hanet_lab")

HERE = os.path.dirname(os.path.abspath(__file__))
SALT_RET_PORT = 4506


class LabError(RuntimeError):
    pass


def checkout_dir() -> str:
    """The hanet checkout: $HANET_CHECKOUT, else the repository holding this package."""
    env = os.environ.get("HANET_CHECKOUT")
    if env:
        return os.path.abspath(env)
    return os.path.dirname(os.path.dirname(HERE))


def _venv_bin(checkout: str, name: str) -> str:
    for cand in (os.path.join(checkout, ".venv", "bin", name), os.path.join(os.path.dirname(sys.executable), name)):
        if os.access(cand, os.X_OK):
            return cand
    found = shutil.which(name)
    if not found:
        raise LabError(f"cannot find {name}")
    return found


def _python(checkout: str) -> str:
    cand = os.path.join(checkout, ".venv", "bin", "python")
    return cand if os.access(cand, os.X_OK) else sys.executable


def unavailable_reason() -> Optional[str]:
    """Why a lab cannot run on this machine (for test skips), or None."""
    if os.geteuid() != 0:
        return "the lab needs root (network namespaces, netlink)"
    if not os.path.exists("/proc/self/ns/net"):
        return "the lab needs network namespaces"
    missing = [t for t in ("ip", "ping", "curl") if not shutil.which(t)]
    if missing:
        return f"the lab needs {', '.join(missing)}"
    return None


def _pss_kib(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


# --- cleanup on exit and on signals --------------------------------------------------------

_LIVE: "set[Lab]" = set()  # strong refs: a lab nobody holds any more is still cleaned at exit
_HANDLERS_INSTALLED = False
_PREV_HANDLERS: dict = {}


_HANDLER_PID = None  # the process that installed the handlers (forked children inherit them)


def _cleanup_live():
    if os.getpid() != _HANDLER_PID:
        return  # a forked child (pyroute2's netns helpers, ...) must never tear the lab down
    for lab in list(_LIVE):
        try:
            lab.down()
        except Exception:  # noqa: BLE001 - best effort at exit
            log.exception("hanet_lab: cleanup of %s failed", lab.prefix)


def _on_signal(signum, frame):
    if os.getpid() != _HANDLER_PID:
        # A forked child (pyroute2 forks helpers and stops them with SIGTERM): default action.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _cleanup_live()
    prev = _PREV_HANDLERS.get(signum, signal.SIG_DFL)
    if callable(prev):
        prev(signum, frame)
    elif prev == signal.SIG_IGN:
        return
    else:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _install_handlers():
    """atexit always; SIGTERM/SIGHUP handlers when we are the main thread. SIGINT keeps
    Python's KeyboardInterrupt, which unwinds through `with Lab` / up()'s cleanup."""
    global _HANDLERS_INSTALLED, _HANDLER_PID
    if _HANDLERS_INSTALLED and _HANDLER_PID == os.getpid():
        return
    _HANDLER_PID = os.getpid()
    atexit.register(_cleanup_live)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            _PREV_HANDLERS[sig] = signal.getsignal(sig)
            signal.signal(sig, _on_signal)
    _HANDLERS_INSTALLED = True


# --- the salt gateway client ---------------------------------------------------------------


class _Gateway:
    """Client side of saltgw.py (which runs inside the master namespace)."""

    def __init__(self, argv: list[str], logfile: str, env: dict):
        self.lock = threading.Lock()
        self.pending: dict[int, dict] = {}
        self.ids = itertools.count(1)
        self.log = open(logfile, "ab")
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            bufsize=1,
            start_new_session=True,
            env=env,
        )
        first = self.proc.stdout.readline()
        if not first or json.loads(first).get("result") != "ready":
            raise LabError(f"salt gateway did not start (see {logfile})")
        self.reader = threading.Thread(target=self._read, daemon=True, name="hanet-lab-saltgw")
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                resp = json.loads(line)
            except ValueError:
                continue
            with self.lock:
                slot = self.pending.get(resp.get("id"))
            if slot is not None:
                slot["resp"] = resp
                slot["event"].set()
        with self.lock:  # gateway gone: wake everyone
            for slot in self.pending.values():
                slot["event"].set()

    def call(self, op: str, wait: float, **req) -> Any:
        rid = next(self.ids)
        slot = {"event": threading.Event(), "resp": None}
        with self.lock:
            self.pending[rid] = slot
            try:
                self.proc.stdin.write(json.dumps({"id": rid, "op": op, **req}) + "\n")
                self.proc.stdin.flush()
            except (BrokenPipeError, ValueError) as e:
                self.pending.pop(rid, None)
                raise LabError("salt gateway is gone") from e
        try:
            if not slot["event"].wait(wait):
                raise LabError(f"salt gateway: no answer to {op} {req.get('fun', '')} in {wait:.0f} s")
        finally:
            with self.lock:
                self.pending.pop(rid, None)
        resp = slot["resp"]
        if resp is None:
            raise LabError("salt gateway exited")
        if not resp.get("ok"):
            raise LabError(f"salt {op} {req.get('fun', '')}: {resp.get('error')}\n{resp.get('traceback', '')}")
        return resp.get("result")

    def close(self):
        try:
            self.proc.stdin.close()
        except Exception:  # noqa: BLE001
            pass
        try:
            self.proc.wait(2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


class EventListener:
    """Master event bus listener (through the gateway). Events are buffered from creation:
    ``wait('hanet/failover/*', 10)`` returns the first matching one ({tag, data,
    received_at}) or None on timeout, whatever else arrived in between stays buffered."""

    def __init__(self, lab: "Lab", master: Optional[str] = None):
        self.lab = lab
        self.master = master or lab.via
        self.lid = lab._gw(self.master).call("listen", 15)

    def wait(self, tag: str = "*", timeout: float = 10.0) -> Optional[dict]:
        return self.lab._gw(self.master).call("event", timeout + 15, lid=self.lid, tag=tag, timeout=timeout)

    def close(self):
        if self.lid is not None:
            try:
                self.lab._gw(self.master).call("unlisten", 10, lid=self.lid)
            except LabError:
                pass
            self.lid = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --- the lab ---------------------------------------------------------------------------------


class Lab:
    """A running (or to-be-run) lab. ``up()`` builds it, ``down()`` removes all of it.

    ``salt=False`` builds only the namespaces and wiring (no master/minions).
    ``progress``: a callable(str) told about each step (the CLI prints them).
    ``minion_env``: {host: {variable: value}} added to that host's salt-minion environment
    (tests/integration/test_install.py: a minion that loads hanet pip-installed).
    """

    def __init__(
        self,
        topology: Optional[Topology] = None,
        *,
        salt: bool = True,
        sync: bool = True,
        prefix: Optional[str] = None,
        checkout: Optional[str] = None,
        start_timeout: float = 120.0,
        progress=None,
        minion_env: Optional[dict] = None,
    ):
        self.topology = topology if topology is not None else default_topology()
        if isinstance(self.topology, dict):
            self.topology = Topology.from_dict(self.topology)
        self.topology.validate()
        self.use_salt = salt and self.topology.master is not None
        self.do_sync = sync
        self.minion_env = {h: dict(e) for h, e in (minion_env or {}).items()}  # host -> extra env
        self.prefix = prefix or state.new_prefix()
        if not state.PREFIX_RE.match(self.prefix):
            raise ValueError(f"bad prefix {self.prefix!r} (want hl-<6 hex>)")
        self.rundir = state.rundir_for(self.prefix)
        self.checkout = os.path.abspath(checkout) if checkout else checkout_dir()
        self.start_timeout = start_timeout
        self.progress = progress or (lambda msg: log.info("%s", msg))
        self.switch_ns = f"{self.prefix}-switch"
        self.namespaces: dict[str, str] = {"switch": self.switch_ns}
        for name in list(self.topology.nodes()) + list(self.topology.vms):
            self.namespaces[name] = f"{self.prefix}-{name}"
        self.procs: dict[str, subprocess.Popen] = {}
        self.pids: dict[str, int] = {}
        self.timings: dict[str, float] = {}
        self.plugged: dict[str, dict] = {}  # vm -> {host, taps}
        self._gateways: dict[str, _Gateway] = {}  # master -> its salt gateway
        # the master that salt(), salt_run(), events() go through unless told otherwise
        self.via = self.topology.master.name if self.topology.master else None
        self.etcd = None  # the EtcdCluster (topology.etcd)
        self._gw_lock = threading.Lock()
        self._owner = True  # we tear it down at exit
        self._attached = False  # a handle on a lab some other process (or `up`) owns
        self._is_up = False
        self._down_lock = threading.RLock()
        self.ports: dict[str, dict[str, str]] = {}  # node -> ifname -> switch port name

    # -- lifecycle ------------------------------------------------------------------------
    def __enter__(self) -> "Lab":
        return self.up()

    def __exit__(self, *exc):
        if self._owner:  # not when detached (``hanet_lab demo --keep``, ``up``)
            self.down()

    def up(self) -> "Lab":
        """Build the lab. On any failure (or KeyboardInterrupt) everything made is removed."""
        t0 = time.monotonic()
        _install_handlers()
        _LIVE.add(self)
        try:
            self._write_state()
            os.makedirs(self.rundir)
            os.makedirs(os.path.join(self.rundir, "logs"))
            self._build_network()
            self.timings["network"] = round(time.monotonic() - t0, 3)
            self._start_routers()
            if self.use_salt:
                self._start_salt()
            self._plug_present_vms()
            self._is_up = True
            self._write_state()
        except BaseException:
            self.progress(f"lab {self.prefix}: failed during up; removing everything")
            self.down()
            raise
        self.timings["up"] = round(time.monotonic() - t0, 3)
        self.progress(f"lab {self.prefix} is up in {self.timings['up']:.1f} s")
        return self

    def down(self) -> dict:
        """Remove everything: processes in our namespaces (salt, dnsmasq, dhclient, http...),
        namespaces, run dir, state file. Safe to call twice, from a signal handler, or on a
        half-built lab."""
        with self._down_lock:
            t0 = time.monotonic()
            for gw in list(self._gateways.values()):
                try:
                    gw.close()
                except Exception:  # noqa: BLE001
                    pass
            self._gateways.clear()
            result = state.destroy(self.prefix, reap=self.reap)
            self.reap()
            self._is_up = False
            _LIVE.discard(self)
            self.timings["down"] = round(time.monotonic() - t0, 3)
            return result

    def detach(self) -> None:
        """Leave the lab running after this process exits (``hanet_lab up``); ``down`` later."""
        self._owner = False
        self._attached = False  # the state must say: detached
        _LIVE.discard(self)
        for gw in list(self._gateways.values()):
            gw.close()
        self._gateways.clear()
        self._write_state()

    @classmethod
    def attach(cls, prefix: Optional[str] = None, progress=None) -> "Lab":
        """A Lab object for a lab already running on this machine (e.g. from ``hanet_lab up``).
        It does not tear the lab down on exit (call ``down()`` to do that)."""
        if prefix is None:
            running = state.recorded_prefixes()
            if len(running) != 1:
                raise LabError(f"give a prefix: running labs are {running or 'none'}")
            prefix = running[0]
        st = state.read_state(prefix)
        if not st:
            raise LabError(f"no lab {prefix} on this machine")
        lab = cls(
            Topology.from_dict(st["topology"]),
            prefix=prefix,
            salt=st.get("salt", True),
            checkout=st.get("checkout"),
            progress=progress,
        )
        lab.namespaces = st["namespaces"]
        lab.pids = st.get("pids", {})
        lab.ports = st.get("ports", {})
        lab.plugged = st.get("plugged", {})
        lab.rundir = st["rundir"]
        lab._owner = False
        lab._attached = True
        lab._is_up = True
        return lab

    def reap(self) -> None:
        """Collect the exit status of every process of ours that has died (SIGKILLed by a
        power loss or a test), so that none stays a zombie."""
        for p in list(self.procs.values()):
            try:
                p.poll()
            except Exception:  # noqa: BLE001
                pass

    def _write_state(self):
        data = {
            "prefix": self.prefix,
            "rundir": self.rundir,
            "checkout": self.checkout,
            "owner_pid": os.getpid() if self._owner else None,
            "owner_start": nslib.pid_start_time(os.getpid()) if self._owner else None,
            "owner_cmdline": nslib.cmdline(os.getpid()),
            "created": time.time(),
            "salt": self.use_salt,
            "namespaces": self.namespaces,
            "pids": self.pids,
            "ports": self.ports,
            "plugged": self.plugged,
            "up": self._is_up,
            "topology": self.topology.to_dict(),
        }
        old = state.read_state(self.prefix)
        if old and "created" in old:
            data["created"] = old["created"]
        if old and self._attached:
            # an attached handle (another process) must not take over or drop the ownership
            for key in ("owner_pid", "owner_start", "owner_cmdline"):
                data[key] = old.get(key)
        state.write_state(self.prefix, data)

    # -- network ------------------------------------------------------------------------------
    def ns(self, node: str) -> str:
        """The namespace name of a node (master, host, router, VM, or 'switch')."""
        if node in self.namespaces:
            return self.namespaces[node]
        if node in self.namespaces.values():
            return node
        raise KeyError(f"no node {node!r} in lab {self.prefix}")

    def _build_network(self):
        topo = self.topology
        self.progress(f"namespaces: {len(self.namespaces)} under prefix {self.prefix}-")
        for ns in self.namespaces.values():
            nslib.ns_create(ns)
            nslib.lo_up(ns)
        for seg in topo.segments:
            nslib.add_bridge(self.switch_ns, seg)
        used_ports = set()
        counter = itertools.count(1)
        for node in topo.nodes().values():
            ns = self.ns(node.name)
            self.ports[node.name] = {}
            for ifname, seg in node.links.items():
                port = f"{node.name}.{ifname}"
                if len(port) > 15 or port in used_ports or port in topo.segments:
                    port = f"p{next(counter)}"
                    while port in used_ports:
                        port = f"p{next(counter)}"
                used_ports.add(port)
                self.ports[node.name][ifname] = port
                nslib.add_veth(
                    ns,
                    ifname,
                    self.switch_ns,
                    port,
                    mac=node.macs.get(ifname),
                    peer_master=seg,
                    peer_alias=f"{node.name}:{ifname}",
                )
            for ifname, addrs in node.addresses.items():
                for a in addrs:
                    nslib.add_address(ns, ifname, a)
            if node.gateway:
                nslib.add_route(ns, "default", node.gateway)
            for r in node.routes:
                nslib.add_route(ns, r["dst"], r["via"])

    def _start_routers(self):
        for r in self.topology.routers.values():
            ns = self.ns(r.name)
            if r.forwarding:
                nslib.sysctl(ns, "net.ipv4.ip_forward", 1)
            if r.http_port:
                logf = os.path.join(self.rundir, f"http-{r.name}.log")
                open(logf, "w").close()
                self._spawn(
                    r.name,
                    f"httpd-{r.name}",
                    [_python(self.checkout), os.path.join(HERE, "httpd.py"), r.name, str(r.http_port), logf],
                )
            self.progress(f"router {r.name}: forwarding {'on' if r.forwarding else 'off'}, http on :{r.http_port}")

    def _spawn(self, node: str, name: str, argv: list[str], env: Optional[dict] = None) -> subprocess.Popen:
        self.reap()
        out = open(os.path.join(self.rundir, "logs", f"{name}.out"), "ab")
        p = subprocess.Popen(
            ["ip", "netns", "exec", self.ns(node)] + argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=self.rundir,
            env=env,
        )
        out.close()
        self.procs[name] = p
        self.pids[name] = p.pid
        return p

    # -- salt -----------------------------------------------------------------------------------
    @property
    def master_conf_dir(self) -> str:
        return self.master_conf_dir_of(None)

    @property
    def master_root(self) -> str:
        return self.master_root_of(None)

    def master_root_of(self, master: Optional[str]) -> str:
        """A master's root_dir: ``<rundir>/master`` for the first, ``<rundir>/<name>``
        for the others (topology.extra_masters)."""
        first = self.topology.master.name if self.topology.master else "master"
        name = master or first
        return os.path.join(self.rundir, "master" if name == first else name)

    def master_conf_dir_of(self, master: Optional[str]) -> str:
        return os.path.join(self.master_root_of(master), "etc", "salt")

    @property
    def masters(self) -> list[str]:
        """Every master's name, the first (the default ``via``) first."""
        return [m.name for m in self.topology.masters()]

    def master_ip_of(self, master: Optional[str] = None) -> str:
        node = self.topology.nodes()[master or self.masters[0]]
        return node.first_address(next(iter(node.addresses)))

    @property
    def master_ips(self) -> list[str]:
        return [self.master_ip_of(m) for m in self.masters]

    def _master_proc(self, master: Optional[str]) -> str:
        """The lab's process name of a master (``salt-master`` for the first)."""
        master = master or self.masters[0]
        return "salt-master" if master == self.masters[0] else f"salt-master-{master}"

    @property
    def record_opts(self) -> Optional[dict]:
        """The masters' ``hanet_record`` option (etcd when the topology has members), or
        None (the file record, in each master's cachedir)."""
        if not self.topology.etcd:
            return None
        eps = [f"http://{n.first_address(next(iter(n.addresses)))}:2379" for n in self.topology.etcd.values()]
        return {"backend": "etcd", "endpoints": eps, "prefix": f"/{self.prefix}/"}

    @property
    def pillar_dir(self) -> str:
        return os.path.join(self.rundir, "pillar")

    def minion_root(self, host: str) -> str:
        """The minion's root_dir: hanet writes under <root>/var/lib/hanet, <root>/run/hanet."""
        return os.path.join(self.rundir, "minions", host)

    def minion_conf_dir(self, host: str) -> str:
        return os.path.join(self.minion_root(host), "etc", "salt")

    def _daemon_env(self) -> dict:
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)  # modules must reach minions through saltutil.sync_all
        return env

    def _shared_master_keys(self):
        """Several masters share one key pair (Salt's multimaster tutorial: copy
        master.pem and master.pub): the minions then trust each of them. Generated here,
        before any master starts, into every master's pki dir."""
        import salt.crypt

        priv, pub = salt.crypt.gen_keys(2048)
        for m in self.masters:
            pki = os.path.join(self.master_conf_dir_of(m), "pki", "master")
            os.makedirs(pki, exist_ok=True)
            for name, text, mode in (("master.pem", priv, 0o400), ("master.pub", pub, 0o644)):
                path = os.path.join(pki, name)
                with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "w") as f:
                    f.write(text)

    def _write_salt_configs(self):
        topo = self.topology
        master_ip = self.master_ip_of(None)
        self.master_ip = master_ip
        os.makedirs(self.pillar_dir)
        record = self.record_opts
        for m in topo.masters():
            os.makedirs(self.master_conf_dir_of(m.name), exist_ok=True)
            mopts = {
                "root_dir": self.master_root_of(m.name),
                "interface": self.master_ip_of(m.name),
                "auto_accept": True,
                "file_roots": {"base": [os.path.join(self.checkout, "salt"), self.checkout]},
                # the checkout's hidden directories (the dev .venv: 23,000 files) are not
                # served: listing them made every saltutil.sync_* slow (README, install)
                "file_ignore_regex": [HIDDEN_IN_ROOTS],
                "pillar_roots": {"base": [self.pillar_dir]},
            }
            reactor = os.path.join(self.checkout, "reactor", "failover.sls")
            if os.path.exists(reactor):
                mopts["reactor"] = [{"salt/beacon/*/hanet_liveness/*": [reactor]}]
                prime = os.path.join(self.checkout, "reactor", "prime.sls")
                if os.path.exists(prime):
                    mopts["reactor"] += [{"salt/minion/*/start": [prime]}, {"hanet/prime": [prime]}]
            if os.path.exists(os.path.join(self.checkout, "_pillar", "hanet_owners.py")):
                # the failover record, as pillar; loaded from the checkout at master start
                # (a master loads a synced ext_pillar module only after a restart)
                mopts["ext_pillar"] = [{"hanet_owners": {}}]
                mopts["pillar_dirs"] = [os.path.join(self.checkout, "_pillar")]
                mopts["runner_dirs"] = [os.path.join(self.checkout, "_runners")]
            if os.path.exists(os.path.join(self.checkout, "_engines", "hanet_failover.py")):
                # the failover fast path beside the reactor (docs/failover.md); a topology
                # can turn it off with master opts {engines: []}
                mopts["engines_dirs"] = [os.path.join(self.checkout, "_engines")]
                mopts["engines"] = [{"hanet_failover": {}}]
            if record:
                mopts["hanet_record"] = record
            mopts.update(m.opts)
            with open(os.path.join(self.master_conf_dir_of(m.name), "master"), "w") as f:
                yaml.safe_dump(mopts, f, default_flow_style=False)
        if len(topo.masters()) > 1:
            self._shared_master_keys()
        with open(os.path.join(self.pillar_dir, "top.sls"), "w") as f:
            f.write("base:\n  '*':\n    - hanet\n")
        with open(os.path.join(self.pillar_dir, "hanet.sls"), "w") as f:
            f.write("#!yaml\n{}\n")
        for h in topo.hosts.values():
            os.makedirs(self.minion_conf_dir(h.name))
            # a host's /var and /var/lib are world-searchable (Salt would make <root>/var
            # 0750): its dnsmasqs, running as the dnsmasq user, read their files there
            for d in ("var", os.path.join("var", "lib")):
                os.makedirs(os.path.join(self.minion_root(h.name), d), exist_ok=True)
                os.chmod(os.path.join(self.minion_root(h.name), d), 0o755)
            opts = {"id": h.name, "master": master_ip, "root_dir": self.minion_root(h.name), "loop_interval": 1}
            if len(topo.masters()) > 1:
                # hot multi-master: signed in to every master, beacons run once (by the
                # first master's minion object) and their events go to every master;
                # beacons_before_connect: the beacons run even while the first master is
                # down (without it they would wait for it: docs/record.md)
                opts.update({"master": self.master_ips, "beacons_before_connect": True})
            opts.update(h.opts)
            with open(os.path.join(self.minion_conf_dir(h.name), "minion"), "w") as f:
                yaml.safe_dump(opts, f, default_flow_style=False)

    def _master_listening(self, master: Optional[str] = None) -> bool:
        pid = self.pids.get(self._master_proc(master))
        if not pid:
            return False
        want = f":{SALT_RET_PORT:04X}"
        try:
            with open(f"/proc/{pid}/net/tcp") as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[1].endswith(want) and parts[3] == "0A":
                        return True
        except OSError:
            return False
        return False

    def _wait(self, what: str, cond, timeout: float, interval: float = 0.1, procs=()):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            for name in procs:
                p = self.procs.get(name)
                if p is not None and p.poll() is not None:
                    raise LabError(
                        f"{name} exited with {p.returncode} while waiting for {what}; see {self.rundir}/logs/{name}.out"
                    )
            time.sleep(interval)
        raise LabError(f"timed out after {timeout:.0f} s waiting for {what}")

    def _start_etcd(self):
        from .etcd import EtcdCluster

        t0 = time.monotonic()
        members = [
            (name, self.ns(name), n.first_address(next(iter(n.addresses)))) for name, n in self.topology.etcd.items()
        ]
        self.etcd = EtcdCluster(self.prefix, members, self.rundir)
        self.etcd.start(timeout=self.start_timeout)
        for name, p in self.etcd.procs.items():
            self.pids[f"etcd-{name}"] = p.pid
        self.timings["etcd"] = round(time.monotonic() - t0, 3)
        self.progress(f"etcd: {len(members)} members healthy ({self.timings['etcd']:.1f} s)")

    def _spawn_master(self, master: Optional[str] = None):
        master = master or self.masters[0]
        return self._spawn(
            master,
            self._master_proc(master),
            [_venv_bin(self.checkout, "salt-master"), "-c", self.master_conf_dir_of(master), "-l", "quiet"],
            env=self._daemon_env(),
        )

    def clear_stale_minion_claim(self, host: str, wait: float = 5.0) -> None:
        """Before a salt-minion starts again after its processes were SIGKILLed: Salt
        keeps the pid of the running minion in ``process_responsibility_salt-minion.pid``
        and a new minion exits at once ("An instance is already running") while that
        process exists, a zombie included (psutil still names it). The killed minion's
        worker is reparented and reaped by init a moment later; until then a restarted
        minion died silently (seen in CI and here: every restarted minion gone). Waits
        for that process to exit, then removes the claim of a dead or zombie one."""
        path = os.path.join(self.minion_root(host), "var", "run", "process_responsibility_salt-minion.pid")
        try:
            with open(path) as f:
                pid = int(json.load(f).get("pid"))
        except (OSError, ValueError, TypeError, AttributeError):
            return
        from _hanet.daemon import process_gone

        deadline = time.monotonic() + wait
        while not process_gone(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if process_gone(pid):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def start_minion(self, host: str):
        """Start ``host``'s salt-minion (the lab starts every minion at ``up``)."""
        self.clear_stale_minion_claim(host)
        return self._spawn(
            host,
            f"salt-minion-{host}",
            [
                _venv_bin(self.checkout, "salt-minion"),
                "-c",
                self.minion_conf_dir(host),
                "-l",
                "info",
            ],  # its .out: why it stopped, if it does
            env=dict(self._daemon_env(), **self.minion_env.get(host, {})),
        )

    def _start_salt(self):
        t0 = time.monotonic()
        self._write_salt_configs()
        if self.topology.etcd:
            self._start_etcd()
        for m in self.masters:
            self._spawn_master(m)
        hosts = list(self.topology.hosts)
        # Minions start in parallel with the master: their imports (~4 s) overlap its own, and
        # the minion retries its first connection until the master answers.
        for h in hosts:
            self.start_minion(h)
        self.progress(f"salt: {len(self.masters)} master(s) + {len(hosts)} minions starting")
        for m in self.masters:
            self._wait(
                f"the salt-master {m} to listen",
                lambda m=m: self._master_listening(m),
                self.start_timeout,
                procs=[self._master_proc(m)],
            )
        self.timings["master_listening"] = round(time.monotonic() - t0, 3)
        for m in self.masters:
            accepted = os.path.join(self.master_conf_dir_of(m), "pki", "master", "minions")
            self._wait(
                f"minion keys on {m}",
                lambda a=accepted: all(os.path.exists(os.path.join(a, h)) for h in hosts),
                self.start_timeout,
                procs=[self._master_proc(m)] + [f"salt-minion-{h}" for h in hosts],
            )
        self.timings["keys_accepted"] = round(time.monotonic() - t0, 3)
        for m in self.masters:
            self._start_gateway(m)
            self.wait_minions(hosts, master=m)
        self.timings["minions_ping"] = round(time.monotonic() - t0, 3)
        self.progress(f"salt: {len(hosts)} minions answer test.ping ({self.timings['minions_ping']:.1f} s)")
        if self.do_sync:
            self.sync()
            self.timings["sync_all"] = round(time.monotonic() - t0, 3)
        self._write_state()

    def wait_minions(self, hosts: Sequence[str], master: Optional[str] = None, timeout: Optional[float] = None) -> None:
        """Until every one of ``hosts`` answers test.ping through ``master``."""
        missing = set(hosts)
        deadline = time.monotonic() + (timeout or self.start_timeout)
        last_error = None
        while missing:
            if time.monotonic() > deadline:
                raise LabError(
                    f"minions not answering test.ping via {master or self.via}: {sorted(missing)} ({last_error})"
                )
            try:
                got = self.salt(sorted(missing), "test.ping", tgt_type="list", timeout=5, master=master)
            except LabError as e:  # the master's request server is not answering yet (busy machine)
                last_error = str(e).splitlines()[0]
                time.sleep(0.5)
                continue
            missing -= {k for k, v in got.items() if v is True}
            if missing:
                time.sleep(0.5)

    def stop_master(self, master: Optional[str] = None) -> float:
        """A salt-master dies (SIGKILL to it and every process it forked, as in a crash
        or a power loss of the master's host); the lab's salt gateway to it goes with it
        and comes back with the next call after ``start_master``. With several masters,
        salt calls then go through another master that runs (``via``). Returns when
        (epoch)."""
        at = time.time()
        master = master or self.masters[0]
        with self._gw_lock:
            gw = self._gateways.pop(master, None)
            if gw is not None:
                gw.close()
        for pid, cmd in self.processes(master).get(master, []):
            if "salt-master" in cmd or "saltgw" in cmd:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        p = self.procs.get(self._master_proc(master))
        if p is not None:
            p.wait(10)
        self._wait(
            f"the salt-master {master} to be gone",
            lambda: not any("salt-master" in c for _, c in self.processes(master).get(master, [])),
            10,
        )
        if self.via == master:
            alive = [m for m in self.masters if m != master and self.master_running(m)]
            if alive:
                self.via = alive[0]
        return at

    def master_running(self, master: Optional[str] = None) -> bool:
        p = self.procs.get(self._master_proc(master))
        if p is not None:
            return p.poll() is None
        master = master or self.masters[0]
        return any("salt-master" in c for _, c in self.processes(master).get(master, []))

    def start_master(self, wait_minions: bool = True, master: Optional[str] = None) -> float:
        """Start a salt-master again (same configuration, keys and cachedir). With
        ``wait_minions``, until every running minion answers test.ping through it.
        Returns when (epoch) it was started."""
        at = time.time()
        master = master or self.masters[0]
        self._spawn_master(master)
        self._wait(
            f"the salt-master {master} to listen",
            lambda: self._master_listening(master),
            self.start_timeout,
            procs=[self._master_proc(master)],
        )
        if wait_minions:
            running = {
                h
                for h, plist in self.processes().items()
                if h in self.topology.hosts and any("salt-minion" in c for _, c in plist)
            }
            try:
                self.wait_minions(sorted(running), master=master)
            except LabError as e:
                raise LabError(f"minions not back after the master restart: {e}") from e
        return at

    def _start_gateway(self, master: Optional[str] = None):
        master = master or self.via
        with self._gw_lock:
            gw = self._gateways.get(master)
            if gw is not None and gw.proc.poll() is None:
                return gw
            os.makedirs(os.path.join(self.rundir, "logs"), exist_ok=True)
            first = master == self.masters[0]
            name = f"saltgw-{os.getpid()}" if first else f"saltgw-{master}-{os.getpid()}"
            argv = [
                "ip",
                "netns",
                "exec",
                self.ns(master),
                _python(self.checkout),
                os.path.join(HERE, "saltgw.py"),
                os.path.join(self.master_conf_dir_of(master), "master"),
            ]
            gw = self._gateways[master] = _Gateway(
                argv, os.path.join(self.rundir, "logs", f"{name}.out"), self._daemon_env()
            )
            self.procs[name] = gw.proc
            return gw

    def _gw(self, master: Optional[str] = None) -> _Gateway:
        if not self.use_salt:
            raise LabError("this lab runs without salt")
        master = master or self.via
        gw = self._gateways.get(master)
        if gw is None or gw.proc.poll() is not None:
            gw = self._start_gateway(master)
        return gw

    def salt(
        self,
        tgt: Union[str, Sequence[str]],
        fun: str,
        arg: Sequence = (),
        kwarg: Optional[dict] = None,
        timeout: float = 30,
        tgt_type: str = "glob",
        full_return: bool = False,
        master: Optional[str] = None,
    ) -> dict:
        """Run an execution function through a master (LocalClient.cmd; ``master``:
        default ``via``): {minion: return}. Minions that do not answer within
        ``timeout`` are absent from the result."""
        if not isinstance(tgt, str):
            tgt = list(tgt)
            tgt_type = "list"
        return self._gw(master).call(
            "cmd",
            timeout + 30,
            tgt=tgt,
            fun=fun,
            arg=list(arg),
            kwarg=kwarg or {},
            timeout=timeout,
            tgt_type=tgt_type,
            full_return=full_return,
        )

    def salt_run(
        self,
        fun: str,
        arg: Sequence = (),
        kwarg: Optional[dict] = None,
        timeout: float = 120,
        master: Optional[str] = None,
    ) -> Any:
        """Run a runner on a master (RunnerClient.cmd; ``master``: default ``via``)."""
        return self._gw(master).call("run", timeout, fun=fun, arg=list(arg), kwarg=kwarg or {})

    def salt_wheel(
        self,
        fun: str,
        arg: Sequence = (),
        kwarg: Optional[dict] = None,
        timeout: float = 60,
        master: Optional[str] = None,
    ) -> Any:
        return self._gw(master).call("wheel", timeout, fun=fun, arg=list(arg), kwarg=kwarg or {})

    def owners(self, master: Optional[str] = None) -> dict:
        """The failover record, {network: entry}, read the way the masters read it: the
        etcd cluster (from inside a master's namespace) or the first master's file."""
        record = self.record_opts
        if record is None:
            from _hanet import failover

            return failover.read_owners(os.path.join(self.master_root_of(master), "var", "cache", "salt", "master"))
        from _hanet import record as rec

        from .etcd import in_netns

        opts = {
            "cachedir": os.path.join(self.master_root_of(master), "var", "cache", "salt", "master"),
            "hanet_record": dict(record, timeout=2),
        }
        return in_netns(self.ns(master or self.via), lambda: rec.read_owners(opts), timeout=10)

    def etcd_kill(self, member: str) -> None:
        """SIGKILL one etcd member (its data dir stays: ``etcd_start`` brings it back)."""
        if self.etcd is not None and self.etcd.procs.get(member) is not None:
            self.etcd.kill(member)
            return
        for pid, cmd in self.processes(member).get(member, []):  # an attached lab
            if "etcd" in cmd:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass

    def etcd_running(self, member: str) -> bool:
        return any("etcd" in c for _, c in self.processes(member).get(member, []))

    def etcd_start(self, member: str, wait: bool = True) -> None:
        """Start an etcd member again with its data dir (``wait``: until it is healthy)."""
        if self.etcd is None:
            from .etcd import EtcdCluster

            members = [
                (name, self.ns(name), n.first_address(next(iter(n.addresses))))
                for name, n in self.topology.etcd.items()
            ]
            self.etcd = EtcdCluster(self.prefix, members, self.rundir)
        self.etcd.start_member(member, wait=wait, timeout=self.start_timeout)
        self.pids[f"etcd-{member}"] = self.etcd.procs[member].pid
        if self._is_up:
            self._write_state()

    def salt_call(self, host: str, fun: str, *args: str, local: bool = False, timeout: float = 120) -> Any:
        """``salt-call`` inside a host's namespace with its minion config; returns the value."""
        argv = [_venv_bin(self.checkout, "salt-call"), "-c", self.minion_conf_dir(host), "--out", "json", "-l", "quiet"]
        if local:
            argv.append("--local")
        cp = self.exec(host, argv + [fun] + [str(a) for a in args], timeout=timeout, env=self._daemon_env())
        try:
            return json.loads(cp.stdout)["local"]
        except (ValueError, KeyError) as e:
            raise LabError(f"salt-call {fun} on {host}: rc={cp.returncode}\n{cp.stdout}\n{cp.stderr}") from e

    def serving(self, host: str) -> dict:
        """``hanet.serving`` of ``host`` ({networks, epochs, peers, lost}), or {} when it
        does not answer with one (its minion starting, an error text)."""
        got = self.salt(host, "hanet.serving", timeout=10).get(host)
        return got if isinstance(got, dict) else {}

    def events(self, master: Optional[str] = None) -> EventListener:
        """A master's event bus listener (``master``: default ``via``); use as a context
        manager, call ``.wait(tag, timeout)``."""
        return EventListener(self, master)

    def sync(self, tgt: str = "*", timeout: float = 120) -> dict:
        """saltutil.sync_all on minions (and saltutil.sync_all on the master for runners)."""
        t0 = time.monotonic()
        res = self.salt(tgt, "saltutil.sync_all", timeout=timeout)
        missing = set(self.topology.hosts) - set(res) if tgt == "*" else set()
        if missing:
            raise LabError(f"saltutil.sync_all: no answer from {sorted(missing)}")
        for m in self.masters:
            if not self.master_running(m):
                continue
            try:
                self.salt_run("saltutil.sync_all", timeout=timeout, master=m)
            except LabError as e:
                log.warning("master-side saltutil.sync_all on %s failed: %s", m, e)
        self.progress(f"salt: saltutil.sync_all done ({time.monotonic() - t0:.1f} s)")
        return res

    def set_pillar(self, data: Union[dict, str], refresh: bool = True, timeout: float = 60) -> None:
        """Serve ``data`` as the whole pillar of every minion (written as hanet.sls, top '*').

        ``data``: a dict (e.g. ``{'hanet': {...}}``), YAML text, or a path to an SLS file.
        Then saltutil.refresh_pillar on all minions (waiting for it)."""
        if isinstance(data, str):
            text = data
            if "\n" not in data and os.path.exists(data):
                with open(data) as f:
                    text = f.read()
            data = yaml.safe_load(text) or {}
        tmp = os.path.join(self.pillar_dir, ".hanet.sls.tmp")
        with open(tmp, "w") as f:
            f.write("#!yaml\n")
            yaml.safe_dump(data, f, default_flow_style=False, sort_keys=False)
        os.replace(tmp, os.path.join(self.pillar_dir, "hanet.sls"))
        if refresh and self.topology.hosts:
            res = self.salt("*", "saltutil.refresh_pillar", kwarg={"wait": True}, timeout=timeout)
            missing = set(self.topology.hosts) - set(res)
            if missing:
                raise LabError(f"refresh_pillar: no answer from {sorted(missing)}")

    def functions(self, module: str = "hanet", tgt: Optional[str] = None) -> list[str]:
        """The execution functions of ``module`` loaded on a minion (sys.list_functions)."""
        tgt = tgt or next(iter(self.topology.hosts))
        return self.salt(tgt, "sys.list_functions", [module]).get(tgt) or []

    # -- processes and commands -------------------------------------------------------------------
    def exec(
        self,
        node: str,
        argv: Union[str, Sequence[str]],
        timeout: float = 60,
        check: bool = False,
        input: Optional[str] = None,
        env: Optional[dict] = None,
    ) -> subprocess.CompletedProcess:
        """Run a command inside a node's namespace (``ip netns exec``); text output captured.
        A string is run with ``sh -c``."""
        if isinstance(argv, str):
            argv = ["sh", "-c", argv]
        return subprocess.run(
            ["ip", "netns", "exec", self.ns(node)] + list(argv),
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            check=check,
            input=input,
            env=env,
        )

    def popen(self, node: str, argv: Sequence[str], name: Optional[str] = None, **kw) -> subprocess.Popen:
        """Start a long-running process in a node's namespace (killed by ``down``)."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("start_new_session", True)
        p = subprocess.Popen(["ip", "netns", "exec", self.ns(node)] + list(argv), **kw)
        self.procs[name or f"{node}-{p.pid}"] = p
        return p

    def processes(self, node: Optional[str] = None) -> dict[str, list[tuple[int, str]]]:
        """Processes in our namespaces: node -> [(pid, cmdline)]."""
        nodes = [node] if node else list(self.namespaces)
        by_ino = {nslib.ns_inode(self.ns(n)): n for n in nodes}
        out = {n: [] for n in nodes}
        for pid in nslib.pids_in(by_ino):
            n = by_ino.get(nslib.pid_netns(pid))
            if n:
                out[n].append((pid, nslib.cmdline(pid)))
        return out

    def memory(self) -> dict[str, dict]:
        """PSS (KiB, from /proc/<pid>/smaps_rollup) of every process, by node."""
        out = {}
        gw_pids = {p.pid for n, p in self.procs.items() if n.startswith("saltgw-")}
        for node, procs in self.processes().items():
            rows = [(pid, cl, _pss_kib(pid) or 0) for pid, cl in procs]
            out[node] = {
                "pss_kib": sum(r[2] for r in rows if r[0] not in gw_pids),
                "processes": [
                    {"pid": p, "cmdline": c[:120], "pss_kib": k, "gateway": p in gw_pids} for p, c, k in rows
                ],
            }
        return out

    # -- looking at the network -----------------------------------------------------------------
    def links(self, node: str) -> list[str]:
        return nslib.link_names(self.ns(node))

    def addresses(self, node: str, ifname: Optional[str] = None) -> list[str]:
        return nslib.addresses(self.ns(node), ifname)

    def mac(self, node: str, ifname: str) -> str:
        return nslib.link_mac(self.ns(node), ifname)

    def arp_cache(self, node: str) -> dict[str, dict]:
        """The node's IPv4 neighbour table: ip -> {mac, state, ifname}."""
        return nslib.neighbours(self.ns(node))

    def ping(self, node: str, ip: str, count: int = 1, timeout: float = 2.0, interval: float = 0.2) -> bool:
        """True when ``ip`` answers at least one of ``count`` pings from ``node``."""
        wait = max(1, int(round(timeout)))
        cp = self.exec(
            node,
            ["ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-W", str(wait), ip],
            timeout=timeout * count + 10,
        )
        return cp.returncode == 0

    def http_get(self, node: str, url: str, timeout: float = 5.0) -> str:
        """GET ``url`` from inside ``node``; returns the body (raises LabError on failure)."""
        cp = self.exec(node, ["curl", "-sS", "--max-time", str(timeout), url], timeout=timeout + 10)
        if cp.returncode != 0:
            raise LabError(f"GET {url} from {node}: {cp.stderr.strip()}")
        return cp.stdout

    def resolve(self, node: str, name: str, server: str) -> list[str]:
        """The IPv4 addresses ``server`` gives for ``name``, asked from inside ``node``
        (busybox nslookup); [] when it has none."""
        cp = self.exec(node, ["busybox", "nslookup", "-type=a", name, server], timeout=20)
        out, seen_name = [], False
        for line in cp.stdout.splitlines():
            if line.startswith("Name:"):
                seen_name = True
            elif seen_name and line.startswith("Address"):
                out.append(line.split()[-1])
        return out

    def router_log(self, router: str = "router") -> list[tuple[str, str, str]]:
        """Requests the router's web server saw: [(client_ip, method, path)]."""
        path = os.path.join(self.rundir, f"http-{router}.log")
        try:
            with open(path) as f:
                return [tuple(line.split(" ", 2)) for line in f.read().splitlines() if line]
        except FileNotFoundError:
            return []

    # -- VMs --------------------------------------------------------------------------------------
    def vm_tap(self, vm: str, nic: int = 0) -> str:
        return self.topology.vms[vm].tap(nic)

    def plug_vm(self, name: str, host: Optional[str] = None) -> list[str]:
        """Boot a VM's NICs: a veth per NIC (VM side: its ifname + MAC; host side: its tap,
        with libvirt's tap MAC) with the tap enslaved to the NIC's bridge inside the host namespace. ``host``
        overrides the VM's host (e.g. after a migration). Returns the tap names."""
        vm = self.topology.vms[name]
        host = host or vm.host
        if name in self.plugged:
            if self.plugged[name]["host"] == host:
                return self.plugged[name]["taps"]
            self.unplug_vm(name)
        hns, vns = self.ns(host), self.ns(name)
        for nic in vm.nics:
            if not nslib.has_link(hns, nic.bridge):
                raise LabError(f"{host} has no bridge {nic.bridge} yet (for {name}.{nic.ifname})")
        taps = []
        for i, nic in enumerate(vm.nics):
            tap = vm.tap(i)
            # the host side carries libvirt's tap MAC (guest MAC, first octet fe; fa for an
            # fe guest): hanet binds each NIC's (MAC, IP) to the port carrying it
            tap_mac = ("fa" if nic.mac.lower()[:2] == "fe" else "fe") + nic.mac.lower()[2:]
            nslib.add_veth(
                vns,
                nic.ifname,
                hns,
                tap,
                mac=nic.mac,
                peer_mac=tap_mac,
                mtu=nic.mtu,
                peer_master=nic.bridge,
                peer_alias=f"{name}:{nic.ifname}",
            )
            taps.append(tap)
        self.plugged[name] = {"host": host, "taps": taps}
        if self._is_up:
            self._write_state()
        return taps

    def unplug_vm(self, name: str) -> None:
        """Remove the VM's NICs (the host-side taps go with them)."""
        vm = self.topology.vms[name]
        for nic in vm.nics:
            try:
                nslib.del_link(self.ns(name), nic.ifname)
            except FileNotFoundError:
                pass
        self.plugged.pop(name, None)
        if self._is_up:
            self._write_state()

    def move_vm(self, name: str, host: str) -> list[str]:
        """Live-migrate ``name`` to ``host``: its taps move into ``host``'s namespace, onto
        the same bridges; the VM's side (addresses, routes, ARP cache, DHCP client) stays
        as it was, as a live migration leaves the guest. Returns the tap names."""
        vm = self.topology.vms[name]
        was = self.plugged.get(name)
        if was is None:
            raise LabError(f"{name} is not plugged: plug_vm it first")
        if was["host"] == host:
            return was["taps"]
        for nic in vm.nics:
            if not nslib.has_link(self.ns(host), nic.bridge):
                raise LabError(f"{host} has no bridge {nic.bridge} yet (for {name}.{nic.ifname})")
        for i, nic in enumerate(vm.nics):
            nslib.move_link(self.ns(was["host"]), vm.tap(i), self.ns(host))
            nslib.set_master(self.ns(host), vm.tap(i), nic.bridge)
        self.plugged[name] = {"host": host, "taps": was["taps"]}
        if self._is_up:
            self._write_state()
        return was["taps"]

    def _plug_present_vms(self):
        for name, vm in self.topology.vms.items():
            if all(nslib.has_link(self.ns(vm.host), nic.bridge) for nic in vm.nics):
                self.plug_vm(name)
                self.progress(f"vm {name}: plugged into {vm.host}")

    def _dhcp_scripts(self, vm: str, ifname: str, client: str) -> tuple[str, str]:
        d = os.path.join(self.rundir, "vms", vm)
        os.makedirs(d, exist_ok=True)
        out = os.path.join(d, f"{client}-{ifname}.env")
        script = os.path.join(d, f"{client}-script")
        ip = shutil.which("ip") or "/sbin/ip"
        if client == "dhclient":
            body = f"""#!/bin/sh
# hanet lab dhclient script: set the address, MTU and default route; record the lease.
PATH=/usr/sbin:/usr/bin:/sbin:/bin; export PATH
case "$reason" in
  PREINIT) {ip} link set dev "$interface" up ;;
  BOUND|RENEW|REBIND|REBOOT)
    {ip} -4 addr flush dev "$interface"
    [ -n "$new_interface_mtu" ] && {ip} link set dev "$interface" mtu "$new_interface_mtu"
    {ip} -4 addr add "$new_ip_address/$new_subnet_mask" dev "$interface"
    for r in $new_routers; do {ip} -4 route add default via "$r" dev "$interface" 2>/dev/null; break; done
    env | grep -E '^(new_|old_|interface=|reason=)' > "{out}.tmp" && mv "{out}.tmp" "{out}" ;;
esac
exit 0
"""
        else:
            body = f"""#!/bin/sh
# hanet lab udhcpc script: set the address, MTU and default route; record the lease.
PATH=/usr/sbin:/usr/bin:/sbin:/bin; export PATH
case "$1" in
  deconfig) {ip} -4 addr flush dev "$interface"; {ip} link set dev "$interface" up ;;
  bound|renew)
    {ip} -4 addr flush dev "$interface"
    [ -n "$mtu" ] && {ip} link set dev "$interface" mtu "$mtu"
    {ip} -4 addr add "$ip/$subnet" dev "$interface"
    for r in $router; do {ip} -4 route add default via "$r" dev "$interface" 2>/dev/null; break; done
    env | grep -E '^(ip|subnet|router|dns|domain|mtu|interface|lease|serverid|hostname|broadcast|staticroutes|search)=' > "{out}.tmp" && mv "{out}.tmp" "{out}" ;;
esac
exit 0
"""
        with open(script, "w") as f:
            f.write(body)
        os.chmod(script, 0o755)
        return script, out

    def dhcp(
        self,
        vm: str,
        client: str = "dhclient",
        ifname: str = "eth0",
        timeout: float = 15,
        keep: bool = False,
        check: bool = True,
    ) -> Optional[dict]:
        """Run a real DHCP client once in the VM and configure what it got. Returns
        {client, ifname, address, prefixlen, router, routers, dns, domain, mtu, server, raw}
        (None if no lease and ``check`` is False). ``client``: 'dhclient' or 'udhcpc'.
        ``keep``: leave dhclient running (to renew) instead of stopping it after the lease."""
        if client not in ("dhclient", "udhcpc"):
            raise ValueError(client)
        script, out = self._dhcp_scripts(vm, ifname, client)
        if os.path.exists(out):
            os.unlink(out)
        d = os.path.dirname(out)
        if client == "dhclient":
            conf = os.path.join(d, "dhclient.conf")
            with open(conf, "w") as f:
                f.write(
                    f"timeout {int(timeout)};\nretry 1;\ninitial-interval 1;\n"
                    "option rfc3442-classless-static-routes code 121 = array of unsigned integer 8;\n"
                    "request subnet-mask, broadcast-address, time-offset, routers, domain-name,\n"
                    "  domain-name-servers, domain-search, host-name, interface-mtu,\n"
                    "  rfc3442-classless-static-routes;\n"
                )
            pidf = os.path.join(d, f"dhclient-{ifname}.pid")
            # In the foreground (-d): no race with a daemonizing child; stopped once the
            # script has recorded the lease (unless keep=True: then `down` stops it).
            argv = [
                "dhclient",
                "-d",
                "-1",
                "-v",
                "-cf",
                conf,
                "-sf",
                script,
                "-pf",
                pidf,
                "-lf",
                os.path.join(d, f"dhclient-{ifname}.leases"),
                ifname,
            ]
            logf = os.path.join(d, f"dhclient-{ifname}.log")
            with open(logf, "w") as log_out:
                proc = self.popen(vm, argv, name=f"dhclient-{vm}-{ifname}", stdout=log_out, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + timeout + 5
            while time.monotonic() < deadline and not os.path.exists(out) and proc.poll() is None:
                time.sleep(0.05)
            if not keep or not os.path.exists(out):
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            with open(logf) as f:
                cp = subprocess.CompletedProcess(argv, proc.returncode, f.read(), "")
        else:
            udhcpc = shutil.which("udhcpc")
            base = [udhcpc] if udhcpc else ["busybox", "udhcpc"]
            argv = base + [
                "-i",
                ifname,
                "-f",
                "-q",
                "-n",
                "-t",
                str(max(1, int(timeout))),
                "-T",
                "1",
                "-A",
                "1",
                "-O",
                "mtu",
                "-O",
                "staticroutes",
                "-O",
                "search",
                "-s",
                script,
            ]
            cp = self.exec(vm, argv, timeout=timeout + 15)
        if not os.path.exists(out):
            if check:
                raise LabError(f"{client} in {vm} got no lease (rc={cp.returncode}):\n{cp.stdout}{cp.stderr}")
            return None
        raw = {}
        with open(out) as f:
            for line in f.read().splitlines():
                if "=" in line:
                    k, v = line.split("=", 1)
                    raw[k] = v
        if client == "dhclient":
            addr, mask = raw.get("new_ip_address"), raw.get("new_subnet_mask")
            routers = raw.get("new_routers", "").split()
            dns = raw.get("new_domain_name_servers", "").split()
            domain, mtu, server = (
                raw.get("new_domain_name"),
                raw.get("new_interface_mtu"),
                raw.get("new_dhcp_server_identifier"),
            )
        else:
            addr, mask = raw.get("ip"), raw.get("subnet")
            routers = raw.get("router", "").split()
            dns = raw.get("dns", "").split()
            domain, mtu, server = raw.get("domain"), raw.get("mtu"), raw.get("serverid")
        plen = ipaddress.ip_network(f"0.0.0.0/{mask}").prefixlen if mask else None
        return {
            "client": client,
            "ifname": ifname,
            "address": addr,
            "prefixlen": plen,
            "router": routers[0] if routers else None,
            "routers": routers,
            "dns": dns,
            "domain": domain,
            "mtu": int(mtu) if mtu else None,
            "server": server,
            "raw": raw,
        }

    # -- description ------------------------------------------------------------------------------
    def describe(self) -> str:
        """A readable description of the topology and where everything lives."""
        t = self.topology
        lines = [f"lab {self.prefix}  (run dir {self.rundir})", "", "segments (bridges in the switch namespace):"]
        members = {s: [] for s in t.segments}
        for node in t.nodes().values():
            for ifname, seg in node.links.items():
                members[seg].append(f"{node.name}:{ifname}")
        for seg in t.segments:
            lines.append(f"  {seg:<12} {', '.join(members[seg]) or '-'}")
        lines.append("")
        lines.append("nodes (one network namespace each):")
        for node in t.nodes().values():
            kind = (
                "master"
                if node.name in self.masters
                else "etcd"
                if node.name in t.etcd
                else "router"
                if node.name in t.routers
                else "host"
            )
            addrs = ", ".join(f"{i} {a}" for i, al in node.addresses.items() for a in al)
            gw = f", default via {node.gateway}" if node.gateway else ""
            lines.append(f"  {node.name:<10} {kind:<7} {self.ns(node.name)}")
            lines.append(f"  {'':<10} {'':<7} links: {', '.join(node.links)}; {addrs}{gw}")
        if t.vms:
            lines.append("")
            lines.append("VMs (namespaces; NICs plugged into a bridge inside their host):")
            for vm in t.vms.values():
                nics = ", ".join(f"{n.ifname} {n.mac} -> {vm.host}:{n.bridge}" for n in vm.nics)
                plugged = "plugged" if vm.name in self.plugged else "not plugged yet"
                lines.append(f"  {vm.name:<10} {nics}  ({plugged})")
        return "\n".join(lines)
