"""conntrackd's config and plan (pure); the daemon itself runs in
tests/integration/test_open_connections.py."""

import os

from _hanet import conntrackd
from _hanet.common import Paths
from _hanet.desired import ConntrackSync

SYNC = ConntrackSync(interface="mgmt0", group="225.0.0.50", port=3780, accept=("10.20.0.0/24", "10.30.0.0/24"))


def test_the_config_names_the_link_the_group_and_only_the_networks_flows(tmp_path):
    paths = Paths(root_dir=str(tmp_path))
    text = conntrackd.render(SYNC, paths, "192.0.2.21")
    assert "Mode FTFW" in text
    for line in (
        "IPv4_address 225.0.0.50",
        "Group 3780",
        "IPv4_interface 192.0.2.21",
        "Interface mgmt0",
        "IPv4_address 10.20.0.0/24",
        "IPv4_address 10.30.0.0/24",
        "StartupResync on",  # a daemon that (re)starts asks the others for their flows
    ):
        assert line in text
    # everything it writes lives under the minion's root_dir (contract §1)
    for key in ("LockFile", "Path", "LogFile"):
        value = next(ln.split()[1] for ln in text.splitlines() if ln.strip().startswith(key + " "))
        assert value.startswith(str(tmp_path) + os.sep), (key, value)


def test_plan_starts_restarts_on_a_new_config_and_stops():
    text = "conf"
    assert [c.action for c in conntrackd.plan(SYNC, {"conf": None, "pid": None}, text)] == ["start"]
    assert conntrackd.plan(SYNC, {"conf": text, "pid": 42}, text) == []
    assert [c.action for c in conntrackd.plan(SYNC, {"conf": "old", "pid": 42}, text)] == ["restart"]
    assert [c.action for c in conntrackd.plan(None, {"conf": text, "pid": 42}, None)] == ["stop"]
    assert [c.action for c in conntrackd.plan(None, {"conf": text, "pid": None}, None)] == ["stop"]
    assert conntrackd.plan(None, {"conf": None, "pid": None}, None) == []
