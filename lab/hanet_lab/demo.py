"""``hanet_lab demo``: a guided tour for a newcomer. Builds a lab, shows what is where,
asks every minion (through the real master) what it sees, shows hanet's desired state
per host, applies the highstate, plugs the VMs and shows each one getting its lease,
reaching upstream through its host's NAT and reading its metadata, applies again (no
changes), then tears everything down (also on Ctrl-C or a failure).

One function per section, each taking the ``Tour``; ``SECTIONS`` is the running order.
To add a section, write ``def my_section(t: Tour)`` (start it with ``t.section(...)``,
end it with ``t.wait()``) and put it in ``SECTIONS``."""

from __future__ import annotations

import json
import textwrap
import time

from .lab import Lab, LabError
from .pillar import lab_pillar
from .topology import default_topology

WIDTH = 78


def section(n: int, title: str, text: str = "") -> None:
    print()
    print("=" * WIDTH)
    print(f" {n}. {title}")
    print("=" * WIDTH)
    if text:
        print(textwrap.fill(textwrap.dedent(text).strip(), WIDTH))
        print()


def _short_error(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else text[:200]


def _addr_list(addrs) -> str:
    out = []
    for a in addrs or []:
        if isinstance(a, dict):
            a = a.get("cidr") or a.get("address") or _one_line(a)
        elif isinstance(a, (list, tuple)):
            a = "/".join(str(x) for x in a)
        out.append(str(a))
    return ", ".join(out) or "no address"


def _print_desired_summary(d: dict) -> None:
    """A newcomer's view of hanet.desired; raises KeyError/TypeError when the shape differs."""
    for b in d["bridges"]:
        print(
            f"    bridge   {b['name']:<6} network {b['network']:<8} uplink {b['uplink'] or '-':<5} "
            f"{_addr_list(b.get('addresses'))}"
        )
    for m in d.get("dnsmasqs") or []:
        print(f"    dnsmasq  {m['network']:<8} on {m['bridge']}, listening on {m['listen_address']}")
    rs = d.get("ruleset") or {}
    for n in rs.get("snat") or []:
        print(f"    SNAT     {n['cidr']} -> {n['source']} (out {n.get('out_interface')})")
    for f in d.get("floating_ips") or []:
        print(f"    floating {f['address']} -> {f['fixed_ip']} ({f.get('instance')})")
    roles = ", ".join(f"{net} {role}" for net, role in d.get("roles") or [])
    if roles:
        print(f"    roles    {roles}")
    here = ", ".join(i.get("name", "?") for i in d.get("instances") or [])
    print(f"    VMs here {here or '-'}")


def _print_desired(host: str, d) -> None:
    print(f"--- {host}")
    if not isinstance(d, dict):
        print(f"    (no answer: {_short_error(d)})")
        return
    if "error" in d:
        print("    pillar error: " + _short_error(d["error"]))
        return
    try:
        _print_desired_summary(d)
        return
    except (KeyError, TypeError, ValueError, AttributeError):
        pass  # the shape changed: show it generically
    for key, value in d.items():
        if isinstance(value, (list, tuple)):
            print(f"    {key}: {len(value)} item(s)")
            for item in value[:6]:
                print("      - " + _one_line(item))
            if len(value) > 6:
                print(f"      ... {len(value) - 6} more")
        elif isinstance(value, dict):
            print(f"    {key}:")
            for k, v in list(value.items())[:8]:
                print(f"      {k}: {_one_line(v)}")
            if len(value) > 8:
                print(f"      ... {len(value) - 8} more")
        else:
            print(f"    {key}: {value}")


def _one_line(v) -> str:
    s = json.dumps(v, default=str, separators=(", ", ": ")) if not isinstance(v, str) else v
    return s if len(s) <= 100 else s[:97] + "..."


class DemoFailed(Exception):
    """Something the tour shows did not happen; the message says what."""


class Tour:
    """What the sections share: the lab, its topology, the pillar, what earlier sections found."""

    def __init__(self, lab: Lab, topo, pause: bool = False):
        self.lab, self.topo, self.pause = lab, topo, pause
        self.pillar = lab_pillar(topo)
        # the VM on a network-host network gets a floating IP: the failover then shows
        # the upstream router's ARP entry for it moving to the standby's MAC
        h = self.pillar["hanet"]
        for inst in h["instances"].values():
            if h["networks"][inst["nics"][0]["network"]].get("network_hosts") and not inst.get("floating_ips"):
                inst["floating_ips"] = [STANDBY_FIP]
                break
        self.n = 1  # section 1 (what this is) is printed before the lab exists
        self.leases = {}  # vm -> lab.dhcp() result

    def section(self, title: str, text: str = "") -> None:
        self.n += 1
        section(self.n, title, text)

    def wait(self) -> None:
        if self.pause:
            input("\n[Enter] to continue ")

    # pillar lookups the sections explain their findings with
    def instance(self, vm: str) -> dict:
        return self.pillar["hanet"]["instances"][vm]

    def network(self, label: str) -> dict:
        return self.pillar["hanet"]["networks"][label]

    def host_address(self, host: str, label: str):
        return ((self.pillar["hanet"]["hosts"].get(host) or {}).get("networks", {}).get(label) or {}).get("address")


def show_topology(t: Tour) -> None:
    t.section(
        "The topology",
        """
        Each line below is one network namespace. Hosts are named like the minion ids
        in hanet's example pillar; their interfaces (mgmt0, eth0..eth4) are veths whose
        other end sits in a bridge of the switch namespace, one bridge per segment.""",
    )
    print(t.lab.describe())
    print()
    tm = t.lab.timings
    print(
        f"Up in {tm['up']:.1f} s (network {tm['network']:.1f} s, minions answering "
        f"{tm.get('minions_ping', 0):.1f} s, saltutil.sync_all done {tm.get('sync_all', 0):.1f} s)."
    )
    t.wait()


def show_minions(t: Tour) -> None:
    t.section(
        "Every minion is a whole host",
        """
        The master (in its own namespace) runs hanet.links on every minion. Each minion
        runs inside its host's namespace, so it sees that host's links only: not the
        other hosts', not the switch's bridges, not this machine's real interfaces.""",
    )
    print("$ salt '*' hanet.links")
    links = t.lab.salt("*", "hanet.links")
    for host in sorted(links):
        print(f"  {host:<10} {' '.join(links[host]) if isinstance(links[host], list) else links[host]}")
    missing = sorted(set(t.topo.hosts) - set(links))
    if missing:
        print(f"  (no answer from {missing})")
    t.wait()


def show_router(t: Tour) -> None:
    t.section(
        "The upstream router",
        """
        The router sits on the public segment (203.0.113.1) and runs a tiny web server;
        GET /whoami answers the source address it saw, which is how tests check SNAT.""",
    )
    lab = t.lab
    ok = lab.ping("compute1", ROUTER)
    print(f"  compute1 pings {ROUTER}: {'yes' if ok else 'NO'}")
    try:
        print(
            f"  compute1: GET http://{ROUTER}/whoami -> {lab.http_get('compute1', f'http://{ROUTER}/whoami').strip()}"
        )
    except LabError as e:
        print(f"  GET failed: {e}")
    arp = lab.arp_cache("router")
    for ip, n in sorted(arp.items()):
        print(f"  router's ARP cache: {ip} is at {n['mac']} ({n['state']}, {n['ifname']})")
    t.wait()


def show_desired(t: Tour) -> None:
    t.section(
        "What hanet wants on each host",
        """
        The lab now serves a pillar that matches its own interface names (the contract's
        example pillar, with a flat hardware-gateway network instead of VLANs, which this
        kernel lacks). hanet.desired computes, from the pillar alone, what each host
        should hold; nothing is changed on the hosts yet.""",
    )
    lab, pillar = t.lab, t.pillar
    funcs = lab.functions("hanet")
    print(f"  hanet functions on the minions: {', '.join(funcs) or 'none'}")
    if "hanet.desired" not in funcs:
        raise DemoFailed("the minions have no hanet.desired: saltutil.sync_all did not bring hanet over")
    nets = pillar["hanet"]["networks"]
    print("  networks in the lab pillar:")
    for name, n in nets.items():
        who = (
            "every host that lists it (multi_host)"
            if n.get("multi_host")
            else f"network hosts {n.get('network_hosts')}"
        )
        print(
            f"    {name:<8} {n['cidr']:<16} {n['bridge']} on {n['bridge_interface']}, "
            f"gateway {n['gateway']} ({n.get('gateway_mode', 'host')}), served by {who}"
        )
    print("  instances: " + ", ".join(f"{i} on {v['host']}" for i, v in pillar["hanet"]["instances"].items()))
    lab.set_pillar(pillar)
    print()
    print("$ salt '*' hanet.desired")
    desired = lab.salt("*", "hanet.desired", timeout=60)
    for host in sorted(t.topo.hosts):
        _print_desired(host, desired.get(host, "no answer"))
    print()
    print(
        textwrap.fill(
            "Roles: 'serving' = this host is the network's gateway and DHCP server; "
            "'standby' = it takes over when the serving host fails; 'member' = it only "
            "carries the bridge for its own VMs.",
            WIDTH,
        )
    )
    t.wait()


def _highstate(t: Tour) -> tuple[dict, float]:
    """``salt '*' state.apply`` (the highstate: salt://top.sls gives every minion ``hanet``):
    ({host: {state id: ret}}, seconds). Raises DemoFailed when a host fails or is silent."""
    t0 = time.monotonic()
    res = t.lab.salt("*", "state.apply", timeout=240)
    took = time.monotonic() - t0
    problems = []
    for host in sorted(t.topo.hosts):
        ret = res.get(host)
        if not isinstance(ret, dict):
            problems.append(f"{host}: {_short_error(ret if ret is not None else 'no answer')}")
            continue
        for st in ret.values():
            if not st.get("result"):
                problems.append(f"{host} {st.get('__id__')}: {_short_error(st.get('comment', ''))}")
    if problems:
        raise DemoFailed("state.apply failed:\n  " + "\n  ".join(problems))
    return res, took


def _changes(ret: dict) -> list:
    """[(state id, [change lines])] of one host's state.apply return, in run order."""
    out = []
    for st in sorted(ret.values(), key=lambda s: s.get("__run_num__", 0)):
        lines = []
        for v in (st.get("changes") or {}).values():
            lines += v if isinstance(v, list) else [_one_line(v)]
        if lines:
            out.append((st["__id__"], lines))
    return out


def apply_highstate(t: Tour) -> None:
    t.section(
        "Apply the highstate",
        """
        Now the real thing: the master runs the highstate on every minion. Its top file
        gives every host the 'hanet' SLS, whose states (links, sysctls, ruleset, dnsmasq,
        metadata, ...) each compare the host with the pillar and change only the
        difference. Below, per host, what each state changed.""",
    )
    print("$ salt '*' state.apply")
    res, took = _highstate(t)
    for host in sorted(t.topo.hosts):
        ret = res[host]
        changed = _changes(ret)
        secs = sum(st.get("duration", 0) for st in ret.values()) / 1000
        print(f"  {host}: {len(ret)} states, {len(changed)} made changes ({secs:.1f} s of state work)")
        for sid, lines in changed:
            more = f" (+{len(lines) - 3} more)" if len(lines) > 3 else ""
            print(f"    {sid.replace('hanet-', ''):<9} " + "; ".join(lines[:3])[: WIDTH * 2] + more)
    print(f"  ({took:.1f} s for the whole cluster, hosts in parallel)")
    t.wait()


CLIENTS = ("dhclient", "udhcpc")  # alternated over the VMs: both clients must work


def plug_vms(t: Tour) -> None:
    t.section(
        "Plug the VMs",
        """
        The bridges exist now, so the VMs are plugged in: each VM's NIC is a veth whose
        host end (the lab's 'tap-<vm>') joins its network's bridge on its host, as a
        hypervisor would plug a VM's tap. hanet's bridge-family rules let a VM port send
        only from its own MAC and IP (and never answer DHCP). The beacon's port watch
        binds each new port to its NIC (libvirt's tap MAC rule) as it appears, in the
        anti-spoofing table's dynamic sets: no apply is needed after plugging.""",
    )
    lab = t.lab
    for vm, spec in sorted(t.topo.vms.items()):
        if vm in t.pillar["hanet"]["instances"]:
            taps = lab.plug_vm(vm)
            print(f"  {vm:<5} plugged: {', '.join(taps)} in {spec.bridge} on {spec.host}")
    time.sleep(0.2)
    for host in sorted({spec.host for vm, spec in t.topo.vms.items() if vm in t.pillar["hanet"]["instances"]}):
        listing = lab.exec(host, "nft list table bridge hanet", check=False).stdout
        bound = [
            line.strip().rstrip(",").replace("elements = { ", "").rstrip(" }")
            for part in listing.split("_dpairs {")[1:]
            for line in part.split("}", 1)[0].splitlines()
            if " . " in line
        ]
        print(f"  {host}: bound by the port watch: {'; '.join(bound) or 'none'}")
    t.wait()


def vm_leases(t: Tour) -> None:
    t.section(
        "VMs get their leases",
        """
        A real DHCP client runs in each VM: ISC dhclient or busybox udhcpc, alternately.
        The answer comes from the dnsmasq of the host that serves the network; its
        router option is that host's own address on a multi_host network (each host is
        its VMs' gateway), the moving gateway address on a network-host network, and
        the hardware router's address on a hardware-gateway network.""",
    )
    lab = t.lab
    for i, (vm, spec) in enumerate(sorted(t.topo.vms.items())):
        if vm not in t.pillar["hanet"]["instances"]:
            continue
        client = CLIENTS[i % len(CLIENTS)]
        nic = t.instance(vm)["nics"][0]
        net = t.network(nic["network"])
        if net.get("gateway_mode") == "hardware":
            want, why = net["gateway"], "the hardware router"
        elif net.get("multi_host"):
            want, why = t.host_address(spec.host, nic["network"]), f"{spec.host}'s own address (multi_host)"
        else:
            want, why = net["gateway"], f"the gateway held by {net['network_hosts'][0]}"
        lease = lab.dhcp(vm, client)
        t.leases[vm] = lease
        ok = lease["address"] == nic["ip"] and lease["router"] == want
        print(
            f"  {vm:<5} on {spec.host}/{spec.bridge}  {client:<8}  {lease['address']}/{lease['prefixlen']}"
            f"  router {lease['router']}  from {lease.get('server')}"
        )
        print(f"        {'ok' if ok else 'UNEXPECTED'}: the pillar's address {nic['ip']}, router = {why}")
        if not ok:
            raise DemoFailed(
                f"{vm} got {lease['address']} router {lease['router']}; expected {nic['ip']} router {want}"
            )
    t.wait()


def vm_upstream(t: Tour) -> None:
    t.section(
        "VMs reach the outside world",
        """
        Each VM asks the upstream router http://203.0.113.1/whoami, which answers with the
        source address it saw. VMs on hanet-gatewayed networks leave through their host's
        SNAT: the router sees that host's routing_source_ip, or the VM's floating IP when
        it has one. On the hardware-gateway network the router itself is the VMs'
        gateway, so it sees the VM's own address; except from a VM with a floating IP,
        whose traffic off the network its host takes from the bridge and SNATs to the
        floating IP (nova's "hybrid" option).""",
    )
    lab, hosts = t.lab, t.pillar["hanet"]["hosts"]
    for vm in t.leases:
        inst = t.instance(vm)
        nic = inst["nics"][0]
        net = t.network(nic["network"])
        serving = t.topo.vms[vm].host if net.get("multi_host") else net["network_hosts"][0]
        fips = [
            f if isinstance(f, str) else f["address"]
            for f in inst.get("floating_ips", [])
            if isinstance(f, str) or f.get("fixed_ip") == nic["ip"]
        ]
        if net.get("gateway_mode") == "hardware" and fips:
            want, why = fips[0], "its floating IP (its host routes it off the network)"
        elif net.get("gateway_mode") == "hardware":
            want, why = nic["ip"], "its own address (the router is its gateway)"
        elif fips:
            want, why = fips[0], "its floating IP"
        else:
            want, why = hosts[serving]["routing_source_ip"], f"{serving}'s routing_source_ip"
        try:
            seen = lab.http_get(vm, f"http://{ROUTER}/whoami").strip()
        except LabError as e:
            raise DemoFailed(f"{vm} cannot reach the router: {_short_error(str(e))}") from e
        print(
            f"  {vm:<5} GET http://{ROUTER}/whoami -> router saw {seen:<15} "
            f"{'ok' if seen == want else 'UNEXPECTED'}: {why}"
        )
        if seen != want:
            raise DemoFailed(f"the router saw {vm} as {seen}, expected {want} ({why})")
    t.wait()


def floating_from_upstream(t: Tour) -> None:
    t.section(
        "A floating IP reached from upstream",
        """
        A VM with a floating IP runs a tiny web server; the upstream router asks the
        floating IP. Its host holds the address as a /32 on its public interface (the
        router's ARP cache shows that host's MAC) and DNATs it to the VM, which sees
        the router's own address as the client.""",
    )
    import os
    import sys

    lab = t.lab
    vm = next((v for v in t.leases if t.instance(v).get("floating_ips")), None)
    if vm is None:
        print("  (no VM with a floating IP in this lab)")
        return
    f = t.instance(vm)["floating_ips"][0]
    fip = f if isinstance(f, str) else f["address"]
    lab.popen(
        vm,
        [
            sys.executable,
            os.path.join(os.path.dirname(__file__), "httpd.py"),
            vm,
            "80",
            os.path.join(lab.rundir, f"http-{vm}.log"),
        ],
        name=f"httpd-{vm}",
    )
    seen = None
    for _ in range(20):  # the web server needs a moment to listen
        cp = lab.exec("router", ["curl", "-sS", "--max-time", "2", f"http://{fip}/whoami"])
        if cp.returncode == 0:
            seen = cp.stdout.strip()
            break
        time.sleep(0.2)
    host = t.topo.vms[vm].host
    arp = (lab.arp_cache("router").get(fip) or {}).get("mac")
    print(f"  router: GET http://{fip}/whoami -> {vm} saw the client as {seen}")
    print(f"  router's ARP cache: {fip} is at {arp} ({host} eth0 is {lab.mac(host, 'eth0')})")
    if seen != ROUTER:
        raise DemoFailed(f"the router did not reach {vm} through its floating IP {fip}")
    t.wait()


def vm_metadata(t: Tour) -> None:
    t.section(
        "VMs read their metadata",
        """
        http://169.254.169.254/ is redirected by each host's ruleset to hanet's metadata
        service on that host, which finds the VM by its source address and answers with
        its own data only (EC2 and OpenStack paths). On the hardware-gateway network the
        request would go to the router: the host's bridge takes it off the wire first
        and hands it to the same service, so the router needs no configuration.""",
    )
    lab = t.lab
    ec2 = "http://169.254.169.254/latest/meta-data"
    for vm in t.leases:
        nic = t.instance(vm)["nics"][0]
        try:
            hostname = lab.http_get(vm, f"{ec2}/hostname").strip()
            iid = lab.http_get(vm, f"{ec2}/instance-id").strip()
            local = lab.http_get(vm, f"{ec2}/local-ipv4").strip()
        except LabError as e:
            raise DemoFailed(f"{vm} got no metadata: {_short_error(str(e))}") from e
        ok = hostname.split(".")[0] == vm and local == nic["ip"]
        print(
            f"  {vm:<5} hostname {hostname:<16} instance-id {iid:<12} local-ipv4 {local:<14} "
            f"{'ok' if ok else 'UNEXPECTED'}"
        )
        if not ok:
            raise DemoFailed(f"{vm} was served someone else's metadata: {hostname} {local}")
    t.wait()


def _owner(t: Tour, label: str) -> str:
    """Who holds ``label``'s gateway, by what the network hosts say they hold."""
    for host in t.network(label)["network_hosts"]:
        if (t.lab.serving(host).get("networks") or {}).get(label):
            return host
    raise DemoFailed(f"no network host holds the gateway of {label}")


def _timeline(events, t_off):
    """Lines 'at +N ms: what' for the failover's events, from the power-off."""
    out = []
    for ev in events:
        tag, data = ev.get("tag", ""), ev.get("data") or {}
        if "/hanet_liveness/" in tag and tag.endswith("/down"):
            what = f"{data.get('observer')} reports {data.get('peer')} down (signed liveness event)"
            at = data.get("detected_at")
        elif tag.endswith("/complete"):
            d = data.get("decision") or {}
            if d.get("published_at"):
                out.append(
                    (
                        d["published_at"],
                        f"the master decided: {data.get('to')} takes "
                        f"{data.get('network')} at epoch {data.get('epoch')}",
                    )
                )
            tm = data.get("timings") or {}
            done = data.get("completed_at")
            if done and "bound_s" in tm and "dhcp_s" in tm:
                out.append(
                    (
                        done - tm["dhcp_s"] + tm["bound_s"],
                        f"{data.get('to')} bound {', '.join(data.get('addresses') or [])} "
                        "(after duplicate address detection)",
                    )
                )
                if "announced_s" in tm:
                    out.append((done - tm["dhcp_s"] + tm["announced_s"], "gratuitous ARP sent on both sides"))
            what, at = f"{data.get('to')} confirms: dnsmasq serves {data.get('network')} again", done
        else:
            continue
        if at:
            out.append((at, what))
    return [f"  +{(at - t_off) * 1000:6.0f} ms  {what}" for at, what in sorted(out)]


SHOWN_METRICS = (
    "hanet_gateway_held{",
    "hanet_takeovers_total{",
    "hanet_takeover_duration_seconds_sum",
    "hanet_failovers_total{",
    "hanet_gateway_owner{",
    "hanet_peer_up{",
)


def _scrape(t: Tour, label: str, hosts) -> list:
    """A few of the lines node_exporter would serve from the hosts' and the master's
    metrics files (docs/metrics.md), about network ``label``."""
    out = []
    for host in hosts:
        text = (t.lab.salt(host, "hanet.metrics", kwarg={"write": False}) or {}).get(host) or ""
        out += [
            f"{host}: {line}"
            for line in text.splitlines()
            if line.startswith(SHOWN_METRICS) and (f'network="{label}"' in line or "peer=" in line)
        ]
    text = t.lab.salt_run("hanet.metrics", kwarg={"write": False}) or ""
    out += [
        f"master: {line}"
        for line in text.splitlines()
        if line.startswith(SHOWN_METRICS) and f'network="{label}"' in line
    ]
    return out


def failover(t: Tour) -> None:
    t.section(
        "A network host dies: its standby takes over",
        """
        'shared' is a network-host network: one host (net1) is the gateway, DHCP server
        and NAT for every VM on it, and net2 stands by with the same rules loaded. Now
        the owner loses power while app1 pings the upstream router every 10 ms. The
        standby's beacon misses three probes and reports it, signed; the master checks it
        against its own watch, records the new owner (epoch + 1) and orders the takeover;
        the standby checks that nobody answers for the addresses, binds them and
        announces them with gratuitous ARP, so app1 and the router learn its MAC.""",
    )
    from . import chaos

    lab = t.lab
    vm = next((v for v in t.leases if t.network(t.instance(v)["nics"][0]["network"]).get("network_hosts")), None)
    if vm is None:
        print("  (no VM on a network-host network in this lab)")
        return
    label = t.instance(vm)["nics"][0]["network"]
    gateway = t.network(label)["gateway"]
    old = _owner(t, label)
    new = next(h for h in t.network(label)["network_hosts"] if h != old)
    fip = _first_fip(t.instance(vm))
    print(f"  {label}: gateway {gateway} held by {old}; {new} stands by")
    print(f"  {vm}'s ARP cache: {gateway} is at {_mac_of(lab, vm, gateway)}")
    if fip:
        lab.ping("router", fip)  # so that the router has an entry to show
        print(f"  router's ARP cache: {vm}'s floating IP {fip} is at {_mac_of(lab, 'router', fip)}")
    print(f"$ salt {new} hanet.metrics; salt-run hanet.metrics   (a few lines, before)")
    for line in _scrape(t, label, [new]):
        print(f"  {line}")
    events = []
    with (
        lab.events() as ev,
        chaos.Pinger(lab, vm, ROUTER, interval=0.01) as ping,
        chaos.Pinger(lab, "router", fip or ROUTER, interval=0.01) as ping_up,
    ):
        time.sleep(1.0)
        print(f"$ (power off {old})")
        t_off = chaos.power_off(lab, old)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            got = ev.wait("*", timeout=max(0.1, deadline - time.monotonic()))
            if got is None:
                break
            if got.get("tag", "").startswith(("salt/beacon/", "hanet/failover/")):
                events.append(got)
            if got.get("tag") == f"hanet/failover/{label}/complete":
                break
        time.sleep(1.0)
    outage, _, lost = ping.outage(after=t_off)
    for line in _timeline(events, t_off):
        print(line)
    if outage is None:
        raise DemoFailed(f"{vm} got no pings answered around the failover")
    print(
        f"  {vm}'s pings to the router stopped for {outage * 1000:.0f} ms ({lost} lost); "
        f"its ARP cache: {gateway} is now at {_mac_of(lab, vm, gateway)}"
    )
    if fip:
        up_outage, _, up_lost = ping_up.outage(after=t_off)
        print(
            f"  the router's pings to {fip} stopped for {(up_outage or 0) * 1000:.0f} ms ({up_lost} lost); "
            f"its ARP cache: {fip} is now at {_mac_of(lab, 'router', fip)}"
        )
    if outage > 5 or not lab.ping(vm, ROUTER, count=2, timeout=5):
        raise DemoFailed(f"{vm} did not reach the router again after {old} died")
    lease = lab.dhcp(vm, client="udhcpc")
    print(f"  {vm} renews its lease: {lease['address']} from {lease['server']} (dnsmasq on {new} now)")
    print("  the same metrics after (what Prometheus scrapes through node_exporter's textfile collector):")
    for line in _scrape(t, label, [new]):
        print(f"  {line}")
    t.failed_over = (label, old, new, vm)
    t.wait()


def failback(t: Tour) -> None:
    t.section(
        "The old owner returns, and a planned move back",
        """
        The host boots; its start-up apply finds in the record that the network moved,
        so it binds nothing and comes back as the standby (no automatic failback: the
        network does not flap back). Moving it back is an operator's decision: the runner
        'hanet.evacuate <host>' makes every network it holds move to a standby: the old
        owner lets go first but keeps forwarding, the new one binds once the addresses
        are silent and announces them: never two holders, and at most a packet lost.""",
    )
    from . import chaos

    if not getattr(t, "failed_over", None):
        return
    label, old, new, vm = t.failed_over
    lab = t.lab
    print(f"$ (power on {old})")
    chaos.power_on_started(lab, old)
    held = (lab.serving(old).get("networks") or {}).get(label)
    print(f"  {old} is back: holds the gateway of {label}: {bool(held)} (it stands by now)")
    print(f"$ salt-run hanet.evacuate {new}")
    time.sleep(2)  # the beacons see the returned host up again
    with chaos.Pinger(lab, vm, ROUTER, interval=0.01) as ping:
        time.sleep(0.5)
        got = lab.salt_run("hanet.evacuate", [new], timeout=60)
        time.sleep(1.0)
    gap, _, lost = ping.outage()
    print(f"  {_one_line(got)}")
    print(f"  {vm}'s pings during the planned move: {lost} lost, longest gap {(gap or 0) * 1000:.0f} ms")
    if _owner(t, label) != old:
        raise DemoFailed(f"{label} did not move back to {old}")
    t.wait()


def second_highstate(t: Tour) -> None:
    t.section(
        "Apply again: nothing to do",
        """
        The same highstate once more. Every state finds the host already as the pillar
        says, so nothing changes: no rule replaced, no dnsmasq restarted, no lease lost.
        (Change the pillar and apply again, and only the difference would be made.)""",
    )
    print("$ salt '*' state.apply")
    res, took = _highstate(t)
    for host in sorted(t.topo.hosts):
        changed = _changes(res[host])
        secs = sum(st.get("duration", 0) for st in res[host].values()) / 1000
        print(
            f"  {host}: {len(res[host])} states, "
            + ("no changes" if not changed else f"CHANGED: {changed}")
            + f" ({secs:.1f} s of state work)"
        )
        if changed:
            raise DemoFailed(f"the second apply changed {host}: {changed}")
    print(f"  ({took:.1f} s)")
    t.wait()


def teardown_note(t: Tour) -> None:
    t.section(
        "Tear down",
        """
        Leaving the 'with Lab(...)' block kills every process living in the lab's
        namespaces (salt, dnsmasq, DHCP clients, web servers), deletes the namespaces
        and the run directory. The same happens on an exception, on SIGINT/SIGTERM,
        and 'hanet_lab down --stale' sweeps what a SIGKILLed run left.""",
    )


ROUTER = "203.0.113.1"
STANDBY_FIP = "203.0.113.60"  # the floating IP of the VM on the network-host network


def _first_fip(inst):
    fips = inst.get("floating_ips") or []
    if not fips:
        return None
    return fips[0] if isinstance(fips[0], str) else fips[0].get("address")


def _mac_of(lab, node, ip):
    """``ip``'s MAC in ``node``'s ARP cache, with the host whose interface has it."""
    mac = (lab.arp_cache(node).get(ip) or {}).get("mac")
    if not mac:
        return "(no entry)"
    for host in sorted(lab.topology.hosts):
        cp = lab.exec(host, "cat /sys/class/net/*/address")
        if mac.lower() in cp.stdout.lower().split():
            return f"{mac} ({host}'s)"
    return mac


SECTIONS = (
    show_topology,
    show_minions,
    show_router,
    show_desired,
    apply_highstate,
    plug_vms,
    vm_leases,
    vm_upstream,
    floating_from_upstream,
    vm_metadata,
    second_highstate,
    failover,
    failback,
    teardown_note,
)


def run_demo(hosts: int = 4, pause: bool = False, keep: bool = False) -> int:
    hosts = max(hosts, 3)
    t0 = time.monotonic()
    section(
        1,
        "What this is",
        """
        hanet turns Salt minions into nova-network style hosts: bridges, dnsmasq DHCP,
        NAT and failover. To try it without real machines, this lab builds a small cluster
        out of Linux network namespaces on this one machine: a 'switch' namespace holding
        one bridge per network segment, a salt-master, several hosts each running a real
        salt-minion, an upstream router, and VMs (namespaces with a veth plugged into a
        bridge on their host). Nothing touches the machine's own interfaces, and
        everything is removed at the end.""",
    )
    topo = default_topology(hosts=hosts)
    lab = Lab(topo, progress=lambda m: print(f"  .. {m}", flush=True))
    print(f"Building lab {lab.prefix} ({hosts} hosts + master + router + {len(topo.vms)} VMs)...")
    rc = 0
    try:
        with lab:  # down() on leaving: normally, on an exception, on Ctrl-C
            tour = Tour(lab, topo, pause)
            for step in SECTIONS:
                if keep and step is teardown_note:
                    break
                step(tour)
            if keep:
                lab.detach()  # leaving the with block does not remove it now
                print(
                    f"\nThe lab {lab.prefix} stays up. Try:\n"
                    f"  ./dev lab exec net2 -- ip -br addr\n"
                    f"  ./dev lab salt '*' hanet.status\n"
                    f"  ./dev lab exec net2 -- cat {lab.minion_root('net2')}/var/lib/hanet/metrics/hanet.prom\n"
                    f"and remove it with: ./dev lab down --prefix {lab.prefix}"
                )
    except DemoFailed as e:
        print(f"\nDEMO FAILED: {e}")
        rc = 1
    except KeyboardInterrupt:
        print("\ninterrupted")
        rc = 130
    finally:
        if "down" in lab.timings:
            print(
                f"  lab {lab.prefix} removed in {lab.timings['down']:.1f} s; whole demo {time.monotonic() - t0:.1f} s"
            )
    return rc
