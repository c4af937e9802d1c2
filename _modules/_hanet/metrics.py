"""hanet's Prometheus metrics, written the way node_exporter's textfile collector reads
them (``--collector.textfile.directory``): one ``*.prom`` file in the text exposition
format, written to a temporary file and renamed, with no sample time stamps.

Two kinds of numbers go in:

- **Counters and histograms** (failovers, takeovers, GARPs sent, rejected reports,
  daemon restarts, takeover durations) are counted where the thing happens, by whichever
  process does it (the beacon, a takeover job, the master's engine or a runner). They are
  kept in a small JSON file (``Store``), changed under a lock: a counter survives the
  process that counted it, and a restart of the minion does not reset it.
- **Gauges** (who holds which gateway, daemons up, leases, the probes' round trip) are
  read when the file is rendered.

``render(families)`` is pure: a list of ``Family`` in, exposition text out. The names
follow Prometheus' conventions: the ``hanet_`` prefix, base units (seconds), ``_total``
for counters, ``_timestamp_seconds`` for points in time, ``_info`` for labels worth
joining on. The catalogue (``CATALOGUE``) documents every family once; docs/metrics.md
is generated from it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

from .common import FileLock, write_atomic

# seconds: a takeover (config -> dhcp) and a master's decision take tens to hundreds of ms
BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

TEXTFILE = "hanet.prom"  # the minion's file
DEFAULT_DIR = "/var/lib/hanet/metrics"  # pillar metrics_textfile_dir, under root_dir
MASTER_TEXTFILE = "hanet_master.prom"  # the master's file

# name -> (type, help, labels, where: minion | master)
CATALOGUE = {
    "hanet_host_info": ("gauge", "Always 1; the minion id of the host that wrote the file.", ("host",), "minion"),
    "hanet_gateway_held": (
        "gauge",
        "1 when this host answers for the network's gateway now.",
        ("network", "role"),
        "minion",
    ),
    "hanet_gateway_last_transition_timestamp_seconds": (
        "gauge",
        "When this host last took or gave up the network's gateway (takeover, relinquish, fence).",
        ("network",),
        "minion",
    ),
    "hanet_network_servable": (
        "gauge",
        "0 while this host's own health watch says it cannot serve the network (uplink or segment link lost).",
        ("network",),
        "minion",
    ),
    "hanet_floating_ips_held": ("gauge", "Floating IPs bound on this host's public interface now.", (), "minion"),
    "hanet_takeovers_total": (
        "counter",
        "Takeovers this host completed or failed, by how the addresses were bound (warm: the beacon; job) and result.",
        ("network", "bound_by", "result"),
        "minion",
    ),
    "hanet_takeover_duration_seconds": (
        "histogram",
        "A takeover on this host, from the order's arrival to DHCP served (config -> dhcp).",
        ("network",),
        "minion",
    ),
    "hanet_relinquishes_total": (
        "counter",
        "Networks this host gave up on the master's order.",
        ("network",),
        "minion",
    ),
    "hanet_fences_total": (
        "counter",
        "Times this host fenced itself (isolated: it stopped answering for every network it served).",
        (),
        "minion",
    ),
    "hanet_garps_sent_total": (
        "counter",
        "Gratuitous ARP frames sent (takeovers, announcements), by result.",
        ("result",),
        "minion",
    ),
    "hanet_peer_up": ("gauge", "1 while the liveness beacon sees the peer up.", ("peer",), "minion"),
    "hanet_peer_probe_rtt_seconds": (
        "gauge",
        "Round trip of the last answered ARP probe to the peer.",
        ("peer",),
        "minion",
    ),
    "hanet_peer_probe_misses_total": (
        "counter",
        "Probe rounds the peer did not answer since the beacon started.",
        ("peer",),
        "minion",
    ),
    "hanet_daemon_up": ("gauge", "1 while the daemon hanet runs here is alive.", ("daemon", "name"), "minion"),
    "hanet_daemon_restarts_total": (
        "counter",
        "Restarts of a dead daemon by the beacon's supervisor.",
        ("daemon", "name"),
        "minion",
    ),
    "hanet_dhcp_leases": ("gauge", "Leases in the network's dnsmasq lease file.", ("network",), "minion"),
    "hanet_ruleset_in_place": (
        "gauge",
        "1 when the kernel holds exactly the ruleset hanet applied, 0 when it drifted (changed by someone else).",
        (),
        "minion",
    ),
    "hanet_ruleset_drift_repaired_total": (
        "counter",
        "Applies that put back a ruleset changed by someone else (the pillar had not changed).",
        (),
        "minion",
    ),
    "hanet_gateway_owner": (
        "gauge",
        "1 for the host the failover record names as the network's owner.",
        ("network", "host"),
        "master",
    ),
    "hanet_gateway_epoch": (
        "gauge",
        "The network's epoch in the failover record (one step per move).",
        ("network",),
        "master",
    ),
    "hanet_gateway_owner_since_timestamp_seconds": (
        "gauge",
        "When the record's owner became owner.",
        ("network",),
        "master",
    ),
    "hanet_gateway_move_unconfirmed": (
        "gauge",
        "1 while the last move's takeover has not reported complete.",
        ("network",),
        "master",
    ),
    "hanet_failovers_total": (
        "counter",
        "Moves this master decided, by reason (down: a liveness "
        "report; handover: the owner's own health; reconcile; "
        "evacuate; failback).",
        ("network", "reason"),
        "master",
    ),
    "hanet_reports_rejected_total": (
        "counter",
        "Liveness reports this master refused, by reason.",
        ("reason",),
        "master",
    ),
    "hanet_decision_duration_seconds": (
        "histogram",
        "A down report's path on the master, from receipt to the orders published.",
        (),
        "master",
    ),
    "hanet_record_up": (
        "gauge",
        "1 when this master can read the failover record (etcd: quorum).",
        ("backend",),
        "master",
    ),
}


@dataclass
class Family:
    name: str
    samples: list = field(default_factory=list)  # [(labels dict, value)]; histogram: (labels, hist)

    def add(self, labels, value):
        self.samples.append((dict(labels or {}), value))
        return self


def _escape(value):
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels):
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items())) + "}"


def _number(value):
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)


def render(families) -> str:
    """The exposition text of ``families`` (Family, in catalogue order; names not in the
    catalogue are refused, so every metric hanet writes is documented)."""
    lines = []
    families = list(families)
    unknown = sorted({f.name for f in families} - set(CATALOGUE))
    if unknown:
        raise KeyError(f"not in hanet's metrics catalogue: {', '.join(unknown)}")
    for fam in sorted(families, key=lambda f: list(CATALOGUE).index(f.name)):
        kind, help_text, _, _ = CATALOGUE[fam.name]
        if not fam.samples:
            continue
        lines.append(f"# HELP {fam.name} {help_text}")
        lines.append(f"# TYPE {fam.name} {kind}")
        for labels, value in sorted(fam.samples, key=lambda s: sorted(s[0].items())):
            if kind == "histogram":
                for le, count in zip(value["le"], value["buckets"]):
                    lines.append(f"{fam.name}_bucket{_labels(dict(labels, le=_number(le)))} {_number(count)}")
                lines.append(f"{fam.name}_bucket{_labels(dict(labels, le='+Inf'))} {_number(value['count'])}")
                lines.append(f"{fam.name}_sum{_labels(labels)} {_number(value['sum'])}")
                lines.append(f"{fam.name}_count{_labels(labels)} {_number(value['count'])}")
            else:
                lines.append(f"{fam.name}{_labels(labels)} {_number(value)}")
    return "\n".join(lines) + "\n" if lines else ""


def write_textfile(directory, name, text):
    """Write the file node_exporter reads: a temporary file in the same directory, then a
    rename (a scrape never sees half a file)."""
    write_atomic(os.path.join(directory, name), text, mode=0o644)


def _key(labels):
    return json.dumps(sorted((labels or {}).items()))


class Store:
    """Counters and histograms kept in ``path`` (JSON), changed under ``path + '.lock'``
    by any process of this host. Counting never raises: a metric must not fail the
    failover it counts."""

    def __init__(self, path):
        self.path = path

    def _load(self):
        try:
            with open(self.path, encoding="utf-8") as fh:
                data = json.load(fh)
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _change(self, fn):
        try:
            with FileLock(self.path + ".lock"):
                data = self._load()
                fn(data)
                write_atomic(self.path, json.dumps(data, sort_keys=True) + "\n", mode=0o600)
        except OSError:
            import logging

            logging.getLogger(__name__).warning("hanet metrics: cannot count in %s", self.path, exc_info=True)

    def add(self, name, labels=None, value=1.0):
        if value == 0:
            return

        def fn(data):
            fam = data.setdefault("counters", {}).setdefault(name, {})
            fam[_key(labels)] = fam.get(_key(labels), 0) + value

        self._change(fn)

    def set(self, name, labels=None, value=0.0):
        def fn(data):
            data.setdefault("gauges", {}).setdefault(name, {})[_key(labels)] = value

        self._change(fn)

    def observe(self, name, value, labels=None, buckets=BUCKETS):
        def fn(data):
            fam = data.setdefault("histograms", {}).setdefault(name, {})
            h = fam.get(_key(labels))
            if not h or h.get("le") != list(buckets):
                h = {"le": list(buckets), "buckets": [0] * len(buckets), "sum": 0.0, "count": 0}
            for i, le in enumerate(buckets):
                if value <= le:
                    h["buckets"][i] += 1
            h["sum"] += float(value)
            h["count"] += 1
            fam[_key(labels)] = h

        self._change(fn)

    def families(self):
        """What was counted, as Family objects (names outside the catalogue are dropped)."""
        data = self._load()
        out = {}
        for section in ("counters", "gauges", "histograms"):
            for name, samples in (data.get(section) or {}).items():
                if name not in CATALOGUE or not isinstance(samples, dict):
                    continue
                fam = out.setdefault(name, Family(name))
                for key, value in samples.items():
                    try:
                        fam.add(dict(json.loads(key)), value)
                    except (ValueError, TypeError):
                        continue
        return out

    def note_textfile(self, path):
        """Remember where the textfile is written (``forget`` removes it)."""
        if self._load().get("textfile") != path:
            self._change(lambda data: data.__setitem__("textfile", path))

    def forget(self):
        """Remove the textfile this store's host wrote, and the store: hanet left the host."""
        path = self._load().get("textfile")
        if isinstance(path, str) and path:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self.remove()

    def remove(self):
        for p in (self.path, self.path + ".lock"):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass


