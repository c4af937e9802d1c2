"""Long-lived TCP streams with a byte counter on each end, to show that open connections
survive a failover (issue 14 §3).

Each end sends a numbered byte stream (byte ``i`` is ``i % 251``) at a steady rate for
``duration`` seconds, then closes its sending side and reads until the other end does
the same. It checks every byte it receives, notes the longest pause between two
receipts, and writes what it saw as JSON when it ends::

    {"sent": bytes, "received": bytes, "intact": every byte in order, "error": None
     or what ended the connection (a reset), "pause_s": longest pause, "pause_at": when,
     "peer": the address the listening end saw the connection come from}

Run as ``python stream.py listen PORT OUT DURATION`` or ``python stream.py connect HOST
PORT OUT DURATION`` inside a namespace; ``Stream`` starts a pair in the lab.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time

CHUNK = 1000  # bytes per send
TICK = 0.01  # seconds between sends: 100 kB/s each way
MOD = 251


def _pattern(start, n):
    return bytes((start + i) % MOD for i in range(n))


class End:
    """One end of a stream on connected socket ``sock``."""

    def __init__(self, sock, duration):
        self.sock, self.duration = sock, duration
        self.sent = self.received = 0
        self.intact, self.error = True, None
        self.pause_s, self.pause_at = 0.0, None

    def _send(self):
        end = time.monotonic() + self.duration
        try:
            while time.monotonic() < end:
                self.sock.sendall(_pattern(self.sent, CHUNK))
                self.sent += CHUNK
                time.sleep(TICK)
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as err:
            self.error = self.error or f"send: {err!r}"

    def run(self):
        sender = threading.Thread(target=self._send, daemon=True)
        sender.start()
        last = time.time()
        try:
            while True:
                data = self.sock.recv(65536)
                now = time.time()
                if not data:
                    break
                if now - last > self.pause_s:
                    self.pause_s, self.pause_at = now - last, last
                last = now
                if data != _pattern(self.received, len(data)):
                    self.intact = False
                self.received += len(data)
        except OSError as err:
            self.error = self.error or f"recv: {err!r}"
        sender.join(self.duration + 60)
        self.sock.close()
        return {
            "sent": self.sent,
            "received": self.received,
            "intact": self.intact,
            "error": self.error,
            "pause_s": round(self.pause_s, 4),
            "pause_at": self.pause_at,
        }


def _write(path, out):
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(out, fh)
    os.replace(tmp, path)


def main(argv):
    if argv[0] == "listen":
        port, out, duration = int(argv[1]), argv[2], float(argv[3])
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("0.0.0.0", port))
        srv.listen(1)
        _write(f"{out}.ready", {"port": port})
        sock, peer = srv.accept()
        srv.close()
    else:
        peer = None
        host, port, out, duration = argv[1], int(argv[2]), argv[3], float(argv[4])
        sock = socket.create_connection((host, port), timeout=10)
        sock.settimeout(None)
    _write(out, dict(End(sock, duration).run(), peer=peer[0] if peer else None))
    return 0


class Stream:
    """A stream from ``client`` (a node) to ``server``:``port``, reached at ``address``
    (the server's own address, or a floating IP that leads to it)."""

    def __init__(self, lab, server, client, address, port, duration):
        self.lab, self.server, self.client = lab, server, client
        self.address, self.port, self.duration = address, port, duration
        base = os.path.join(lab.rundir, f"stream-{client}-{server}-{port}-{time.time_ns()}")
        self.out = {"server": f"{base}-server.json", "client": f"{base}-client.json"}
        self.procs = []

    def start(self, timeout=10.0):
        from .lab import _python

        py = _python(self.lab.checkout)
        me = os.path.abspath(__file__)
        self.procs.append(
            self.lab.popen(self.server, [py, me, "listen", str(self.port), self.out["server"], str(self.duration)])
        )
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.out["server"] + ".ready"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"stream server in {self.server} did not listen")
            time.sleep(0.05)
        self.procs.append(
            self.lab.popen(
                self.client,
                [py, me, "connect", self.address, str(self.port), self.out["client"], str(self.duration)],
            )
        )
        return self

    def results(self, timeout):
        """{"server": ..., "client": ...} once both ends are done (None for an end that
        wrote nothing in ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except Exception:  # pylint: disable=broad-except  (a hung end: killed, reported as None)
                p.kill()
                p.wait()
        out = {}
        for end, path in self.out.items():
            try:
                with open(path, encoding="utf-8") as fh:
                    out[end] = json.load(fh)
            except (OSError, ValueError):
                out[end] = None
        return out

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
