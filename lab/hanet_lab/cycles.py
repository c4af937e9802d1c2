"""Failover cycles on a lab with :func:`~hanet_lab.pillar.standby_pillar`'s networks
(net1 serves every one, net2 stands by), each ending where it began: net1 the owner of
every network and net2 a standby, so that what the hosts keep can be compared from one
cycle to the next (:mod:`hanet_lab.leaks`).

- ``power_cycle``: net1 loses power (``chaos.power_off``), net2 takes every network
  over and the record confirms it; net1 boots and comes back a standby; then every
  network fails back to net1 (``hanet.failback``, planned).
- ``planned_cycle``: ``hanet.evacuate net1``, then every network fails back.
"""

from __future__ import annotations

import os
import time

from . import chaos
from .pillar import standby_networks, standby_pillar

OWNER, STANDBY = "net1", "net2"


def topology():
    """The default topology without compute2 (compute1 carries every instance) and VMs."""
    from . import default_topology

    topo = default_topology(hosts=4, vms=False)
    del topo.hosts["compute2"]
    topo.validate()
    return topo


def setup(lab, count):
    """Serve ``count`` networks from net1 with net2 standing by; hanet applied everywhere."""
    lab.set_pillar(standby_pillar(lab.topology, count, (OWNER, STANDBY)))
    res = lab.salt(sorted(lab.topology.hosts), "state.apply", ["hanet"], timeout=300)
    bad = {m: r for m, r in res.items() if not isinstance(r, dict) or any(v.get("result") is False for v in r.values())}
    if bad or set(res) != set(lab.topology.hosts):
        raise RuntimeError(f"state.apply hanet: {bad or sorted(set(lab.topology.hosts) - set(res))}")
    wait(f"{OWNER} serving every network", lambda: steady(lab, count, OWNER))


def record(lab):
    from _hanet import failover

    return failover.read_owners(os.path.join(lab.master_root, "var", "cache", "salt", "master"))


def wait(what, predicate, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise TimeoutError(f"timed out waiting for {what}")


def _bound(lab, host):
    out = {}
    for a in lab.addresses(host):
        out[a.split("/")[0]] = out.get(a.split("/")[0], 0) + 1
    return out


def steady(lab, count, owner):
    """``owner`` holds every gateway and floating IP exactly once, the other network
    host none, the record confirms ``owner`` for every network, and the other host
    answers as a standby for every one."""
    nets = standby_networks(count)
    other = STANDBY if owner == OWNER else OWNER
    served = [a for prefix, _, _, fip in nets.values() for a in (f"{prefix}.1", fip)]
    mine, theirs = _bound(lab, owner), _bound(lab, other)
    if any(mine.get(a) != 1 or a in theirs for a in served):
        return False
    rec = record(lab)  # no entry yet: the first network host owns it
    default = {"owner": OWNER, "confirmed": True}
    if not all(
        rec.get(n, default).get("owner") == owner and rec.get(n, default).get("confirmed") is True for n in nets
    ):
        return False
    got = lab.serving(other).get("networks", {})
    return got == {n: False for n in nets}


def _failback(lab, count):
    for label in standby_networks(count):
        lab.salt_run("hanet.failback", [label], timeout=120)
    wait(f"every network back on {OWNER}", lambda: steady(lab, count, OWNER))


def power_cycle(lab, count):
    chaos.power_off(lab, OWNER)
    nets = standby_networks(count)
    wait(
        f"{STANDBY} holding and confirmed for every network",
        lambda: all(
            record(lab).get(n, {}).get("owner") == STANDBY and record(lab)[n].get("confirmed") is True for n in nets
        ),
    )
    chaos.power_on_started(lab, OWNER)
    wait(f"{OWNER} back as a standby", lambda: lab.serving(OWNER).get("networks", {}) == {n: False for n in nets})
    wait(f"{STANDBY} alone serving every network", lambda: steady(lab, count, STANDBY))
    _failback(lab, count)


def planned_cycle(lab, count):
    lab.salt_run("hanet.evacuate", [OWNER], timeout=300)
    wait(f"{STANDBY} serving every network", lambda: steady(lab, count, STANDBY))
    _failback(lab, count)
