"""hanet's metrics core (``_hanet/metrics.py``): what it renders is read back with
Prometheus' own parser (prometheus_client), as node_exporter's textfile collector would."""

import os
import stat
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from _hanet import failover, metrics
from _hanet.common import Paths


def parse(text):
    """{(sample name, frozenset(labels)): value}, and the families' types."""
    samples, types = {}, {}
    for fam in text_string_to_metric_families(text):
        types[fam.name] = fam.type
        for s in fam.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples, types


STATUS = {
    "networks": {
        "shared": {
            "role": "serving",
            "active_gateway": True,
            "dnsmasq": {"pid": 10, "running": True, "leases": 3, "hosts": 4},
        },
        "private": {"role": "member", "active_gateway": True, "dnsmasq": None},
        "other": {"role": "standby", "active_gateway": False, "dnsmasq": None},
    },
    "floating_ips": [{"address": "203.0.113.5", "interface": "eth1"}],
    "ruleset": {"in_place": False},
}
VIEW = {
    "peers": {
        "net2": {"state": "up", "rtt": 0.0012, "missed_total": 4},
        "net3": {"state": "down", "rtt": None, "missed_total": 40},
    },
    "health": {"lost": ["other"]},
}


def test_host_gauges_read_back_with_prometheus_parser():
    fams = metrics.host_families("net1", STATUS, {("dnsmasq", "shared"): 10, ("metadata", "metadata"): None}, VIEW)
    samples, types = parse(metrics.render(fams.values()))
    assert samples[("hanet_host_info", frozenset({("host", "net1")}))] == 1
    assert samples[("hanet_gateway_held", frozenset({("network", "shared"), ("role", "serving")}))] == 1
    assert samples[("hanet_gateway_held", frozenset({("network", "other"), ("role", "standby")}))] == 0
    assert samples[("hanet_dhcp_leases", frozenset({("network", "shared")}))] == 3
    assert samples[("hanet_floating_ips_held", frozenset())] == 1
    assert samples[("hanet_daemon_up", frozenset({("daemon", "dnsmasq"), ("name", "shared")}))] == 1
    assert samples[("hanet_daemon_up", frozenset({("daemon", "metadata"), ("name", "metadata")}))] == 0
    assert samples[("hanet_ruleset_in_place", frozenset())] == 0
    assert samples[("hanet_peer_up", frozenset({("peer", "net3")}))] == 0
    assert samples[("hanet_peer_probe_rtt_seconds", frozenset({("peer", "net2")}))] == pytest.approx(0.0012)
    assert ("hanet_peer_probe_rtt_seconds", frozenset({("peer", "net3")})) not in samples  # never answered
    # the parser strips _total from a counter family's name, the sample keeps it
    assert types["hanet_peer_probe_misses"] == "counter"
    assert samples[("hanet_peer_probe_misses_total", frozenset({("peer", "net3")}))] == 40
    assert samples[("hanet_network_servable", frozenset({("network", "other")}))] == 0
    assert samples[("hanet_network_servable", frozenset({("network", "shared")}))] == 1
    assert ("hanet_network_servable", frozenset({("network", "private")})) not in samples  # not its to serve


def test_counters_and_histograms_survive_the_process_and_parse(tmp_path):
    store = metrics.host_store(Paths(root_dir=str(tmp_path)))
    store.add("hanet_takeovers_total", {"network": "shared", "bound_by": "warm", "result": "complete"})
    store.add("hanet_takeovers_total", {"network": "shared", "bound_by": "warm", "result": "complete"})
    store.add("hanet_garps_sent_total", {"result": "sent"}, 12)
    for took in (0.03, 0.2, 7.0):
        store.observe("hanet_takeover_duration_seconds", took, {"network": "shared"})
    store.set("hanet_gateway_last_transition_timestamp_seconds", {"network": "shared"}, 1700000000.5)
    again = metrics.Store(store.path)  # another process reads the same file
    samples, types = parse(metrics.render(again.families().values()))
    assert types["hanet_takeover_duration_seconds"] == "histogram"
    net = ("network", "shared")
    assert samples[("hanet_takeovers_total", frozenset({net, ("bound_by", "warm"), ("result", "complete")}))] == 2
    assert samples[("hanet_garps_sent_total", frozenset({("result", "sent")}))] == 12
    assert samples[("hanet_takeover_duration_seconds_count", frozenset({net}))] == 3
    assert samples[("hanet_takeover_duration_seconds_sum", frozenset({net}))] == pytest.approx(7.23)
    assert samples[("hanet_takeover_duration_seconds_bucket", frozenset({net, ("le", "0.05")}))] == 1
    assert samples[("hanet_takeover_duration_seconds_bucket", frozenset({net, ("le", "0.25")}))] == 2
    assert samples[("hanet_takeover_duration_seconds_bucket", frozenset({net, ("le", "+Inf")}))] == 3
    assert samples[("hanet_gateway_last_transition_timestamp_seconds", frozenset({net}))] == 1700000000.5
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600


