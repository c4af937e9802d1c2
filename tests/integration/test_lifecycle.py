"""The life of a hanet host under `state.apply hanet` (real master and minions, the lab):
idempotence, test=True, removing a network or an instance, adding an instance, and an
invalid pillar. "Changes nothing" is checked on what the host holds: the kernel's ruleset,
links and addresses, hanet's processes and hanet's files under the minion's root_dir.

    compute1 br100 192.168.0.3, br300 172.16.100.3    web1 192.168.0.10, web2 192.168.0.12
    compute2 br100 192.168.0.4, br300 172.16.100.4    db1 192.168.0.11, hw1 172.16.100.10
"""

import copy
import hashlib
import os
import re

import pytest

pytestmark = pytest.mark.lab

HOSTS = ("compute1", "compute2")
WEB2 = {"host": "compute1", "nics": [{"network": "private", "mac": "fa:16:3e:00:00:03", "ip": "192.168.0.12"}]}
RULESET_STATE = "hanet_|-hanet-ruleset_|-hanet-ruleset_|-ruleset"
DNSMASQ_STATE = "hanet_|-hanet-dnsmasq_|-hanet-dnsmasq_|-dnsmasq"
VALIDATED_STATE = "hanet_|-hanet-pillar_|-hanet-pillar_|-validated"


@pytest.fixture(scope="module")
def lab_topology():
    from hanet_lab import default_topology
    from hanet_lab.topology import VM, Nic

    t = default_topology(hosts=2)
    t.vms["web2"] = VM(name="web2", host="compute1", nics=[Nic(bridge="br100", mac=WEB2["nics"][0]["mac"])])
    t.validate()
    return t


def state_apply(lab, tgt="*", test=False, ok=True, timeout=240):
    """`state.apply hanet` ({minion: {state id: ret}}); with ``ok`` no state may fail."""
    res = lab.salt(tgt, "state.apply", ["hanet"], kwarg={"test": True} if test else None, timeout=timeout)
    want = set(lab.topology.hosts) if tgt == "*" else {tgt} if isinstance(tgt, str) else set(tgt)
    assert set(res) == want, f"no answer from {want - set(res)}"
    for minion, ret in res.items():
        assert isinstance(ret, dict), f"{minion}: {ret}"
        if ok:
            bad = {k: v["comment"] for k, v in ret.items() if v["result"] is False}
            assert not bad, f"{minion}: {bad}"
    return res


def changes(res):
    """{minion: {state id: changes}} for the states that report changes."""
    return {m: {k: v["changes"] for k, v in ret.items() if v["changes"]} for m, ret in res.items()}


def dnsmasq_files(lab, host, label):
    root = lab.minion_root(host)
    return {
        k: os.path.join(root, "var/lib/hanet/dnsmasq", f"{label}.{k}")
        for k in ("hosts", "names", "leases", "log", "json", "opts")
    } | {"pid": os.path.join(root, "run/hanet", f"dnsmasq-{label}.pid")}


def read(path):
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


def dnsmasq_pid(lab, host, label):
    return int(read(dnsmasq_files(lab, host, label)["pid"]).strip())


def start_time(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])


def hanet_processes(lab, host):
    """hanet's daemons in the host (dnsmasq, the metadata service): sorted (pid, cmdline)."""
    return sorted(
        (pid, cl) for pid, cl in lab.processes(host)[host] if cl.startswith("dnsmasq") or "_hanet.metadata" in cl
    )


