"""The last hanet pillar a host saw, kept for the failover path (``hanet._config``):
with hot multi-master Salt runs the beacon in the first master's minion object, whose
pillar is empty while that master is down; a warm takeover, the fence and the
announcements must still know the networks."""

import importlib.util
import json
import os
import stat

import pytest
import yaml

HERE = os.path.dirname(__file__)
EXAMPLE = os.path.join(HERE, "..", "..", "pillar", "hanet.sls")


def _apply(mod, test=False):
    """``hanet.apply_facet`` without touching the host (its facet does nothing)."""
    mod._facet = lambda facet, state, paths, managed: ([], None)
    return mod.apply_facet("links", test=test)


def _module(tmp_path, pillar):
    spec = importlib.util.spec_from_file_location(
        "hanet_module_under_test", os.path.join(HERE, "..", "..", "_modules", "hanet.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.__opts__ = {"id": "net2", "root_dir": str(tmp_path)}
    mod.__pillar__ = pillar
    mod.__context__ = {}
    return mod


@pytest.fixture
def example():
    with open(EXAMPLE) as fh:
        return yaml.safe_load(fh)["hanet"]


def kept(tmp_path):
    return tmp_path / "var" / "lib" / "hanet" / "pillar.json"


def test_an_applied_pillar_is_kept_readable_by_root_only(tmp_path, example):
    mod = _module(tmp_path, {"hanet": example})
    cfg = mod._config()
    assert not kept(tmp_path).exists(), "reading the pillar keeps nothing"
    _apply(mod)
    assert json.loads(kept(tmp_path).read_text()) == json.loads(json.dumps(example, default=str))
    assert stat.S_IMODE(os.stat(kept(tmp_path)).st_mode) == 0o600
    # a minion object without the pillar: the failover path uses the kept one
    bare = _module(tmp_path, {})
    assert bare._config(last_known=True).networks.keys() == cfg.networks.keys()
    assert bare._config().networks == {}  # anything else (the states) does not
    assert bare._takeover_context().cfg.networks.keys() == cfg.networks.keys()
    # a pillar without hanet (the host left hanet's targeting, a render error) is not "no pillar"
    other = _module(tmp_path, {"hanet_owners": {}})
    assert other._config(last_known=True).networks == {}


def test_an_invalid_pillar_is_not_kept(tmp_path, example):
    _apply(_module(tmp_path, {"hanet": example}))
    before = kept(tmp_path).read_text()
    broken = dict(example, networks={"x": {"bridge": 7}})
    mod = _module(tmp_path, {"hanet": broken})
    with pytest.raises(mod.PillarInvalid):
        _apply(mod)
    assert kept(tmp_path).read_text() == before


def test_without_a_kept_pillar_the_failover_path_has_no_networks(tmp_path):
    assert _module(tmp_path, {})._config(last_known=True).networks == {}
    assert not kept(tmp_path).exists()


def test_a_test_mode_run_keeps_nothing(tmp_path, example):
    mod = _module(tmp_path, {"hanet": example})
    _apply(mod, test=True)
    assert not kept(tmp_path).exists()
    _apply(mod)
    assert kept(tmp_path).exists()


def test_the_beacon_knows_the_record_the_last_apply_saw(tmp_path, example):
    """A host that was off while its network moved: its own copy still says it serves
    (epoch 1), the master's record (pillar hanet_owners, epoch 2) says net1 does. The
    beacon, which reads files only, must see the move: the apply keeps the record."""
    from _hanet import takeover
    from _hanet.common import Paths

    paths = Paths(root_dir=str(tmp_path))
    takeover.write_local_owner(paths, "shared", "net2", 1)
    from _hanet import host

    assert host.beacon_owners(paths)["shared"] == "net2"
    mod = _module(tmp_path, {"hanet": example, "hanet_owners": {"shared": {"owner": "net1", "epoch": 2}}})
    _apply(mod)
    assert host.beacon_owners(paths)["shared"] == "net1"
    rec = tmp_path / "var" / "lib" / "hanet" / host.APPLIED_RECORD
    assert stat.S_IMODE(os.stat(rec).st_mode) == 0o600
    # a later takeover here (epoch 3) wins over the record the apply saw
    takeover.write_local_owner(paths, "shared", "net2", 3)
    assert host.beacon_owners(paths)["shared"] == "net2"