def merge(families, more):
    """``families`` ({name: Family}) with ``more`` (Family objects) added."""
    for fam in more:
        if fam.name in families:
            families[fam.name].samples.extend(fam.samples)
        else:
            families[fam.name] = fam
    return families


def host_families(host, status, daemons, view):
    """The gauges of one host (pure): ``status`` is ``hanet.status``'s answer,
    ``daemons`` ``supervise.running`` ({(daemon, name): pid or None}) and ``view`` the
    liveness beacon's saved view (``liveness.read_view``)."""
    fams = {name: Family(name) for name in CATALOGUE if CATALOGUE[name][3] == "minion"}
    fams["hanet_host_info"].add({"host": host}, 1)
    nets = status.get("networks") or {}
    for label, n in sorted(nets.items()):
        fams["hanet_gateway_held"].add(
            {"network": label, "role": n.get("role") or ""}, 1 if n.get("active_gateway") else 0
        )
        d = n.get("dnsmasq")
        if isinstance(d, dict):
            fams["hanet_dhcp_leases"].add({"network": label}, d.get("leases") or 0)
    fams["hanet_floating_ips_held"].add({}, len(status.get("floating_ips") or ()))
    for (daemon, name), pid in sorted(daemons.items()):
        fams["hanet_daemon_up"].add({"daemon": daemon, "name": name}, 1 if pid else 0)
    in_place = (status.get("ruleset") or {}).get("in_place")
    if in_place is not None:
        fams["hanet_ruleset_in_place"].add({}, 1 if in_place else 0)
    peers = view.get("peers") if isinstance(view.get("peers"), dict) else {}
    for peer, v in sorted(peers.items()):
        if not isinstance(v, dict):
            continue
        fams["hanet_peer_up"].add({"peer": peer}, 1 if v.get("state") == "up" else 0)
        if isinstance(v.get("rtt"), (int, float)):
            fams["hanet_peer_probe_rtt_seconds"].add({"peer": peer}, v["rtt"])
        if isinstance(v.get("missed_total"), int):
            fams["hanet_peer_probe_misses_total"].add({"peer": peer}, v["missed_total"])
    health = view.get("health")
    if isinstance(health, dict) and isinstance(health.get("lost"), list):
        for label, n in sorted(nets.items()):
            if n.get("role") in ("serving", "standby"):
                fams["hanet_network_servable"].add({"network": label}, 0 if label in health["lost"] else 1)
    return fams