def test_concurrent_counting_loses_nothing(tmp_path):
    store = metrics.Store(str(tmp_path / "m.json"))

    def count():
        for _ in range(50):
            store.add("hanet_fences_total")

    threads = [threading.Thread(target=count) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    samples, _ = parse(metrics.render(store.families().values()))
    assert samples[("hanet_fences_total", frozenset())] == 200


def test_a_broken_store_counts_anew_and_never_raises(tmp_path):
    path = tmp_path / "m.json"
    path.write_text("{not json")
    store = metrics.Store(str(path))
    assert store.families() == {}
    store.add("hanet_fences_total")
    assert parse(metrics.render(store.families().values()))[0][("hanet_fences_total", frozenset())] == 1
    bad = metrics.Store(str(tmp_path / "missing-dir" / "x" / "m.json"))
    (tmp_path / "missing-dir").write_text("a file where a directory should be")
    bad.add("hanet_fences_total")  # logged, not raised


def test_label_values_are_escaped():
    fam = metrics.Family("hanet_reports_rejected_total").add({"reason": 'a "b"\\c\nd'}, 1)
    samples, _ = parse(metrics.render([fam]))
    assert samples[("hanet_reports_rejected_total", frozenset({("reason", 'a "b"\\c\nd')}))] == 1


def test_only_catalogued_names_are_rendered():
    with pytest.raises(KeyError):
        metrics.render([metrics.Family("hanet_made_up").add({}, 1)])
    assert metrics.render([]) == ""


def test_every_catalogued_name_follows_the_conventions():
    for name, (kind, help_text, labels, where) in metrics.CATALOGUE.items():
        assert name.startswith("hanet_"), name
        assert kind in ("gauge", "counter", "histogram"), name
        assert name.endswith("_total") == (kind == "counter"), name
        assert help_text.endswith("."), name
        assert where in ("minion", "master"), name
        assert "le" not in labels and "instance" not in labels and "job" not in labels, name


def test_master_gauges_from_the_record():
    owners = {
        "shared": {"owner": "net2", "epoch": 4, "since": 1700000000.0, "confirmed": False},
        "vx": {"owner": "net1", "epoch": 1},
    }
    samples, _ = parse(metrics.render(metrics.master_families(owners, "etcd", True).values()))
    assert samples[("hanet_gateway_owner", frozenset({("network", "shared"), ("host", "net2")}))] == 1
    assert samples[("hanet_gateway_epoch", frozenset({("network", "shared")}))] == 4
    assert samples[("hanet_gateway_move_unconfirmed", frozenset({("network", "shared")}))] == 1
    assert ("hanet_gateway_move_unconfirmed", frozenset({("network", "vx")})) not in samples
    assert samples[("hanet_record_up", frozenset({("backend", "etcd")}))] == 1
    down, _ = parse(metrics.render(metrics.master_families(None, "etcd", False).values()))
    assert down == {("hanet_record_up", frozenset({("backend", "etcd")})): 0}


@pytest.mark.parametrize(
    "reason, kind",
    [
        ("malformed tag", "malformed"),
        ("stale event (detected 61.0 s ago: ...)", "stale"),
        ("replayed event", "replayed"),
        ("not from net1: bad signature", "forged"),
        ("net2 watches no network that net1 holds", "not_at_stake"),
        ("second opinion: net1 answers the master (192.0.2.11)", "alive"),
        ("second opinion: the master cannot check net1", "unchecked"),
        ("no live standby for shared", "no_standby"),
        ("net1 cannot serve shared, and no live standby can (...)", "no_standby"),
        ("pillar: hanet:networks: ...", "pillar"),
        ("no decision: etcd quorum lost", "record"),
        ("something new", "other"),
    ],
)
def test_rejected_reasons_become_labels(reason, kind):
    assert failover.reject_kind(reason) == kind


def test_the_writer_writes_at_once_and_stops(tmp_path):
    done = threading.Event()
    calls = []

    def write():
        calls.append(1)
        done.set()

    w = metrics.Writer(write, interval=60).start()
    assert done.wait(5)
    w.stop()
    assert not w._thread.is_alive() and calls == [1]