def hanet_files(lab, host):
    """{path: sha256} of every file hanet keeps under the minion's root_dir."""
    out = {}
    root = lab.minion_root(host)
    for top in ("var/lib/hanet", "run/hanet"):
        for d, _, names in os.walk(os.path.join(root, top)):
            for n in names:
                p = os.path.join(d, n)
                with open(p, "rb") as f:
                    out[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def snapshot(lab):
    """What the hosts hold: ruleset (counters masked), links, addresses, hanet's processes
    and files."""
    out = {}
    for h in HOSTS:
        nft = lab.exec(h, "nft list ruleset", check=True).stdout
        out[h] = {
            "nft": re.sub(r"counter packets \d+ bytes \d+", "counter", nft),
            "links": lab.exec(h, "ip -o link show", check=True).stdout,
            "addrs": lab.exec(h, "ip -o addr show", check=True).stdout,
            "procs": hanet_processes(lab, h),
            # the metrics textfile is an observation, rewritten by the beacon as leases,
            # probes and daemons change (like a log): what an apply changes is the rest
            "files": {f: d for f, d in hanet_files(lab, h).items() if not f.startswith("var/lib/hanet/metrics/")},
        }
    return out


def assert_same(before, after):
    for h in HOSTS:
        for k in before[h]:
            assert after[h][k] == before[h][k], f"{h}: {k} changed"


@pytest.fixture(scope="module")
def base_pillar(lab):
    from hanet_lab.pillar import lab_pillar

    p = lab_pillar(lab.topology)
    assert set(p["hanet"]["networks"]) == {"private", "hw"}
    assert set(p["hanet"]["instances"]) == {"web1", "db1", "hw1"}
    lab.set_pillar(p)
    state_apply(lab)
    for vm in ("web1", "db1", "hw1", "web2"):
        lab.plug_vm(vm)
    state_apply(lab)
    return p


@pytest.fixture
def base(lab, base_pillar):
    """Every test starts from the base pillar, applied."""
    lab.set_pillar(base_pillar)
    state_apply(lab)
    return copy.deepcopy(base_pillar)


def test_second_apply_reports_no_changes(lab, base):
    res = state_apply(lab)
    assert changes(res) == {h: {} for h in HOSTS}
    for h in HOSTS:
        assert all(v["result"] is True for v in res[h].values())
        assert "already as the pillar says" in res[h][DNSMASQ_STATE]["comment"]
    # and with VMs holding leases, still nothing to do
    lab.dhcp("web1", "udhcpc")
    lab.dhcp("db1", "dhclient")
    assert changes(state_apply(lab)) == {h: {} for h in HOSTS}


def test_test_mode_reports_and_changes_nothing(lab, base):
    lab.dhcp("web1", "udhcpc")
    before = snapshot(lab)
    p = base
    p["hanet"]["instances"]["web2"] = copy.deepcopy(WEB2)  # a host entry, a guard pair
    p["hanet"]["dhcp_lease_time"] = 3600  # a dnsmasq restart on every host
    del p["hanet"]["networks"]["hw"]  # a bridge, addresses, a dnsmasq, rules
    del p["hanet"]["instances"]["hw1"]
    for h in HOSTS:
        del p["hanet"]["hosts"][h]["networks"]["hw"]
    lab.set_pillar(p)
    res = state_apply(lab, test=True)
    ch = changes(res)
    for h in HOSTS:
        assert set(ch[h]) >= {RULESET_STATE, DNSMASQ_STATE}, ch[h]
        assert res[h][DNSMASQ_STATE]["result"] is None
        text = str(ch[h])
        assert "br300" in text  # the bridge would go
        assert "hw" in str(ch[h][DNSMASQ_STATE])
    assert "restart private" in str(ch["compute1"][DNSMASQ_STATE])
    assert_same(before, snapshot(lab))
    # the real apply then does change the hosts (the snapshot could see it)
    state_apply(lab)
    after = snapshot(lab)
    for h in HOSTS:
        assert after[h]["nft"] != before[h]["nft"] and after[h]["procs"] != before[h]["procs"]
        assert after[h]["links"] != before[h]["links"] and after[h]["files"] != before[h]["files"]


def test_removing_a_network_leaves_nothing(lab, base):
    for h in HOSTS:
        assert "br300" in lab.links(h)
        assert any(a.startswith("172.16.100.") for a in lab.addresses(h, "br300"))
        assert "br300" in lab.exec(h, "nft list ruleset").stdout
        assert any("dnsmasq-hw.pid" in cl for _, cl in hanet_processes(lab, h))
        assert read(dnsmasq_files(lab, h, "hw")["hosts"]) is not None
    p = base
    del p["hanet"]["networks"]["hw"]
    del p["hanet"]["instances"]["hw1"]
    for h in HOSTS:
        del p["hanet"]["hosts"][h]["networks"]["hw"]
    lab.set_pillar(p)
    res = state_apply(lab)
    assert "stopped dnsmasq hw" in str(changes(res)["compute2"][DNSMASQ_STATE])
    for h in HOSTS:
        assert "br300" not in lab.links(h)
        assert not any(a.startswith("172.16.100.") for a in lab.addresses(h))
        assert lab.exec(h, "ip -o link show dev eth4").stdout.count("master") == 0  # uplink freed
        nft = lab.exec(h, "nft list ruleset").stdout
        assert "br300" not in nft and "172.16.100." not in nft and "eth4" not in nft
        assert not any("hw" in cl.split("--pid-file=")[-1] for _, cl in hanet_processes(lab, h))
        files = hanet_files(lab, h)
        assert not [f for f in files if re.search(r"(^|[/-])hw\.|dnsmasq-hw", f)], files
        for path in dnsmasq_files(lab, h, "hw").values():
            assert not os.path.exists(path), path
        assert "br300" not in read(os.path.join(lab.minion_root(h), "var/lib/hanet/managed.json"))
        st = lab.salt(h, "hanet.status")[h]
        assert set(st["networks"]) == {"private"}
    # the other network is untouched and still serves
    assert lab.dhcp("web1", "udhcpc")["address"] == "192.168.0.10"
    # the next apply has nothing left to remove
    assert changes(state_apply(lab)) == {h: {} for h in HOSTS}


def test_a_vm_plugged_after_the_apply_is_bound_at_once_and_the_next_apply_changes_nothing(lab, base):
    """nova's nwfilter took effect at plug time; so does hanet's port watch (the beacon):
    web2, in the pillar and applied while it was not running, gets its lease right after
    it is plugged, with no apply in between; the highstate after that has nothing to do;
    unplugged, its binding goes."""
    import time

    p = base
    p["hanet"]["instances"]["web2"] = copy.deepcopy(WEB2)
    lab.unplug_vm("web2")
    lab.set_pillar(p)
    state_apply(lab)
    bound = "fa:16:3e:00:00:03 . 192.168.0.12"

    def dpairs():
        return lab.exec("compute1", "nft list table bridge hanet", check=True).stdout.split("br100_dpairs", 1)[1]

    def is_bound():
        return bound in dpairs().split("}", 1)[0]

    def within(seconds, predicate):
        deadline = time.monotonic() + seconds
        while not predicate() and time.monotonic() < deadline:
            time.sleep(0.05)
        return predicate()

    assert not is_bound()
    try:
        t0 = time.monotonic()
        lab.plug_vm("web2")
        lease = lab.dhcp("web2", "udhcpc")
        took = time.monotonic() - t0
        assert lease["address"] == "192.168.0.12", lease
        # with `meta ibrname` the lease implies the binding (DHCP from a port needs its
        # MAC bound); without it (port-list mode, this kernel) a port is guarded once bound,
        # which may come a little after the lease
        assert within(2, is_bound), "the plugged port is not bound"
        print(f"plug -> lease {took:.2f} s (udhcpc), bound {time.monotonic() - t0:.2f} s")
        assert changes(state_apply(lab)) == {h: {} for h in HOSTS}, "the apply after plugging changed something"
        lab.unplug_vm("web2")
        assert within(5, lambda: not is_bound()), "the unplugged port is still bound"
    finally:
        lab.plug_vm("web2")  # as the other tests expect it


def test_status_names_a_vm_port_that_is_no_instance_nics(lab, base):
    """web2 is plugged into compute1's br100 but is not in the pillar: its port may send
    nothing, and the operator's screens say so (and stop saying so once it is)."""
    import time

    problem = "(MAC fe:16:3e:00:00:03) is no instance NIC's: it may send nothing"
    deadline = time.monotonic() + 10  # once (in a full run) a job still saw the last pillar
    while True:
        st = lab.salt("compute1", "hanet.status")["compute1"]
        if [p for p in st["problems"] if problem in p and "on br100" in p] or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert [p for p in st["problems"] if problem in p and "on br100" in p], st["problems"]
    assert any(u[2] == "fe:16:3e:00:00:03" for u in st["ports"]["unknown"]), st["ports"]
    cluster = lab.salt_run("hanet.status")
    assert [p for p in cluster["problems"] if p.get("host") == "compute1" and problem in p["problem"]]
    assert set(cluster["clock_skew"]) == set(HOSTS) and all(abs(v) < 5 for v in cluster["clock_skew"].values())
    p = base
    p["hanet"]["instances"]["web2"] = copy.deepcopy(WEB2)
    lab.set_pillar(p)
    state_apply(lab)
    st = lab.salt("compute1", "hanet.status")["compute1"]
    assert not [p for p in st["problems"] if problem in p] and st["ports"]["unknown"] == [], st


def test_adding_an_instance_sighups_dnsmasq_and_keeps_leases(lab, base):
    files = dnsmasq_files(lab, "compute1", "private")
    lease = lab.dhcp("web1", "dhclient")
    assert lease["address"] == "192.168.0.10"
    assert "fa:16:3e:00:00:01 192.168.0.10" in read(files["leases"])
    pid = dnsmasq_pid(lab, "compute1", "private")
    started = start_time(pid)
    assert lab.dhcp("web2", "udhcpc", timeout=4, check=False) is None  # not an instance yet

    p = base
    p["hanet"]["instances"]["web2"] = copy.deepcopy(WEB2)
    lab.set_pillar(p)
    res = state_apply(lab)
    msgs = changes(res)["compute1"][DNSMASQ_STATE]["dnsmasq"]
    assert msgs == [f"reloaded dnsmasq private hosts: SIGHUP pid {pid}"], msgs
    # compute2 learns web2's name (DNS across hosts), by SIGHUP, but serves it no DHCP
    c2 = dnsmasq_files(lab, "compute2", "private")
    c2_pid = dnsmasq_pid(lab, "compute2", "private")
    assert changes(res)["compute2"][DNSMASQ_STATE]["dnsmasq"] == [
        f"reloaded dnsmasq private hosts: SIGHUP pid {c2_pid}"
    ]
    assert "192.168.0.12 web2.novalocal web2" in read(c2["names"])
    assert "web2" not in read(c2["hosts"])
    # same process, never restarted
    assert dnsmasq_pid(lab, "compute1", "private") == pid and start_time(pid) == started
    assert "fa:16:3e:00:00:03,web2.novalocal,192.168.0.12" in read(files["hosts"])
    # web1's lease survived, and web1 renews it (dhclient re-requests its address)
    assert "fa:16:3e:00:00:01 192.168.0.10" in read(files["leases"])
    again = lab.dhcp("web1", "dhclient")
    assert again["address"] == "192.168.0.10" and again["server"] == "192.168.0.3"
    assert "DHCPREQUEST(br100) 192.168.0.10 fa:16:3e:00:00:01" in read(files["log"])
    # the reload took effect: web2 gets its lease now, and its port is guarded for it
    assert lab.dhcp("web2", "udhcpc")["address"] == "192.168.0.12"
    assert lab.http_get("web2", "http://203.0.113.1/whoami").strip() == "203.0.113.11"
    assert "fa:16:3e:00:00:03 . 192.168.0.12" in lab.exec("compute1", "nft list ruleset").stdout
    assert dnsmasq_pid(lab, "compute1", "private") == pid


def test_removing_an_instance_releases_its_lease_and_guard(lab, base):
    files = dnsmasq_files(lab, "compute1", "private")
    p = base
    p["hanet"]["instances"]["web2"] = copy.deepcopy(WEB2)
    lab.set_pillar(p)
    state_apply(lab)
    assert lab.dhcp("web2", "udhcpc")["address"] == "192.168.0.12"
    assert lab.dhcp("web1", "udhcpc")["address"] == "192.168.0.10"
    assert "fa:16:3e:00:00:03 192.168.0.12" in read(files["leases"])
    assert lab.ping("web2", "192.168.0.3")
    pid = dnsmasq_pid(lab, "compute1", "private")

    del p["hanet"]["instances"]["web2"]
    lab.set_pillar(p)
    res = state_apply(lab)
    msgs = changes(res)["compute1"][DNSMASQ_STATE]["dnsmasq"]
    assert "released lease 192.168.0.12 fa:16:3e:00:00:03 on br100" in msgs, msgs
    assert f"reloaded dnsmasq private hosts: SIGHUP pid {pid}" in msgs, msgs
    assert "fa:16:3e:00:00:03" not in read(files["leases"])
    assert "fa:16:3e:00:00:03" not in read(files["hosts"])
    assert "fa:16:3e:00:00:01 192.168.0.10" in read(files["leases"])  # web1's stays
    nft = lab.exec("compute1", "nft list ruleset").stdout
    assert "fa:16:3e:00:00:03" not in nft and "192.168.0.12" not in nft
    md = lab.exec(
        "compute1", "cat " + os.path.join(lab.minion_root("compute1"), "var/lib/hanet/metadata/records.json")
    ).stdout
    assert "web2" not in md
    # web2 is cut off: no lease any more, and its old address no longer passes the guard
    assert not lab.ping("web2", "192.168.0.3", count=2)
    assert lab.dhcp("web2", "udhcpc", timeout=4, check=False) is None
    assert lab.dhcp("web1", "udhcpc")["address"] == "192.168.0.10"
    assert changes(state_apply(lab)) == {h: {} for h in HOSTS}


def test_invalid_pillar_fails_with_every_problem_and_changes_nothing(lab, base):
    lab.dhcp("web1", "udhcpc")
    before = snapshot(lab)
    p = base
    inst = p["hanet"]["instances"]
    inst["web1"]["nics"][0]["ip"] = "10.9.9.9"  # outside its network
    inst["db1"]["nics"][0]["mac"] = inst["web1"]["nics"][0]["mac"]  # duplicate MAC
    inst["hw1"]["host"] = "compute9"  # unknown host
    inst["web1"]["nics"].append({"network": "nosuch", "mac": "fa:16:3e:00:00:09", "ip": "10.1.2.3"})
    p["hanet"]["networks"]["hw"]["gateway"] = "10.0.0.1"  # gateway outside the cidr
    p["hanet"]["instances"]["web2"] = copy.deepcopy(WEB2)  # a valid change, also not made
    lab.set_pillar(p)
    res = state_apply(lab, ok=False)
    for h in HOSTS:
        ret = res[h]
        assert ret[VALIDATED_STATE]["result"] is False
        comment = ret[VALIDATED_STATE]["comment"]
        assert comment.startswith("hanet pillar has 5 problem(s); nothing was changed:"), comment
        for path in (
            "hanet:instances:web1:nics:0:ip",
            "hanet:instances:web1:nics:0:mac",
            "hanet:instances:hw1:host",
            "hanet:instances:web1:nics:1:network",
            "hanet:networks:hw:gateway",
        ):
            assert path in comment, (path, comment)
        assert "10.9.9.9" in comment and "compute9" in comment and "nosuch" in comment
        # every other hanet state refused to act, and none reports a change
        assert all(v["result"] is False for v in ret.values()), ret
        assert not any(v["changes"] for v in ret.values())
    assert_same(before, snapshot(lab))
    assert lab.dhcp("web1", "udhcpc")["address"] == "192.168.0.10"