def master_families(owners, backend, record_ok):
    """The record's gauges on a master (pure): ``owners`` {network: entry} (None when the
    record cannot be read), ``backend`` file or etcd."""
    fams = {
        name: Family(name)
        for name in (
            "hanet_gateway_owner",
            "hanet_gateway_epoch",
            "hanet_gateway_owner_since_timestamp_seconds",
            "hanet_gateway_move_unconfirmed",
            "hanet_record_up",
        )
    }
    fams["hanet_record_up"].add({"backend": backend}, 1 if record_ok else 0)
    for label, entry in sorted((owners or {}).items()):
        if not isinstance(entry, dict) or not entry.get("owner"):
            continue
        fams["hanet_gateway_owner"].add({"network": label, "host": entry["owner"]}, 1)
        fams["hanet_gateway_epoch"].add({"network": label}, int(entry.get("epoch") or 0))
        if isinstance(entry.get("since"), (int, float)):
            fams["hanet_gateway_owner_since_timestamp_seconds"].add({"network": label}, entry["since"])
        if "confirmed" in entry:
            fams["hanet_gateway_move_unconfirmed"].add({"network": label}, 0 if entry["confirmed"] else 1)
    return fams


def host_store(paths):
    """A host's counters (``<state_dir>/metrics.json``)."""
    return Store(paths.state("metrics.json"))


def master_store(cachedir):
    """A master's counters (``<cachedir>/hanet/metrics.json``)."""
    return Store(os.path.join(cachedir, "hanet", "metrics.json"))


WRITE_S = 5.0  # how often the beacon rewrites the host's textfile


class Writer:
    """A beacon's (or the engine's) thread that calls ``write`` every ``interval`` seconds,
    first right away (``first``) or after one interval: the textfile (``hanet.metrics``),
    the periodic re-announcement (``hanet.announce``)."""

    thread_name = "hanet-metrics"

    def __init__(self, write, interval=WRITE_S, first=True):
        import threading

        self.write = write
        self.interval = float(interval)
        self.first = first
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def _run(self):
        import logging

        log = logging.getLogger(__name__)
        failed = False
        if not self.first and self._stop.wait(self.interval):
            return
        while True:
            try:
                self.write()
                failed = False
            except Exception:  # pylint: disable=broad-except  (log once; keep trying)
                if not failed:
                    log.warning("hanet metrics: cannot write the metrics file", exc_info=True)
                failed = True
            if self._stop.wait(self.interval):
                return

    def stop(self, timeout=2.0):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
