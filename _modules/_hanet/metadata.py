"""hanet's local metadata service (metadata_host 127.0.0.1), and its applier.

A small stdlib HTTP server that tells each instance, recognised by the request's
*source IP*, its own OpenStack and EC2 metadata, from the ``InstanceRecord``s that
``write_records`` keeps as JSON under the state dir. It never answers with another
instance's data: an unknown source gets 404 (``X-Forwarded-For`` is ignored, a VM could
forge it). It re-reads the records file when it changes, so record changes need no
restart. It listens on ``metadata_port`` on all the host's addresses, so the ruleset's
REDIRECT of 169.254.169.254:80 and a hardware router's forward both reach it; the
ruleset's input chain accepts that port only from the VM bridges and the loopback, and
drops it from everywhere else (public and management interfaces).

It is built to serve many idle or hostile VMs: a connection that sends nothing for
``CONNECTION_TIMEOUT_S``, or still open ``CONNECTION_DEADLINE_S`` after it was accepted,
is closed, one source address holds at most ``MAX_PER_SOURCE``
connections at once and the service ``MAX_CONNECTIONS`` (more are closed at once,
unanswered), and its log (``--log``) is kept under ``LOG_MAX_BYTES``, with one older
copy (``metadata.log.1``).

Run it::

    python -m _hanet.metadata --records FILE --port 8775 --bind 0.0.0.0 --pidfile=FILE [--log FILE] [--daemonize]

Paths it serves (any EC2 date version and any OpenStack date version read as latest):

- ``/openstack/`` (versions), ``/openstack/latest/`` (listing),
  ``/openstack/latest/meta_data.json`` (uuid, name, hostname, public_keys,
  availability_zone, launch_index, meta), ``/openstack/latest/user_data``
- ``/`` (versions), ``/latest/meta-data/`` (listing), ``/latest/meta-data/instance-id``
  (``i-`` and the uuid's first 8 hex digits), ``hostname``, ``local-hostname``,
  ``local-ipv4`` (the address asked from), ``placement/availability-zone``,
  ``public-keys/``, ``public-keys/0/openssh-key``, ``/latest/user-data``

Files: ``var/lib/hanet/metadata/records.json`` (the records),
``var/lib/hanet/metadata/service.json`` (what runs: port, bind),
``var/lib/hanet/metadata/metadata.log``, ``run/hanet/metadata.pid``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from . import daemon
from .common import Change, read_text, write_atomic

FACET = "metadata"
NAME = "metadata"
BIND = "0.0.0.0"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
CONNECTION_TIMEOUT_S = 10.0  # a connection idle this long is closed
MAX_PER_SOURCE = 8  # connections one VM (source address) may hold at once
MAX_CONNECTIONS = 256  # connections the service holds at once
LOG_MAX_BYTES = 1 << 20  # the log is rotated (one older copy) past this size
CONNECTION_DEADLINE_S = 30.0  # a connection is closed this long after it opened, whatever it sends
# what the running service can do; a service started by an older hanet (another version)
# is restarted by the next apply, so that the limits above reach it
SERVICE_VERSION = 2
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def files(paths):
    return {
        "records": paths.state("metadata", "records.json"),
        "service": paths.state("metadata", "service.json"),
        "log": paths.state("metadata", "metadata.log"),
        "log_old": paths.state("metadata", "metadata.log.1"),  # the rotated log (it names VMs' addresses)
        "pid": paths.run("metadata.pid"),
    }


# --------------------------------------------------------------------------- records


def records_text(records) -> str:
    """The records file's content for ``records`` (InstanceRecord or plain dicts)."""
    plain = []
    for rec in records:
        data = dataclasses.asdict(rec) if dataclasses.is_dataclass(rec) and not isinstance(rec, type) else dict(rec)
        data["ips"] = list(data.get("ips", ()))
        data["public_keys"] = [list(k) for k in data.get("public_keys", ())]
        plain.append(data)
    plain.sort(key=lambda d: d["name"])
    return json.dumps({"records": plain}, indent=1, sort_keys=True) + "\n"


