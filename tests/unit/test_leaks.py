"""hanet_lab.leaks' comparison: what counts as leaked between two snapshots."""

from hanet_lab.leaks import Row, compare, leaks, table


def test_growth_is_a_leak_and_shrinking_is_not():
    base = {("addresses", "net1"): 12, ("threads", "net2"): 20, ("fds", "master"): 30}
    after = {("addresses", "net1"): 12, ("threads", "net2"): 23, ("fds", "master"): 28}
    rows = compare(base, after)
    assert {(r.resource, r.node): r.leaked for r in rows} == {
        ("addresses", "net1"): 0,
        ("threads", "net2"): 3,
        ("fds", "master"): 0,
    }
    assert leaks(rows) == [Row("threads", "net2", 20, 23)]


def test_a_count_on_one_side_only_cannot_be_compared():
    """The engine process gone after the cycles: its threads are unknown, not zero."""
    rows = compare({("threads", "master"): 9, ("files", "net1"): 4}, {("threads", "master"): None})
    assert [(r.resource, r.leaked) for r in leaks(rows)] == [("threads", None), ("files", None)]


def test_rows_by_node_then_resource_order():
    keys = {("fds", "net1"): 1, ("addresses", "net1"): 1, ("processes", "master"): 1}
    assert [(r.node, r.resource) for r in compare(keys, keys)] == [
        ("master", "processes"),
        ("net1", "addresses"),
        ("net1", "fds"),
    ]


def test_table():
    text = table([Row("links", "net2", 14, 15), Row("fds", "net1", None, 3)])
    assert text.splitlines() == [
        "| resource | host | baseline | after | leaked |",
        "|---|---|---|---|---|",
        "| links | net2 | 14 | 15 | 1 |",
        "| fds | net1 | ? | 3 | ? |",
    ]


def test_grew_names_what_there_is_more_of():
    from collections import Counter

    from hanet_lab import leaks as mod

    base = {
        "net2": {
            "processes": Counter({"salt-minion": 1, "dnsmasq --conf-file=a": 1}),
            "fds": Counter({"1:socket": 10, "1:/dev/null": 1}),
        }
    }
    after = {
        "net2": {
            "processes": Counter({"salt-minion": 1, "dnsmasq --conf-file=a": 2}),
            "fds": Counter({"1:socket": 12, "1:/dev/null": 1, "1:pipe": 1}),
        }
    }
    assert mod.grew(base, after) == [
        "net2 fds: +1 1:pipe",
        "net2 fds: +2 1:socket",
        "net2 processes: +1 dnsmasq --conf-file=a",
    ]
    assert mod.grew(after, base) == []
    assert mod._fd_kind("socket:[12345]") == "socket" and mod._fd_kind("pipe:[9]") == "pipe"
    assert mod._fd_kind("anon_inode:[eventpoll]") == "anon_inode:[eventpoll]"
