"""hanet_lab.leaks' comparison: what counts as leaked between two snapshots."""
from hanet_lab.leaks import Row, compare, leaks, table


def test_growth_is_a_leak_and_shrinking_is_not():
    base = {("addresses", "net1"): 12, ("threads", "net2"): 20, ("fds", "master"): 30}
    after = {("addresses", "net1"): 12, ("threads", "net2"): 23, ("fds", "master"): 28}
    rows = compare(base, after)
    assert {(r.resource, r.node): r.leaked for r in rows} == {
        ("addresses", "net1"): 0, ("threads", "net2"): 3, ("fds", "master"): 0}
    assert leaks(rows) == [Row("threads", "net2", 20, 23)]


def test_a_count_on_one_side_only_cannot_be_compared():
    """The engine process gone after the cycles: its threads are unknown, not zero."""
    rows = compare({("threads", "master"): 9, ("files", "net1"): 4}, {("threads", "master"): None})
    assert [(r.resource, r.leaked) for r in leaks(rows)] == [("threads", None), ("files", None)]


def test_rows_by_node_then_resource_order():
    keys = {("fds", "net1"): 1, ("addresses", "net1"): 1, ("processes", "master"): 1}
    assert [(r.node, r.resource) for r in compare(keys, keys)] == [
        ("master", "processes"), ("net1", "addresses"), ("net1", "fds")]


def test_table():
    text = table([Row("links", "net2", 14, 15), Row("fds", "net1", None, 3)])
    assert text.splitlines() == ["| resource | host | baseline | after | leaked |", "|---|---|---|---|---|",
                                 "| links | net2 | 14 | 15 | 1 |", "| fds | net1 | ? | 3 | ? |"]