def write_records(records, paths) -> bool:
    """Write the records file; True if its content changed (the service picks it up)."""
    return write_atomic(files(paths)["records"], records_text(records), mode=0o600)


def load_records(path) -> dict:
    """``{ip: record dict}`` from a records file (empty when missing or unreadable)."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return {}
    out = {}
    for rec in data.get("records", []) if isinstance(data, dict) else []:
        if not isinstance(rec, dict):
            continue
        for ip in rec.get("ips", []):
            out[str(ip)] = rec
    return out


# --------------------------------------------------------------------------- the server


class Records:
    """The records by source IP, re-read whenever the file's mtime (or size) changes."""

    def __init__(self, path):
        self.path = path
        self._lock = threading.Lock()
        self._stamp = None
        self._by_ip = {}

    def lookup(self, ip):
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            stamp = None
        with self._lock:
            if stamp != self._stamp:
                self._by_ip = load_records(self.path) if stamp else {}
                self._stamp = stamp
            return self._by_ip.get(ip)


def instance_id(rec):
    return "i-" + str(rec.get("uuid", "")).replace("-", "")[:8]


def _keys(rec):
    return [(str(k[0]), str(k[1])) for k in rec.get("public_keys", []) if len(k) == 2]


def render(rec, source_ip, path):
    """``(status, content_type, body)`` for ``path`` asked by ``source_ip`` owning ``rec``."""
    parts = [p for p in path.split("?", 1)[0].split("/") if p]
    text = "text/plain; charset=utf-8"
    if not parts:
        return 200, text, "latest\n"
    if parts[0] == "openstack":
        if len(parts) == 1:
            return 200, text, "latest\n"
        if parts[1] != "latest" and not _DATE.match(parts[1]):
            return 404, text, "not found\n"
        rest = parts[2:]
        if not rest:
            return 200, text, "meta_data.json\n" + ("user_data\n" if rec.get("user_data") else "")
        if rest == ["meta_data.json"]:
            body = {
                "uuid": rec.get("uuid"),
                "name": rec.get("name"),
                "hostname": rec.get("hostname"),
                "availability_zone": rec.get("availability_zone", "nova"),
                "public_keys": dict(_keys(rec)),
                "launch_index": 0,
                "meta": {},
            }
            return 200, "application/json", json.dumps(body, sort_keys=True)
        if rest == ["user_data"] and rec.get("user_data"):
            return 200, "application/octet-stream", rec["user_data"]
        return 404, text, "not found\n"
    if parts[0] != "latest" and not _DATE.match(parts[0]):
        return 404, text, "not found\n"
    rest = parts[1:]
    if not rest:
        return 200, text, "meta-data/\n" + ("user-data\n" if rec.get("user_data") else "")
    if rest == ["user-data"]:
        if rec.get("user_data"):
            return 200, "application/octet-stream", rec["user_data"]
        return 404, text, "not found\n"
    if rest[0] != "meta-data":
        return 404, text, "not found\n"
    keys = _keys(rec)
    meta = {
        "instance-id": instance_id(rec),
        "hostname": rec.get("hostname", ""),
        "local-hostname": rec.get("hostname", ""),
        "local-ipv4": source_ip,
        "placement/availability-zone": rec.get("availability_zone", "nova"),
    }
    sub = "/".join(rest[1:])
    if not sub:
        listing = ["hostname", "instance-id", "local-hostname", "local-ipv4", "placement/"]
        if keys:
            listing.append("public-keys/")
        return 200, text, "\n".join(listing) + "\n"
    if sub in meta:
        return 200, text, meta[sub]
    if sub == "placement":
        return 200, text, "availability-zone\n"
    if sub == "public-keys" and keys:
        return 200, text, "".join(f"{i}={name}\n" for i, (name, _) in enumerate(keys))
    m = re.match(r"^public-keys/(\d+)(?:/(openssh-key))?$", sub)
    if m and int(m.group(1)) < len(keys):
        if m.group(2):
            return 200, text, keys[int(m.group(1))][1]
        return 200, text, "openssh-key\n"
    return 404, text, "not found\n"


