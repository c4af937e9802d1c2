"""hanet installed the two ways Salt users install extensions, side by side in one lab:

    compute1   the formula way: the master serves the checkout, saltutil.sync_all
    compute2   the pip way: ``pip install <checkout>`` (here into a directory on the
               minion's PYTHONPATH), no sync; Salt finds hanet through the
               ``salt.loader`` entry point (pyproject.toml, package saltext_hanet)

Both must serve their VMs the same. A synced copy shadows an installed one (Salt looks
in extmods first): the last test shows it, as docs/install.md says.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest

pytestmark = pytest.mark.lab

CHECKOUT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PIP_HOST, SYNCED_HOST = "compute2", "compute1"


def _copy_checkout(dest):
    """The files a clone has (the build writes build/ and *.egg-info into its source)."""
    shutil.copytree(
        CHECKOUT,
        dest,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", "__pycache__", "build", "*.egg-info", ".pytest_cache", ".hypothesis", "out"
        ),
    )


@pytest.fixture(scope="module")
def site():
    """``pip install --no-deps`` of the checkout into a fresh directory: what a host's
    site-packages gains from ``pip install saltext-hanet`` (the dependencies are the
    venv's already)."""
    with tempfile.TemporaryDirectory(prefix="hanet-pip-") as tmp:
        src, target = os.path.join(tmp, "src"), os.path.join(tmp, "site")
        _copy_checkout(src)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-deps",
                "--target",
                target,
                src,
            ],
            check=True,
            timeout=300,
        )
        yield target


LOADER_CHECK = textwrap.dedent("""
    import json, os, sys, tempfile
    import salt.config, salt.loader
    empty = tempfile.mkdtemp()  # no synced copy: only the installed extension can answer
    out = {}
    mopts = salt.config.minion_config(None)
    mopts.update(extension_modules=empty, file_client="local", cachedir=empty, pki_dir=empty)
    for ext in ("modules", "states", "beacons"):
        out[ext] = [d for d in salt.loader._module_dirs(mopts, ext) if "saltext_hanet" in d]
    mods = salt.loader.minion_mods(mopts)
    out["functions"] = sorted(f for f in mods if f.startswith("hanet."))
    out["version"] = mods["hanet.version"]()
    out["states_loaded"] = sorted(f for f in salt.loader.states(mopts, mods, {}, {}) if f.startswith("hanet."))
    out["beacons_loaded"] = [b for b in salt.loader.beacons(mopts, mods) if b.startswith("hanet_liveness.")]
    popts = salt.config.master_config(None)
    popts.update(extension_modules=empty, cachedir=empty, pki_dir=empty, sock_dir=empty)
    for ext in ("runners", "engines", "pillar"):
        out[ext] = [d for d in salt.loader._module_dirs(popts, ext, ext_type_dirs=ext[:-1] + "_dirs"
                                                        if ext == "runners" else None)
                    if "saltext_hanet" in d]
    out["runners_loaded"] = sorted(f for f in salt.loader.runner(popts) if f.startswith("hanet."))
    out["pillar_loaded"] = [p for p in salt.loader.pillars(popts, {}) if p.startswith("hanet_owners")]
    print(json.dumps(out))
""")


def test_the_entry_point_hands_salt_every_kind_of_module(site):
    import json

    env = dict(os.environ, PYTHONPATH=site)
    # not from the checkout: its saltext_hanet/ (the bare package) would be found first
    got = subprocess.run(
        [sys.executable, "-c", LOADER_CHECK],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=os.path.dirname(site),
    )
    assert got.returncode == 0, got.stderr[-3000:]
    out = json.loads(got.stdout.strip().splitlines()[-1])
    for ext in ("modules", "states", "beacons", "runners", "engines", "pillar"):
        assert out[ext] and out[ext][0].startswith(site), (ext, out[ext])
    assert {"hanet.status", "hanet.takeover", "hanet.metrics", "hanet.version"} <= set(out["functions"])
    assert out["version"]["installed"] is True and out["version"]["source"].startswith(site)
    assert {"hanet.validated", "hanet.links", "hanet.ruleset", "hanet.dnsmasq"} <= set(out["states_loaded"])
    assert out["beacons_loaded"], out
    assert {"hanet.status", "hanet.liveness", "hanet.evacuate", "hanet.metrics"} <= set(out["runners_loaded"])
    assert out["pillar_loaded"] == ["hanet_owners"]


@pytest.fixture(scope="module")
def mixed(site, lab_factory):
    """A lab where compute2's minion loads hanet from the pip install and compute1's
    from a sync. compute2 also stops state.apply from syncing the master's _modules
    (autoload_dynamic_modules: False): this lab's master serves the checkout for
    compute1, a pip-only site would not serve _modules at all (docs/install.md)."""
    from hanet_lab import default_topology
    from hanet_lab.pillar import lab_pillar

    t = default_topology(hosts=2)
    t.hosts[PIP_HOST].opts["autoload_dynamic_modules"] = False
    lab = lab_factory(t, sync=False, minion_env={PIP_HOST: {"PYTHONPATH": site}})
    lab.sync(SYNCED_HOST)
    lab.set_pillar(lab_pillar(lab.topology))
    return lab


def test_both_ways_serve_their_vms(mixed):
    lab = mixed
    versions = lab.salt("*", "hanet.version")
    assert versions[PIP_HOST]["installed"] is True, versions
    assert versions[SYNCED_HOST]["installed"] is False and "extmods" in versions[SYNCED_HOST]["source"], versions
    assert versions[PIP_HOST]["version"] == versions[SYNCED_HOST]["version"]
    for plugged in (False, True):  # the VMs' ports are bound by the apply after plugging
        res = lab.salt("*", "state.apply", ["hanet"], timeout=240)
        assert set(res) == {PIP_HOST, SYNCED_HOST}
        for host, ret in res.items():
            assert isinstance(ret, dict), (host, ret)
            bad = {k: v["comment"] for k, v in ret.items() if v["result"] is False}
            assert not bad, (host, bad)
        if not plugged:
            for vm in ("web1", "db1"):
                lab.plug_vm(vm)
    # a VM on each host gets its lease from its own host, and the pip host's beacon runs
    assert lab.dhcp("web1", "udhcpc")["address"] == "192.168.0.10"
    lease = lab.dhcp("db1", "dhclient")
    assert lease["address"] == "192.168.0.11" and lease["router"] == "192.168.0.4", lease
    assert "hanet_liveness" in lab.salt(PIP_HOST, "beacons.list", kwarg={"return_yaml": False})[PIP_HOST]
    # nothing was synced to the pip host: no copy of hanet in its extmods
    extmods = os.path.join(lab.minion_root(PIP_HOST), "var", "cache", "salt", "minion", "extmods")
    assert not os.path.exists(os.path.join(extmods, "modules", "hanet.py"))
    # the second apply has nothing to do on either
    again = lab.salt("*", "state.apply", ["hanet"], timeout=240)
    assert {h: [k for k, v in r.items() if v["changes"]] for h, r in again.items()} == {PIP_HOST: [], SYNCED_HOST: []}


def test_a_synced_copy_shadows_the_installed_one(mixed):
    lab = mixed
    lab.sync(PIP_HOST)
    got = lab.salt(PIP_HOST, "hanet.version")[PIP_HOST]
    assert got["installed"] is False and "extmods" in got["source"], got
