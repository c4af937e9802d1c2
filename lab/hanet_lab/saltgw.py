"""Salt gateway: runs inside the master's network namespace and serves Salt client calls.

Why a separate process: ``salt.client.LocalClient`` reads the master's event bus over
unix sockets (that part would work from anywhere on the filesystem), but it *publishes*
a job by a TCP request to ``interface:ret_port`` (``tcp://192.0.2.1:4506``), which is
reachable only from inside the lab's management network. The lab therefore starts this
script with ``ip netns exec <master-ns>``, and talks to it over its stdin/stdout.

Protocol: one JSON object per line each way. A request ``{"id": 1, "op": "cmd", ...}``
gets ``{"id": 1, "ok": true, "result": ...}`` or ``{"id": 1, "ok": false, "error": "..."}``.
Requests run concurrently (a thread pool, one LocalClient per thread).

Ops: ``cmd`` (LocalClient.cmd), ``run`` (RunnerClient.cmd), ``wheel`` (WheelClient.cmd),
``listen`` / ``event`` / ``unlisten`` (the master event bus), ``ping``.

Standalone on purpose (no hanet_lab imports): usage ``saltgw.py <master config file>``.
"""

import fnmatch
import json
import os
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor


def _jsonable(obj):
    if isinstance(obj, bytes):
        return obj.decode(errors="replace")
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    return repr(obj)


class Gateway:
    def __init__(self, conf_file, out):
        import salt.config

        self.conf_file = conf_file
        self.opts = salt.config.client_config(conf_file)
        self.master_opts = salt.config.master_config(conf_file)
        self.out = out
        self.out_lock = threading.Lock()
        self.local = threading.local()
        self.listeners = {}
        self.listeners_lock = threading.Lock()
        self.next_lid = 1

    # -- clients, one per thread -------------------------------------------------------
    def client(self):
        c = getattr(self.local, "client", None)
        if c is None:
            import salt.client

            c = self.local.client = salt.client.LocalClient(mopts=dict(self.opts))
        return c

    def runner(self):
        r = getattr(self.local, "runner", None)
        if r is None:
            import salt.runner

            r = self.local.runner = salt.runner.RunnerClient(dict(self.master_opts))
        return r

    def wheel(self):
        w = getattr(self.local, "wheel", None)
        if w is None:
            import salt.wheel

            w = self.local.wheel = salt.wheel.WheelClient(dict(self.master_opts))
        return w

    # -- ops ----------------------------------------------------------------------------
    def op_ping(self, req):
        return "pong"

    def op_cmd(self, req):
        return self.client().cmd(
            req["tgt"],
            req["fun"],
            arg=req.get("arg") or [],
            timeout=req.get("timeout"),
            tgt_type=req.get("tgt_type", "glob"),
            kwarg=req.get("kwarg") or None,
            full_return=bool(req.get("full_return")),
        )

    def op_run(self, req):
        return self.runner().cmd(
            req["fun"],
            arg=req.get("arg") or [],
            kwarg=req.get("kwarg") or {},
            print_event=False,
            full_return=bool(req.get("full_return")),
        )

    def op_wheel(self, req):
        return self.wheel().cmd(req["fun"], arg=req.get("arg") or [], kwarg=req.get("kwarg") or {}, print_event=False)

    def op_listen(self, req):
        import salt.utils.event

        ev = salt.utils.event.get_master_event(self.master_opts, self.master_opts["sock_dir"], listen=True)
        ev.connect_pub(timeout=5)
        with self.listeners_lock:
            lid = self.next_lid
            self.next_lid += 1
            self.listeners[lid] = {"event": ev, "buffer": [], "lock": threading.Lock()}
        return lid

    def op_event(self, req):
        """The first buffered or new event whose tag matches ``tag`` (fnmatch), or None."""
        lst = self.listeners[req["lid"]]
        pattern = req.get("tag") or "*"
        deadline = time.monotonic() + float(req.get("timeout", 10))
        with lst["lock"]:
            while True:
                for i, ev in enumerate(lst["buffer"]):
                    if fnmatch.fnmatchcase(ev["tag"], pattern):
                        return lst["buffer"].pop(i)
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                got = lst["event"].get_event(wait=min(left, 1.0), full=True, no_block=False)
                if got:
                    lst["buffer"].append({"tag": got.get("tag"), "data": got.get("data"), "received_at": time.time()})

    def op_unlisten(self, req):
        with self.listeners_lock:
            lst = self.listeners.pop(req["lid"], None)
        if lst:
            lst["event"].destroy()
        return True

    # -- loop ---------------------------------------------------------------------------
    def handle(self, req):
        rid = req.get("id")
        try:
            result = getattr(self, "op_" + req["op"])(req)
            resp = {"id": rid, "ok": True, "result": result}
        except BaseException as e:  # noqa: BLE001 - everything goes back to the caller
            resp = {"id": rid, "ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        line = json.dumps(resp, default=_jsonable)
        with self.out_lock:
            self.out.write(line + "\n")
            self.out.flush()

    def serve(self, inp):
        with ThreadPoolExecutor(max_workers=16) as pool:
            for line in inp:
                line = line.strip()
                if not line:
                    continue
                pool.submit(self.handle, json.loads(line))


def main():
    conf_file = sys.argv[1]
    # The protocol owns the original stdout; stray prints and logs go to stderr (a file).
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    gw = Gateway(conf_file, out)
    out.write(json.dumps({"id": 0, "ok": True, "result": "ready"}) + "\n")
    out.flush()
    gw.serve(sys.stdin)
    os._exit(0)


if __name__ == "__main__":
    main()