class Handler(BaseHTTPRequestHandler):
    server_version = "hanet-metadata"
    protocol_version = "HTTP/1.0"
    timeout = CONNECTION_TIMEOUT_S  # the socket's timeout: an idle client is dropped
    deadline = CONNECTION_DEADLINE_S  # and one that trickles a byte at a time, at this age

    def setup(self):
        super().setup()
        # the socket timeout bounds each read; this bounds the whole connection
        self._deadline = threading.Timer(self.deadline, self._expire)
        self._deadline.daemon = True
        self._deadline.start()

    def _expire(self):
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def finish(self):
        self._deadline.cancel()
        super().finish()

    def do_GET(self):  # noqa: N802 (http.server's naming)
        try:
            source = self.client_address[0]
            if source.startswith("::ffff:"):
                source = source[len("::ffff:") :]
            rec = self.server.records.lookup(source)
            if rec is None:
                status, ctype, body = 404, "text/plain; charset=utf-8", "unknown instance\n"
            else:
                status, ctype, body = render(rec, source, self.path)
        except Exception as exc:  # a bad request never kills the service
            self.log_message("error on %r: %r", self.path, exc)
            status, ctype, body = 500, "text/plain; charset=utf-8", "internal error\n"
        data = body.encode("utf-8") if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_HEAD = do_GET

    def log_message(self, fmt, *args):
        self.server.log.write("%s %s %s\n" % (time.strftime("%Y-%m-%dT%H:%M:%S"), self.client_address[0], fmt % args))


class Log:
    """The service's log: standard error, and, given a path (the file standard error
    is), rotated past ``max_bytes`` to ``<path>.1`` (one older copy): a VM that
    requests in a loop cannot fill the disk."""

    def __init__(self, path=None, max_bytes=LOG_MAX_BYTES):
        self.path, self.max_bytes = path, max_bytes
        self._lock = threading.Lock()

    def write(self, line):
        with self._lock:
            try:
                if self.path and os.fstat(2).st_size + len(line) > self.max_bytes:
                    os.replace(self.path, self.path + ".1")
                    fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                    os.dup2(fd, 1)
                    os.dup2(fd, 2)
                    os.close(fd)
                sys.stderr.write(line)
                sys.stderr.flush()
            except OSError:
                pass  # a full or vanished log never stops the service


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64
    max_per_source = MAX_PER_SOURCE
    max_connections = MAX_CONNECTIONS

    def __init__(self, address, records_path, log=None):
        self.records = Records(records_path)
        self.log = log or Log()
        self._conn_lock = threading.Lock()
        self._active = {}  # source address -> connections being served
        super().__init__(address, Handler)

    def process_request(self, request, client_address):
        """Serve the connection in a thread, unless its source (or the service) is at
        its limit: then it is closed at once, unanswered."""
        source = client_address[0]
        with self._conn_lock:
            total = sum(self._active.values())
            full = total >= self.max_connections or self._active.get(source, 0) >= self.max_per_source
            if not full:
                self._active[source] = self._active.get(source, 0) + 1
        if full:
            self.log.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {source} refused: too many connections\n")
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release(source)
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(client_address[0])

    def _release(self, source):
        with self._conn_lock:
            left = self._active.get(source, 0) - 1
            if left > 0:
                self._active[source] = left
            else:
                self._active.pop(source, None)

    def handle_error(self, request, client_address):  # log, never die
        self.log.write(f"error serving {client_address}: {sys.exc_info()[1]!r}\n")


