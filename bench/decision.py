"""The master's decision at scale: 100 signed reports of one death at once (and a network host serving 64 networks).

When a network host dies, every host that carries one of its networks reports it within
milliseconds. This benchmark sends that burst through the master's real decision code,
``runner.hanet.liveness`` as the hanet_failover engine calls it (its 4 worker threads),
with real RSA signatures checked against real minion keys and the real file record
(flock, fsync). Only what leaves the master is replaced: publishing the orders and
firing events are recorded instead of sent, the pillar is the generated one (no pillar
compile), and the second opinion is the master's watch saying "dead" (the engine's usual
case: its watch saw the death too).

It prints, per scenario: how many moves were recorded (must be exactly the networks at
stake), how many orders went out, the decision latency (a report's arrival to its
orders published, for the report that decided), every report's handling time
(p50/p95/max), and how long the whole burst took to drain (no backlog: the last report
is handled soon after the first).

    ./dev bench decision [--reports 100] [--networks 64] [--workers 4] [--trials 5]
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKOUT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(CHECKOUT, "_modules"))


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pillar(computes, networks):
    """A hanet pillar: ``networks`` network-host networks served by net1 (net2 stands by),
    ``computes`` compute hosts, each with an instance on network ``i % networks``."""
    nets, hosts, instances = {}, {}, {}
    for n in range(networks):
        nets[f"n{n}"] = {
            "cidr": f"10.{100 + n // 250}.{n % 250}.0/24",
            "bridge": f"br{n}",
            "bridge_interface": f"eth{n + 1}",
            "multi_host": False,
            "gateway": f"10.{100 + n // 250}.{n % 250}.1",
            "network_hosts": ["net1", "net2"],
        }
    for i, h in enumerate(["net1", "net2"]):
        hosts[h] = {
            "public_interface": "eth0",
            "routing_source_ip": f"203.0.113.{10 + i}",
            "networks": {f"n{n}": {"address": f"10.{100 + n // 250}.{n % 250}.{2 + i}"} for n in range(networks)},
        }
    for c in range(computes):
        n = c % networks
        name = f"compute{c:03d}"
        hosts[name] = {
            "public_interface": "eth0",
            "routing_source_ip": f"198.51.{100 + c // 250}.{c % 250 + 1}",
            "networks": {},
        }
        instances[f"vm{c:03d}"] = {
            "host": name,
            "nics": [
                {
                    "network": f"n{n}",
                    "mac": f"fa:16:3e:{c // 65536:02x}:{c // 256 % 256:02x}:{c % 256:02x}",
                    "ip": f"10.{100 + n // 250}.{n % 250}.{10 + c // networks}",
                }
            ],
        }
    return {"networks": nets, "hosts": hosts, "instances": instances}


def _runner(opts):
    spec = importlib.util.spec_from_file_location("hanet_runner_bench", os.path.join(CHECKOUT, "_runners", "hanet.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.__opts__ = opts
    return mod


class Keys:
    """One RSA key pair per observer, the public half where the master keeps accepted
    minion keys (``<pki_dir>/minions/<id>``)."""

    def __init__(self, pki, names):
        import salt.crypt

        os.makedirs(os.path.join(pki, "minions"), exist_ok=True)
        self.private = {}
        for name in names:
            priv, pub = salt.crypt.gen_keys(2048)
            with open(os.path.join(pki, "minions", name), "w") as fh:
                fh.write(pub)
            path = os.path.join(pki, f"{name}.pem")
            with open(path, "w") as fh:
                fh.write(priv)
            os.chmod(path, 0o600)
            self.private[name] = path

    def sign(self, data):
        import salt.crypt

        from _hanet import failover

        sig = salt.crypt.sign_message(self.private[data["observer"]], failover.canonical(data).encode())
        return dict(data, sig=base64.b64encode(sig).decode())


def scenario(name, computes, networks, workers, trials, tmp):
    from _hanet import failover, model

    cfg = model.load(pillar(computes, networks))
    observers = sorted(cfg.hosts_carrying("n0") | {h for n in cfg.networks for h in cfg.hosts_carrying(n)})
    observers = [o for o in observers if o != "net1"]
    log(f"{name}: {len(observers)} observers, {networks} networks; generating their keys")
    pki = os.path.join(tmp, name, "pki")
    keys = Keys(pki, observers)
    rows = []
    for trial in range(trials):
        cachedir = os.path.join(tmp, name, f"cache{trial}")
        os.makedirs(cachedir)
        opts = {
            "cachedir": cachedir,
            "pki_dir": pki,
            "extension_modules": os.path.join(tmp, "extmods"),
            "sock_dir": cachedir,
            "id": "master",
        }
        runner = _runner(opts)
        published, fired, lock = [], [], threading.Lock()

        def publish(tgt, fun, arg, kwarg=None, direct=0, _p=published, lock=lock):
            with lock:
                _p.append((time.time(), tgt, fun, list(arg)))

        def fire(tag, data, _f=fired, lock=lock):
            with lock:
                _f.append(tag)

        runner._publish = publish
        runner._fire = fire
        runner._canonical = lambda fresh=False: "compute000"
        runner._config = lambda minion_id, fresh=False: (cfg, {})
        runner._second_opinion = lambda cfg_, peer: failover.Opinion("dead", "watch", ("192.0.2.21",))
        now = time.time()
        burst = [
            keys.sign(failover.report(o, "net1", failover.DOWN, now - 0.05, [], uuid.uuid4().hex)) for o in observers
        ]
        took = []

        def handle(data, runner=runner, took=took):
            t0 = time.perf_counter()
            out = runner.liveness(
                tag=f"salt/beacon/{data['observer']}/hanet_liveness/net1/down", data=data, via="engine"
            )
            took.append((time.perf_counter() - t0, out))

        t_start = time.time()
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(handle, burst))
        drained = time.time() - t_start
        with failover.Record(cachedir) as rec:
            owners = dict(rec.owners)
        moved = {n: e for n, e in owners.items() if e.get("owner") == "net2"}
        deciders = [t for t, out in took if isinstance(out, dict) and out.get("moved")]
        takeovers = [p for p in published if p[2] == failover.TAKEOVER_FUN]
        rows.append(
            {
                "moves": len(moved),
                "epochs": sorted({e.get("epoch") for e in moved.values()}),
                "takeovers": len(takeovers),
                "deciders": len(deciders),
                "decision": min(deciders) if deciders else None,
                "first_order": (min(p[0] for p in takeovers) - t_start) if takeovers else None,
                "each": sorted(t for t, _ in took),
                "drained": drained,
                "rejected": sum(1 for tag in fired if tag.endswith("/rejected")),
            }
        )
        r = rows[-1]
        log(
            f"{name} #{trial + 1}: {r['moves']}/{networks} networks moved (epochs {r['epochs']}) by "
            f"{r['deciders']} report(s), {r['takeovers']} takeover orders; first order after "
            f"{(r['first_order'] or 0) * 1000:.1f} ms; burst drained in {drained * 1000:.0f} ms; "
            f"{r['rejected']} rejected events"
        )
    return rows


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main(argv=None):
    ap = argparse.ArgumentParser(prog="./dev bench decision", description=__doc__.splitlines()[0])
    ap.add_argument("--reports", type=int, default=100, help="compute hosts reporting the death (default 100)")
    ap.add_argument("--networks", type=int, default=64, help="networks of the second scenario (default 64)")
    ap.add_argument("--workers", type=int, default=4, help="the engine's worker threads (default 4)")
    ap.add_argument("--trials", type=int, default=5)
    args = ap.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="hanet-bench-decision-")
    try:
        results = {
            f"{args.reports} reports, 1 network": scenario("one", args.reports, 1, args.workers, args.trials, tmp),
            f"{args.reports} reports, {args.networks} networks": scenario(
                "many", args.reports, args.networks, args.workers, args.trials, tmp
            ),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"\nthe master's decision under a burst of signed reports ({args.workers} engine workers, "
        f"{args.trials} trials, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}); seconds\n"
    )
    print(
        "| scenario | networks moved | orders | decision p50 | decision max | first order p50 | "
        "each report p50 / p95 / max | burst drained p50 / max |"
    )
    print("|---|---|---|---|---|---|---|---|")
    ok = True
    for name, rows in results.items():
        nets = int(name.split(", ")[1].split()[0])
        moves = sorted({r["moves"] for r in rows})
        orders = sorted({r["takeovers"] for r in rows})
        ok &= moves == [nets] and orders == [nets]
        dec = [r["decision"] for r in rows if r["decision"] is not None]
        first = [r["first_order"] for r in rows if r["first_order"] is not None]
        each = [t for r in rows for t in r["each"]]
        drained = [r["drained"] for r in rows]
        print(
            f"| {name} | {'/'.join(map(str, moves))} | {'/'.join(map(str, orders))} | "
            f"{statistics.median(dec):.4f} | {max(dec):.4f} | {statistics.median(first):.4f} | "
            f"{pct(each, 0.5):.4f} / {pct(each, 0.95):.4f} / {max(each):.4f} | "
            f"{statistics.median(drained):.3f} / {max(drained):.3f} |"
        )
    print(
        "\n"
        + (
            "every trial: each network moved exactly once (one epoch step), one takeover order each"
            if ok
            else "A TRIAL MOVED A NETWORK MORE OR LESS THAN ONCE"
        )
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