def serve(records_path, port, bind=BIND, pidfile=None, daemonize=False, log_path=None):
    server = Server((bind, port), records_path, Log(log_path))  # bind first: errors reach the caller
    if daemonize:
        if os.fork():
            os._exit(0)
        os.setsid()
    if pidfile:
        write_atomic(pidfile, f"{os.getpid()}\n")

    def stop(*_):
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
        if pidfile:
            try:
                with open(pidfile, encoding="utf-8") as fh:
                    if fh.read().strip() == str(os.getpid()):
                        os.unlink(pidfile)
            except OSError:
                pass


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m _hanet.metadata", description=__doc__.split("\n")[0])
    parser.add_argument("--records", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bind", default=BIND)
    parser.add_argument("--pidfile")
    parser.add_argument("--log", help="the file standard error goes to: rotated past LOG_MAX_BYTES")
    parser.add_argument("--daemonize", action="store_true")
    args = parser.parse_args(argv)
    serve(args.records, args.port, args.bind, args.pidfile, args.daemonize, args.log)


# --------------------------------------------------------------------------- the applier


def argv(port, paths, bind=BIND) -> list:
    f = files(paths)
    return [
        sys.executable,
        "-m",
        "_hanet.metadata",
        f"--records={f['records']}",
        f"--port={port}",
        f"--bind={bind}",
        f"--pidfile={f['pid']}",
        f"--log={f['log']}",
        "--daemonize",
    ]


def _alive(pid, pidfile):
    return daemon.process_matches(pid, f"--pidfile={pidfile}")


def current(paths, managed=None) -> dict:
    """``{pid, alive, port, bind, records_text}``, or ``{}`` when hanet runs none here."""
    f = files(paths)
    service = read_text(f["service"])
    pid_text = read_text(f["pid"])
    known = managed is not None and NAME in managed.get(FACET)
    if service is None and pid_text is None and not known:
        return {}
    try:
        info = json.loads(service) if service else {}
    except ValueError:
        info = {}
    pid = daemon.parse_pid(pid_text)
    return {
        "pid": pid,
        "alive": _alive(pid, f["pid"]),
        "port": info.get("port"),
        "bind": info.get("bind"),
        "version": info.get("version"),
        "records_text": read_text(f["records"]),
    }


def plan(desired, current, records=()) -> list:
    """Changes for ``desired`` (a ``Metadata`` or None) and the instance ``records``.

    - ``start`` (detail: port, bind): not running
    - ``restart`` (detail: port, bind, pid, reason): port changed, the process died, or
      it was started by another version of the service (``SERVICE_VERSION``)
    - ``records`` (detail: records, plain dicts): the records file differs; rewritten,
      the service re-reads it (no restart)
    - ``stop`` (detail: pid): no local service wanted; process and files removed
    """
    want = desired is not None and getattr(desired, "local_service", False)
    if not want:
        return [Change(FACET, "stop", NAME, {"pid": current.get("pid")})] if current else []
    changes = []
    text = records_text(records)
    if current.get("records_text") != text:
        changes.append(Change(FACET, "records", NAME, {"records": json.loads(text)["records"]}))
    detail = {"port": desired.port, "bind": BIND}
    if not current:
        changes.append(Change(FACET, "start", NAME, detail))
    elif not current.get("alive") or current.get("port") != desired.port or current.get("version") != SERVICE_VERSION:
        if not current.get("alive"):
            reason = "dead"
        elif current.get("port") != desired.port:
            reason = "port changed"
        else:
            reason = f"service version {current.get('version')} -> {SERVICE_VERSION}"
        changes.append(Change(FACET, "restart", NAME, dict(detail, pid=current.get("pid"), reason=reason)))
    return changes


def _stop(paths):
    f = files(paths)
    return daemon.stop(f["pid"], f"--pidfile={f['pid']}", STOP_TIMEOUT, errors=OSError)


def _package_parent():
    """The directory holding the ``_hanet`` package this module was loaded from. The
    service runs as ``python -m _hanet.metadata`` with it first on PYTHONPATH, so it runs
    the very library that started it, not some other copy on the interpreter's path."""
    package_dir = os.path.dirname(os.path.abspath(__file__))  # .../_hanet
    return os.path.dirname(package_dir)


def _start(port, paths, bind=BIND):
    f = files(paths)
    paths.ensure()
    os.makedirs(os.path.dirname(f["records"]), exist_ok=True)
    if not os.path.exists(f["records"]):
        write_atomic(f["records"], records_text(()), mode=0o600)
    try:
        os.unlink(f["pid"])
    except FileNotFoundError:
        pass
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [_package_parent()] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    cmd = argv(port, paths, bind)
    deadline = time.monotonic() + START_TIMEOUT
    retry_until = time.monotonic() + START_TIMEOUT / 2
    with open(f["log"], "ab") as log:
        # the child binds, forks the server into a new session and exits: 0 = listening;
        # any failure is retried (the previous server may hold the port a moment longer)
        proc = daemon.launch(
            cmd, retry_until, stdout=log, stderr=log, env=env, cwd="/", start_new_session=True, timeout=START_TIMEOUT
        )
    if proc.returncode != 0:
        raise RuntimeError(f"metadata service failed to start on port {port} (see {f['log']})")
    pid = daemon.wait_for_pid(f["pid"], f"--pidfile={f['pid']}", deadline, errors=OSError)
    if pid is None:
        raise RuntimeError(f"metadata service did not come up within {START_TIMEOUT}s (see {f['log']})")
    service = {"port": port, "bind": bind, "argv": cmd, "version": SERVICE_VERSION}
    write_atomic(f["service"], json.dumps(service, indent=1) + "\n")
    return pid


def revive(paths, name=NAME):  # pylint: disable=unused-argument
    """Start the metadata service again, on its port, when hanet runs it here and its
    process is gone. The new pid, or None."""
    with daemon.lock(paths):
        cur = current(paths)
        if not cur or cur.get("alive") or cur.get("port") is None:
            return None
        info = json.loads(read_text(files(paths)["service"]) or "{}")
        return _start(cur["port"], paths, info.get("bind", BIND))


def apply(changes, paths, managed) -> list:
    with daemon.lock(paths):
        return _apply(changes, paths, managed)


def _apply(changes, paths, managed) -> list:
    done = []
    for change in changes:
        if change.facet != FACET:
            continue
        if change.action == "records":
            write_records(change.detail["records"], paths)
            done.append(f"metadata records: {len(change.detail['records'])} instance(s)")
        elif change.action in ("start", "restart"):
            cur = current(paths) if change.action == "start" else {}
            if (
                cur.get("alive")
                and cur.get("port") == change.detail["port"]
                and cur.get("bind") == change.detail.get("bind", BIND)
            ):
                # planned before this lock was taken: another applier (a takeover of
                # another network on this host) started it since; a second one would
                # fail on the port in use
                if managed is not None:
                    managed.set(FACET, managed.get(FACET) | {NAME})
                done.append(f"metadata service was started meanwhile: pid {cur['pid']}")
                continue
            old = _stop(paths) if change.action == "restart" else None
            pid = _start(change.detail["port"], paths, change.detail.get("bind", BIND))
            if managed is not None:
                managed.set(FACET, managed.get(FACET) | {NAME})
            if change.action == "restart":
                done.append(
                    f"restarted metadata service ({change.detail.get('reason')}): pid {old} -> {pid}, "
                    f"port {change.detail['port']}"
                )
            else:
                done.append(f"started metadata service: pid {pid}, port {change.detail['port']}")
        elif change.action == "stop":
            pid = _stop(paths)
            for path in files(paths).values():
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
            if managed is not None:
                managed.set(FACET, managed.get(FACET) - {NAME})
            done.append("stopped metadata service" + (f" (pid {pid})" if pid else "") + ", removed its files")
        else:
            raise ValueError(f"unknown metadata change {change.action}")
    return done


def status(paths, managed=None) -> dict:
    """``{pid, running, port, instances}`` (empty when hanet runs no metadata service)."""
    cur = current(paths, managed)
    if not cur:
        return {}
    return {
        "pid": cur["pid"] if cur["alive"] else None,
        "running": cur["alive"],
        "port": cur["port"],
        "instances": len({r["name"] for r in load_records(files(paths)["records"]).values()}),
    }


if __name__ == "__main__":
    main()
