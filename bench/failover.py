#!/usr/bin/env python3
"""Failover outage under power loss: hanet vs keepalived (VRRPv3) side by side, with a PNG timeline.

One lab (the default topology: master, compute1/2, net1/net2, an upstream router). The
VM app1 sits on compute1's br200 (network ``shared``, 10.20.0.0/24, gateway 10.20.0.1,
network hosts net1 and net2) with the floating IP 203.0.113.60. Every trial:

- app1 pings the upstream router 203.0.113.1 through the gateway, and the router pings
  the floating IP 203.0.113.60, both every 10 ms (``ping -D -i 0.01``);
- after 1 s the active network host loses power (``chaos.power_off``: its links down,
  every process in its namespace SIGKILLed);
- the outage of each direction is the longest silence between two replies from then on;
- the host boots again (``chaos.power_on``) and the next trial kills the other one, so
  both directions of net1 <-> net2 are measured.

Rows (same run, same lab, one after the other):

1. hanet, ``ha`` defaults (probe every 100 ms, down after 3 misses): beacon -> master ->
   reactor -> ``runner.hanet.liveness`` -> ``hanet.takeover`` on the standby. Each trial's
   phases come from the events' own stamps (``detected_at`` of the liveness event, the
   ``salt/run/<jid>/new`` of the runner, the ``salt/job/<jid>/new`` of ``hanet.takeover``,
   the ``complete`` event's ``completed_at`` and step ``timings``).
2. hanet with ``ha: {probe_interval_ms: 50, probe_misses: 3}`` (``--no-fast`` skips it).
3. keepalived 2.2.7, VRRPv3, both BACKUP with ``nopreempt``, priority 100 both,
   ``advert_int`` 1 s, then 0.1 s. hanet's ``shared`` network (and net1/net2) are
   removed from the pillar first (hanet unbinds what it made, nobody else holds
   10.20.0.1 or 203.0.113.60); keepalived runs in net1 and net2 on eth3 with the VIPs
   10.20.0.1/24 (eth3) and 203.0.113.60/24 (eth0) in one VRRP instance, and a static
   nftables 1:1 NAT 203.0.113.60 <-> 10.20.0.10 on both hosts (what hanet's floating IP
   does); app1 keeps 10.20.0.10 with 10.20.0.1 as its gateway (static: keepalived does
   no DHCP). A rebooted host gets its address, NAT and keepalived back (its start-up).
3b. ``--fips N`` (issue 14; default 1,000, 0 skips it): hanet defaults with app1 holding N - 1 more
   floating IPs, from 198.18.0.0/22 (RFC 2544's benchmarking range, added to the
   router's public link); the router also pings the last of them, and the row reports
   when the first and the last answered again after the power loss (every address's
   gratuitous ARP is paced: ``arp.GARP_BURST``, ``arp.GARP_PPS``).
3c. ``--no-streams`` skips it: hanet defaults with the network's ``snat_address`` and
   ``ha:conntrack_sync`` (issue 14 §3); two TCP streams (``hanet_lab.stream``, 100 kB/s
   each way) run through every power loss, app1 -> router and router -> the floating
   IP; the row reports the longest pause and whether both survived (no reset, no byte
   lost).
4. hanet with two salt-masters and the failover record in etcd (issue 11), in a second
   lab built after the first is torn down (``--masters 2 --etcd 3``: master 192.0.2.1,
   master2 192.0.2.2, etcd 192.0.2.31-33): both masters up; then the first master
   SIGKILLed at the moment of each power loss (events heard on master2; the master is
   started again after the trial). ``--no-two-masters`` skips both rows. The report
   gives each row's p50 minus the one-master p50 (the target: within 0.1 s).

Prints per system and direction p50 / p95 / max (and the ratio to keepalived), the hanet
phase medians, and writes a PNG timeline of the median hanet trial (``--png``).

    ./dev bench failover [--trials 10] [--no-fast] [--no-keepalived] [--no-two-masters]
                         [--fips N] [--no-streams] [--png FILE] [--json FILE] [--md FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import threading
import sys
import time
import traceback

from hanet_lab import Lab, chaos, default_topology
from hanet_lab.pillar import lab_pillar

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKOUT = os.path.dirname(HERE)
VM, VM_IP, GW, ROUTER_IP, FIP = "app1", "10.20.0.10", "10.20.0.1", "203.0.113.1", "203.0.113.60"
NETHOSTS = ("net1", "net2")
MANY_NET, MANY_ROUTER = "198.18.0.0/22", "198.18.0.1/22"  # the --fips row's floating IPs
SNAT_ADDRESS = "203.0.113.45"  # the open-connections row's snat_address
STREAM_S = 6.0  # how long each stream of that row sends (the power loss comes 1 s in)


def many_fips(n):
    """The N - 1 floating IPs of the ``--fips N`` row (after FIP)."""
    import ipaddress

    hosts = ipaddress.ip_network(MANY_NET).hosts()
    next(hosts)  # the router's
    return [str(next(hosts)) for _ in range(n - 1)]


HOST_IP = {"net1": "10.20.0.2", "net2": "10.20.0.3"}
DIRS = [("vm", f"VM -> router (via gateway {GW})"), ("up", f"router -> floating IP {FIP}")]
PHASES = [
    ("detection", "detection (power-off -> detected_at)"),
    ("to_runner", "event -> decision start (engine, or the reactor's runner)"),
    ("runner", "decision (validate, 2nd opinion, record, publish)"),
    ("to_takeover", "publish -> takeover start (warm path, or the job)"),
    ("to_heard", "  of which publish -> order heard (the standby's listener)"),
    ("heard_to_start", "  of which order heard -> takeover start"),
    ("to_bound", "takeover start -> bound (DAD probe, addresses)"),
    ("to_garp", "bound -> announced (every address's first GARP sent)"),
    ("to_announced", "power-off -> announced (sum)"),
]


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def stamp(s):
    """Salt's ``_stamp`` (naive UTC ISO) -> epoch seconds."""
    if not s:
        return None
    return datetime.datetime.fromisoformat(s).replace(tzinfo=datetime.timezone.utc).timestamp()


def pctl(vals, q):
    """Percentile by linear interpolation between closest ranks (numpy's default)."""
    vals = sorted(v for v in vals if v is not None)
    if not vals:
        return None
    k = (len(vals) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(vals) - 1)
    return vals[lo] + (vals[hi] - vals[lo]) * (k - lo)


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


class BenchFailed(RuntimeError):
    pass


class Events:
    """The event buses of several masters as one (``wait`` like ``EventListener.wait``):
    with two masters a ``complete`` event goes to the master that ordered the takeover,
    either of them. An event both masters got (a liveness report) is returned once; a
    master that dies is dropped."""

    def __init__(self, lab, masters):
        self.listeners = [lab.events(m) for m in masters]
        self.seen = set()

    def wait(self, pattern, timeout=10.0):
        deadline = time.monotonic() + timeout
        while self.listeners:
            step = 0.05 if len(self.listeners) > 1 else max(0.05, deadline - time.monotonic())
            for ev in list(self.listeners):
                try:
                    got = ev.wait(pattern, timeout=step)
                except Exception:  # noqa: BLE001 - that master is gone
                    self.listeners.remove(ev)
                    continue
                if got is None:
                    continue
                data = {k: v for k, v in (got.get("data") or {}).items() if k != "_stamp"}
                key = (got["tag"], json.dumps(data, sort_keys=True, default=str))
                if key in self.seen:
                    continue
                self.seen.add(key)
                return got
            if time.monotonic() >= deadline:
                return None
        return None

    def close(self):
        for ev in self.listeners:
            try:
                ev.close()
            except Exception:  # noqa: BLE001
                pass


class Bench:
    def __init__(self, args):
        self.args = args
        self.lab = None
        self.rows = []  # {system, label, settings, trials: [...], load_before, load_after}
        self.failures = []  # failover failures (with the logs captured)
        self.benign = []  # rejected events that did not stop the failover
        self.ka_procs = {}
        self.outdir = args.outdir
        os.makedirs(self.outdir, exist_ok=True)

    # ------------------------------------------------------------------ lab
    def up(self, masters=1, etcd=0):
        log(
            f"lab: building the default topology ({masters} master(s)"
            + (f", {etcd} etcd members: the record in etcd" if etcd else ", the record in the master's file")
            + ")"
        )
        self.lab = Lab(default_topology(masters=masters, etcd=etcd), progress=lambda m: None).up()
        log(f"lab {self.lab.prefix} up in {self.lab.timings.get('up', 0):.1f} s")

    def down(self):
        for host in list(self.ka_procs):
            try:
                self.ka_stop(host)
            except Exception:  # noqa: BLE001
                pass
        if self.lab is not None:
            self.lab.down()
            self.lab = None

    def pillar(self, ha=None, keepalived=False, fips=0, streams=False):
        p = lab_pillar(self.lab.topology)
        h = p["hanet"]
        if streams:  # the open-connections row: the SNAT address moves, conntrackd carries the flows
            h["networks"]["shared"]["snat_address"] = SNAT_ADDRESS
            h.setdefault("ha", {})["conntrack_sync"] = {"interface": "mgmt0"}
        if keepalived:
            h["networks"].pop("shared")
            for host in NETHOSTS:
                h["hosts"].pop(host, None)
            h["instances"].pop(VM)
        else:
            h["instances"][VM]["floating_ips"] = [FIP] + [{"address": a, "fixed_ip": VM_IP} for a in many_fips(fips)]
            if ha:
                h["ha"] = dict(ha)
        return p

    def apply(self, tgt="*"):
        got = self.lab.salt(tgt, "state.apply", ["hanet"], timeout=180)
        bad = {}
        for minion, ret in got.items():
            if not isinstance(ret, dict):
                bad[minion] = ret
                continue
            for sid, r in ret.items():
                if isinstance(r, dict) and r.get("result") is False:
                    bad.setdefault(minion, {})[sid] = r.get("comment")
        if bad:
            raise BenchFailed(f"state.apply hanet failed: {json.dumps(bad, indent=1, default=str)[:3000]}")
        return got

    def check_paths(self):
        ok_vm = self.lab.ping(VM, ROUTER_IP, count=3, timeout=2.0)
        ok_up = self.lab.ping("router", FIP, count=3, timeout=2.0)
        if not (ok_vm and ok_up):
            raise BenchFailed(
                f"before the trials: VM -> router {'ok' if ok_vm else 'FAILS'}, "
                f"router -> {FIP} {'ok' if ok_up else 'FAILS'}"
            )

    def holder(self, address, ifname=None, hosts=NETHOSTS):
        """The network hosts (of ``hosts``) that have ``address`` bound."""
        out = []
        for host in hosts:
            cp = self.lab.exec(host, ["ip", "-4", "-o", "addr", "show"] + (["dev", ifname] if ifname else []))
            if any(f" {address}/" in line for line in cp.stdout.splitlines()):
                out.append(host)
        return out

    def capture_logs(self, why):
        d = os.path.join(self.outdir, f"logs-{len(self.failures) + 1}")
        os.makedirs(d, exist_ok=True)
        rd = self.lab.rundir
        src = {"master": os.path.join(rd, "master", "var", "log", "salt", "master")}
        for host in self.lab.topology.hosts:
            src[f"minion-{host}"] = os.path.join(self.lab.minion_root(host), "var", "log", "salt", "minion")
        for name, path in src.items():
            if os.path.exists(path):
                shutil.copy(path, os.path.join(d, name + ".log"))
        if os.path.isdir(os.path.join(rd, "logs")):
            shutil.copytree(os.path.join(rd, "logs"), os.path.join(d, "daemon-logs"), dirs_exist_ok=True)
        rec = os.path.join(rd, "master", "var", "cache", "salt", "master", "hanet", "owners.json")
        if os.path.exists(rec):
            shutil.copy(rec, os.path.join(d, "owners.json"))
        with open(os.path.join(d, "WHY.txt"), "w") as f:
            f.write(why + "\n")
        return d

    # ------------------------------------------------------------------ hanet
    def hanet_setup(self, ha, fips=0, streams=False):
        log(
            f"hanet: pillar with shared network, floating IP {FIP}"
            + (f" and {fips - 1} more" if fips > 1 else "")
            + f" for {VM}, ha={ha or 'defaults'}"
        )
        if fips > 1 and MANY_ROUTER not in self.lab.addresses("router", "eth0"):
            self.lab.exec("router", ["ip", "addr", "add", MANY_ROUTER, "dev", "eth0"], check=True)
        self.lab.set_pillar(self.pillar(ha=ha, fips=fips, streams=streams))
        self.apply("*")
        if VM not in self.lab.plugged:
            self.lab.plug_vm(VM)
            self.apply("compute1")  # guard the new port
            lease = self.lab.dhcp(VM, client="udhcpc")
            if lease["address"] != VM_IP or lease["router"] != GW:
                raise BenchFailed(f"unexpected lease {lease}")
        self.check_paths()
        time.sleep(2)  # beacons see their peers up (rise) before the first power loss

    def owner(self):
        try:  # the master's file, or etcd (two masters)
            return (self.lab.owners().get("shared") or {}).get("owner") or "net1"
        except Exception:  # noqa: BLE001 - nothing recorded yet
            return "net1"

    def drain(self, ev, pattern, wait=0.3):
        out = []
        while True:
            got = ev.wait(pattern, timeout=wait)
            if got is None:
                return out
            out.append(got)
            wait = 0.05

    def hanet_trial(self, active, row, kill_master=None, last_fip=None, streams=False):
        """One power loss of ``active``; ``kill_master``: that salt-master is killed at the
        same moment (its events are then heard on another master); ``last_fip``: the
        router also pings that floating IP (the --fips row's last); ``streams``: two TCP
        streams run through it (app1 -> router, router -> the floating IP)."""
        lab = self.lab
        flows = {}
        if streams:
            from hanet_lab.stream import Stream

            for name, args in (("out", ("router", VM, ROUTER_IP, 5001)), ("in", (VM, "router", FIP, 5002))):
                flows[name] = Stream(lab, *args, duration=STREAM_S).start()
        # every master's bus (one master: the lab's own); a master killed at the power
        # loss is not listened to
        ev = Events(lab, [m for m in lab.masters if m != kill_master]) if len(lab.masters) > 1 else lab.events()
        killer = None
        try:
            vm = chaos.Pinger(lab, VM, ROUTER_IP).start()
            up = chaos.Pinger(lab, "router", FIP).start()
            last = chaos.Pinger(lab, "router", last_fip).start() if last_fip else None
            time.sleep(1)
            if kill_master:  # the master dies with the owner: started together
                killer = threading.Thread(target=lab.stop_master, args=(kill_master,))
                killer.start()
            t0 = chaos.power_off(lab, active)
            # a move decided by the killed master is finished by the other's reconcile
            # loop (CONFIRM_S, 5 s, and a restarted takeover): give it time
            deadline = time.monotonic() + self.args.timeout + (30 if kill_master else 0)
            complete = failed = None
            rejected = []
            while time.monotonic() < deadline:
                got = ev.wait("hanet/failover/*", timeout=max(0.05, deadline - time.monotonic()))
                if got is None:
                    break
                if got["tag"].endswith("/complete"):
                    complete = got
                    break
                if got["tag"].endswith("/failed"):
                    failed = got
                    break
                rejected.append(got)
            time.sleep(1.5)
            vm.stop()
            up.stop()
            if last is not None:
                last.stop()
            rejected += [e for e in self.drain(ev, "hanet/failover/*", 0.2) if e["tag"].endswith("/rejected")]
            downs = self.drain(ev, f"salt/beacon/*/hanet_liveness/{active}/down")
            runs = [
                e for e in self.drain(ev, "salt/run/*/new") if (e["data"] or {}).get("fun") == "runner.hanet.liveness"
            ]
            rets = {e["tag"].split("/")[2]: e["data"] for e in self.drain(ev, "salt/run/*/ret", 0.1)}
            jobs = [
                e for e in self.drain(ev, "salt/job/*/new", 0.1) if (e["data"] or {}).get("fun") == "hanet.takeover"
            ]
        finally:
            ev.close()
            if killer is not None:
                killer.join(30)
                lab.start_master(master=kill_master, wait_minions=False)
                # every minion but the powered-off host's (it boots after the trial)
                lab.wait_minions(sorted(h for h in lab.topology.hosts if h != active), master=kill_master, timeout=300)
                lab.via = lab.masters[0]
        trial = {
            "system": "hanet",
            "row": row,
            "killed": active,
            "t0": t0,
            "vm_replies": vm.replies(),
            "up_replies": up.replies(),
        }
        if flows:
            trial["streams"] = {}
            for name, flow in flows.items():
                ends = flow.results(STREAM_S + 30)
                flow.stop()
                ok = bool(ends["server"] and ends["client"])
                ok = ok and all(e["error"] is None and e["intact"] for e in ends.values())
                ok = ok and ends["server"]["received"] == ends["client"]["sent"]
                ok = ok and ends["client"]["received"] == ends["server"]["sent"]
                pause = max((e["pause_s"] for e in ends.values() if e), default=None)
                trial["streams"][name] = {"survived": ok, "pause": pause, "ends": ends}
        for key, p in (("vm", vm), ("up", up), ("last", last)):
            if p is None:
                continue
            gap, began, lost = p.outage(after=t0)
            # back: when it answered again, counted from the power loss
            back = began + gap - t0 if gap is not None and began is not None else None
            trial[key] = {"outage": gap, "began": began, "lost": lost, "back": back}
        trial["downs"] = [
            {
                "observer": e["tag"].split("/")[2],
                "detected_at": e["data"].get("detected_at"),
                "stamp": stamp(e["data"].get("_stamp")),
            }
            for e in downs
        ]
        trial["rejected"] = [
            {"tag": e["tag"], "reason": e["data"].get("reason"), "observer": e["data"].get("observer")}
            for e in rejected
        ]
        if complete is None:
            why = (
                f"{row} trial: power-off of {active}: "
                + (
                    f"FAILED event {failed['tag']}: {failed['data'].get('reason')}"
                    if failed
                    else f"no complete event within {self.args.timeout} s"
                )
                + f"; rejected: {trial['rejected']}; down events: {trial['downs']}"
            )
            trial["failure"] = why
            trial["logs"] = self.capture_logs(why + "\n" + json.dumps(trial["downs"], default=str))
            log(f"FAILURE: {why} (logs in {trial['logs']})")
            self.failures.append(trial)
            return trial
        d = complete["data"]
        tm = d.get("timings") or {}
        t_start = d["completed_at"] - tm.get("dhcp_s", 0.0)
        # the runner run that moved it: its ret says moved; its new event has its start stamp
        moved_jids = [j for j, r in rets.items() if isinstance(r.get("return"), dict) and r["return"].get("moved")]
        run = next((e for e in runs if e["tag"].split("/")[2] in moved_jids), runs[0] if runs else None)
        run_jid = run["tag"].split("/")[2] if run else None
        run_start = stamp(run["data"].get("_stamp")) if run else None
        ret = rets.get(run_jid, {}).get("return") if run_jid else None
        job = jobs[0] if jobs else None
        publish = stamp(job["data"].get("_stamp")) if job else None
        if publish is None and run_start is not None and isinstance(ret, dict):
            publish = run_start + (ret.get("timings") or {}).get("published_s", 0)
        dec = d.get("decision") if isinstance(d.get("decision"), dict) else {}
        if dec.get("received_at"):  # the master's own stamps (engine or runner)
            run_start, publish = dec["received_at"], dec.get("published_at", publish)
            ret = {
                "timings": {
                    k: round(dec[a] - dec["received_at"], 4)
                    for k, a in (
                        ("validated_s", "validated_at"),
                        ("checked_s", "checked_at"),
                        ("confirmed_s", "confirmed_at"),
                        ("recorded_s", "recorded_at"),
                        ("published_s", "published_at"),
                    )
                    if dec.get(a)
                }
            }
        trial.update(via=dec.get("via"), second_opinion=dec.get("second_opinion"), bound_by=d.get("bound_by"))
        marks = {
            "power_off": t0,
            "detected": d.get("detected_at"),
            "runner_start": run_start,
            "published": publish,
            "heard": t_start + tm["heard_s"] if "heard_s" in tm else None,
            "takeover_start": t_start,
            "bound": t_start + tm["bound_s"] if "bound_s" in tm else None,
            "announced": t_start + tm["announced_s"] if "announced_s" in tm else None,
            "completed": d["completed_at"],
        }
        trial.update(
            marks=marks,
            to=d.get("to"),
            epoch=d.get("epoch"),
            takeover_timings=tm,
            runner_timings=(ret or {}).get("timings") if isinstance(ret, dict) else None,
        )

        def diff(a, b):
            return None if marks.get(a) is None or marks.get(b) is None else marks[b] - marks[a]

        trial["phases"] = {
            "detection": diff("power_off", "detected"),
            "to_runner": diff("detected", "runner_start"),
            "runner": diff("runner_start", "published"),
            "to_takeover": diff("published", "takeover_start"),
            "to_heard": diff("published", "heard"),
            "heard_to_start": diff("heard", "takeover_start"),
            "to_bound": diff("takeover_start", "bound"),
            "to_garp": diff("bound", "announced"),
            "to_announced": diff("power_off", "announced"),
        }
        for r in trial["rejected"]:
            self.benign.append(dict(r, row=row, killed=active))
        return trial

    def reboot_hanet(self, host):
        """Power the host on and wait for its start-up highstate (its hanet.liveness state
        fires ``hanet/prime``), then for its beacon to see the peer up again (rise)."""
        ev = Events(self.lab, self.lab.masters) if len(self.lab.masters) > 1 else self.lab.events()
        try:
            chaos.power_on(self.lab, host)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                got = ev.wait("hanet/prime", timeout=max(0.1, deadline - time.monotonic()))
                if got is None or (got["data"] or {}).get("id") == host:
                    break
            else:
                got = None
        finally:
            ev.close()
        if got is None:
            log(f"WARNING: no hanet/prime from {host} within 30 s of its power-on")
        time.sleep(1.5)

    def hanet_row(self, label, ha, kill_master=None, fips=0, streams=False):
        self.hanet_setup(ha, fips, streams)
        settings = dict(ha or {"probe_interval_ms": 100, "probe_misses": 3})
        last_fip = many_fips(fips)[-1] if fips > 1 else None
        if last_fip:
            settings["floating IPs"] = fips
        if len(self.lab.masters) > 1:
            settings["masters"] = len(self.lab.masters)
            if kill_master:
                settings["killed at the power loss"] = kill_master
        row = {"system": "hanet", "label": label, "settings": settings, "trials": [], "load_before": loadavg()}
        active = self.owner()
        for i in range(self.args.trials):
            tr = self.hanet_trial(active, label, kill_master=kill_master, last_fip=last_fip, streams=streams)
            row["trials"].append(tr)
            if "failure" in tr:
                self.reboot_hanet(active)
                self.lab.salt(list(NETHOSTS), "state.apply", ["hanet"], timeout=180)
                active = self.owner()
                time.sleep(3)
                continue
            ph = tr["phases"]
            log(
                f"{label} #{i + 1}: {active} off -> {tr['to']}: VM {tr['vm']['outage']:.3f} s "
                f"({tr['vm']['lost']} lost), FIP {tr['up']['outage']:.3f} s ({tr['up']['lost']} lost); "
                f"detect {ph['detection']:.3f} event->decision {ph['to_runner'] or 0:.3f} "
                f"decision {ph['runner'] or 0:.3f} publish->start {ph['to_takeover'] or 0:.3f} "
                f"start->bound {ph['to_bound'] or 0:.3f} bound->announced {ph['to_garp'] or 0:.3f}"
            )
            killed, active = active, tr["to"]
            self.reboot_hanet(killed)
            both = self.holder(GW)
            if both != [active]:
                tr["split"] = both
                log(f"WARNING: after {killed}'s reboot the gateway is on {both} (expected [{active}])")
        row["load_after"] = loadavg()
        self.rows.append(row)

    # ------------------------------------------------------------------ keepalived
    def ka_conf(self, host, advert):
        d = os.path.join(self.lab.rundir, "keepalived")
        os.makedirs(d, exist_ok=True)
        conf = os.path.join(d, f"{host}.conf")
        with open(conf, "w") as f:
            f.write(f"""# hanet bench: keepalived on {host} (VRRPv3, both BACKUP, nopreempt)
global_defs {{
    router_id {host}
    vrrp_version 3
    enable_script_security
}}
vrrp_instance shared {{
    state BACKUP
    nopreempt
    interface eth3
    virtual_router_id 42
    priority 100
    advert_int {advert}
    virtual_ipaddress {{
        {GW}/24 dev eth3
        {FIP}/24 dev eth0
    }}
}}
""")
        return conf, d

    def ka_boot(self, host, advert):
        """What the host's own start-up would do: address, forwarding, 1:1 NAT, keepalived."""
        lab, ns = self.lab, self.lab.ns(host)
        subprocess.run(["ip", "-n", ns, "addr", "replace", f"{HOST_IP[host]}/24", "dev", "eth3"], check=True)
        subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True)
        nft = (
            f"table ip kabench\ndelete table ip kabench\ntable ip kabench {{\n"
            f" chain pre {{ type nat hook prerouting priority dstnat; ip daddr {FIP} dnat to {VM_IP}; }}\n"
            f' chain post {{ type nat hook postrouting priority srcnat; ip saddr {VM_IP} oifname "eth0" snat to {FIP}; }}\n'
            f"}}\n"
        )
        subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=nft, text=True, check=True)
        conf, d = self.ka_conf(host, advert)
        logf = open(os.path.join(d, f"{host}.log"), "ab")
        argv = [
            "keepalived",
            "--vrrp",
            "-n",
            "-l",
            "-D",
            "-f",
            conf,
            "-p",
            os.path.join(d, f"{host}.pid"),
            "-r",
            os.path.join(d, f"{host}-vrrp.pid"),
            "-c",
            os.path.join(d, f"{host}-checkers.pid"),
        ]
        self.ka_procs[host] = lab.popen(host, argv, name=f"keepalived-{host}", stdout=logf, stderr=subprocess.STDOUT)
        logf.close()

    def ka_stop(self, host):
        p = self.ka_procs.pop(host, None)
        if p is not None and p.poll() is None:
            p.terminate()  # keepalived releases its VIPs on SIGTERM
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def wait_vip(self, host, timeout):
        """Wait until ``host`` binds the VIP (a powered-off host keeps its addresses on
        its dead links, so only ``host`` is looked at). True if it did."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.holder(GW, "eth3", hosts=[host]):
                return True
            time.sleep(0.05)
        return False

    def ka_setup(self):
        log("keepalived: hanet pillar without the shared network and without net1/net2")
        self.lab.set_pillar(self.pillar(keepalived=True))
        self.apply("*")
        left = self.holder(GW) + self.holder(FIP)
        if left:
            raise BenchFailed(f"hanet left {GW}/{FIP} bound on {left}")
        # compute1: hanet removed br200; a plain bridge on eth3 carries app1 as before
        self.lab.unplug_vm(VM)
        ns = self.lab.ns("compute1")
        if subprocess.run(["ip", "-n", ns, "link", "show", "br200"], capture_output=True).returncode:
            subprocess.run(
                ["ip", "-n", ns, "link", "add", "br200", "type", "bridge", "stp_state", "0", "forward_delay", "0"],
                check=True,
            )
        subprocess.run(["ip", "-n", ns, "link", "set", "eth3", "master", "br200", "up"], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", "br200", "up"], check=True)
        self.lab.plug_vm(VM)
        vns = self.lab.ns(VM)
        subprocess.run(["ip", "-n", vns, "addr", "replace", f"{VM_IP}/24", "dev", "eth0"], check=True)
        subprocess.run(["ip", "-n", vns, "link", "set", "eth0", "up"], check=True)
        subprocess.run(["ip", "-n", vns, "route", "replace", "default", "via", GW], check=True)

    def ka_row(self, advert):
        label = f"keepalived advert_int {advert:g} s"
        for host in NETHOSTS:
            self.ka_stop(host)
        self.ka_boot("net1", advert)
        if not self.wait_vip("net1", 3 * advert + 5):
            raise BenchFailed(f"keepalived: net1 did not bind {GW}")
        self.ka_boot("net2", advert)
        time.sleep(3 * advert + 1)
        if self.holder(GW, "eth3") != ["net1"] or self.holder(FIP, "eth0") != ["net1"]:
            raise BenchFailed(f"keepalived: VIPs on {self.holder(GW, 'eth3')} / {self.holder(FIP, 'eth0')}")
        self.check_paths()
        row = {
            "system": "keepalived",
            "label": label,
            "settings": {"advert_int": advert, "vrrp_version": 3, "priority": 100, "nopreempt": True},
            "trials": [],
            "load_before": loadavg(),
        }
        active = "net1"
        for i in range(self.args.trials):
            other = [h for h in NETHOSTS if h != active][0]
            vm = chaos.Pinger(self.lab, VM, ROUTER_IP).start()
            up = chaos.Pinger(self.lab, "router", FIP).start()
            time.sleep(1)
            t0 = chaos.power_off(self.lab, active)
            self.ka_procs.pop(active, None)
            got = self.wait_vip(other, 3 * advert + 10)
            time.sleep(1.5)
            vm.stop()
            up.stop()
            tr = {"system": "keepalived", "row": label, "killed": active, "t0": t0, "to": other}
            for key, p in (("vm", vm), ("up", up)):
                gap, began, lost = p.outage(after=t0)
                tr[key] = {"outage": gap, "began": began, "lost": lost}
            if not got:
                tr["failure"] = f"{other} did not bind {GW} after {active}'s power-off"
                log(f"FAILURE (keepalived): {tr['failure']}")
            row["trials"].append(tr)
            log(
                f"{label} #{i + 1}: {active} off -> {other}: VM {tr['vm']['outage']:.3f} s ({tr['vm']['lost']} lost), "
                f"FIP {tr['up']['outage']:.3f} s ({tr['up']['lost']} lost)"
            )
            chaos.power_on(self.lab, active)
            self.ka_boot(active, advert)
            time.sleep(3 * advert + 1)
            h = self.holder(GW, "eth3")
            if h != [other]:
                log(f"WARNING: after {active}'s reboot the VIP is on {h}")
            active = other
        row["load_after"] = loadavg()
        self.rows.append(row)
        for host in NETHOSTS:
            self.ka_stop(host)

    # ------------------------------------------------------------------ report
    def stats(self, row, key):
        vals = [t[key]["outage"] for t in row["trials"] if "failure" not in t and t[key]["outage"] is not None]
        return {
            "n": len(vals),
            "p50": pctl(vals, 50),
            "p95": pctl(vals, 95),
            "max": max(vals) if vals else None,
            "lost_p50": pctl([t[key]["lost"] for t in row["trials"] if "failure" not in t], 50),
        }

    def report(self):
        def f(x, nd=3):
            return "-" if x is None else f"{x:.{nd}f}"

        lines = []
        ka = {r["label"]: r for r in self.rows if r["system"] == "keepalived"}
        ka_fast = next((r for r in ka.values() if r["settings"]["advert_int"] < 1), None)
        ka_slow = next((r for r in ka.values() if r["settings"]["advert_int"] >= 1), None)
        lines.append(
            "| system | settings | direction | trials | p50 (s) | p95 (s) | max (s) | lost p50 | "
            "p50 vs keepalived 1 s | p50 vs keepalived 0.1 s |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        for row in self.rows:
            sett = ", ".join(f"{k} {v}" for k, v in row["settings"].items())
            for key, name in DIRS:
                s = self.stats(row, key)
                ratios = []
                for ref in (ka_slow, ka_fast):
                    r = self.stats(ref, key) if ref else None
                    ratios.append(f"{s['p50'] / r['p50']:.2f}x" if r and r["p50"] and s["p50"] is not None else "-")
                fails = sum(1 for t in row["trials"] if "failure" in t)
                lines.append(
                    f"| {row['system']} | {sett} | {name} | {s['n']}{f' (+{fails} failed)' if fails else ''} | "
                    f"{f(s['p50'])} | {f(s['p95'])} | {f(s['max'])} | {f(s['lost_p50'], 0)} | "
                    f"{ratios[0]} | {ratios[1]} |"
                )
        hanet_rows = [r for r in self.rows if r["system"] == "hanet"]
        one = next((r for r in hanet_rows if r["label"] == "hanet defaults"), None)
        two = [r for r in hanet_rows if r["settings"].get("masters", 1) > 1]
        if one and two:
            lines.append("")
            lines.append(
                "two masters against one (the same probe settings, same run): p50, its difference "
                "from the one-master p50, and max (s; the target: p50 within 0.1 s, max <= 1 s):"
            )
            lines.append("")
            lines.append("| row | direction | p50 | p50 - one master | max |")
            lines.append("|---|---|---|---|---|")
            for r in two:
                for key, name in DIRS:
                    s, base = self.stats(r, key), self.stats(one, key)
                    delta = s["p50"] - base["p50"] if s["p50"] is not None and base["p50"] is not None else None
                    lines.append(
                        f"| {r['label']} | {name} | {f(s['p50'])} | "
                        f"{'-' if delta is None else f'{delta:+.3f}'} | {f(s['max'])} |"
                    )
        for r in [r for r in hanet_rows if any("streams" in t for t in r["trials"])]:
            lines.append("")
            lines.append(
                f"{r['label']}: two TCP streams, 100 kB/s each way, through the power loss "
                f"(snat_address {SNAT_ADDRESS}, conntrackd over mgmt0); the longest pause an end "
                "saw (s), and the trials in which both ends of both streams saw no reset and every byte:"
            )
            lines.append("")
            lines.append("| stream | survived | pause p50 | pause max |")
            lines.append("|---|---|---|---|")
            for key, name in (("out", f"{VM} -> router"), ("in", f"router -> {FIP}")):
                got = [t["streams"][key] for t in r["trials"] if key in (t.get("streams") or {})]
                vals = [g["pause"] for g in got if g["pause"] is not None]
                lines.append(
                    f"| {name} | {sum(g['survived'] for g in got)}/{len(got)} | "
                    f"{f(pctl(vals, 50))} | {f(max(vals) if vals else None)} |"
                )
        many = [r for r in hanet_rows if any("last" in t for t in r["trials"])]
        for r in many:
            lines.append("")
            lines.append(
                f"{r['label']}: when the router reached {FIP} (announced after the 198.18 ones: the "
                "addresses go in sorted order) and the last floating IP again, counted from the power "
                "loss (s; the target: the last within 1.5 s at p50):"
            )
            lines.append("")
            lines.append("| floating IP | trials | p50 | max |")
            lines.append("|---|---|---|---|")
            for key, name in (("up", FIP), ("last", "the last")):
                vals = [t[key]["back"] for t in r["trials"] if "failure" not in t and (t.get(key) or {}).get("back")]
                lines.append(f"| {name} | {len(vals)} | {f(pctl(vals, 50))} | {f(max(vals) if vals else None)} |")
        if hanet_rows:
            lines.append("")
            lines.append("hanet outage by phase, median over the trials (s), from the events' stamps:")
            lines.append("")
            lines.append("| phase | " + " | ".join(r["label"] for r in hanet_rows) + " |")
            lines.append("|---|" + "---|" * len(hanet_rows))
            for key, name in PHASES:
                cells = []
                for r in hanet_rows:
                    vals = [t["phases"][key] for t in r["trials"] if "phases" in t and t["phases"][key] is not None]
                    cells.append(f(statistics.median(vals)) if vals else "-")
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            for key, name in DIRS:
                cells = []
                for r in hanet_rows:
                    s = self.stats(r, key)
                    cells.append(f(s["p50"]))
                lines.append(f"| outage p50, {name} | " + " | ".join(cells) + " |")
            steps = sorted(
                {k for r in hanet_rows for t in r["trials"] for k in (t.get("takeover_timings") or {})},
                key=lambda k: statistics.median(
                    [
                        t["takeover_timings"][k]
                        for r in hanet_rows
                        for t in r["trials"]
                        if k in (t.get("takeover_timings") or {})
                    ]
                ),
            )
            if steps:
                lines.append("")
                lines.append(
                    "hanet.takeover steps, median time from the takeover's start (s): "
                    + ", ".join(
                        f"{k[:-2]} {statistics.median([t['takeover_timings'][k] for r in hanet_rows for t in r['trials'] if k in (t.get('takeover_timings') or {})]):.3f}"
                        for k in steps
                    )
                )
            rt = [t["runner_timings"] for r in hanet_rows for t in r["trials"] if t.get("runner_timings")]
            if rt:
                lines.append(
                    "the master's decision, median from the event's arrival (s): "
                    + ", ".join(f"{k[:-2]} {statistics.median([x[k] for x in rt if k in x]):.3f}" for k in rt[0])
                )
            paths = {}
            for r in hanet_rows:
                for t in r["trials"]:
                    if "vm" in t:
                        key = (
                            f"decided by {t.get('via') or 'runner'}, second opinion "
                            f"{t.get('second_opinion') or 'icmp'}, bound by {t.get('bound_by') or 'job'}"
                        )
                        paths[key] = paths.get(key, 0) + 1
            if paths:
                lines.append("paths taken (trials): " + "; ".join(f"{k}: {n}" for k, n in sorted(paths.items())))
        lines.append("")
        lines.append(
            "load average (1/5/15 min) before -> after each row: "
            + "; ".join(f"{r['label']}: {r['load_before']} -> {r.get('load_after', '?')}" for r in self.rows)
        )
        return "\n".join(lines)

    def plot(self, path):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        row = next((r for r in self.rows if r["system"] == "hanet"), None)
        good = [t for t in (row or {}).get("trials", []) if "marks" in t]
        if not good:
            return None
        good.sort(key=lambda t: t["vm"]["outage"])
        tr = good[len(good) // 2]  # the median trial (by the VM direction)
        t0 = tr["t0"]
        fig, ax = plt.subplots(figsize=(13, 4.2))
        for y, key, name, color in (
            (1, "vm_replies", DIRS[0][1], "tab:blue"),
            (0, "up_replies", DIRS[1][1], "tab:green"),
        ):
            xs = [t - t0 for t, _ in tr[key] if -0.5 <= t - t0 <= 3.0]
            ax.eventplot([xs], lineoffsets=y, linelengths=0.6, colors=color, linewidths=0.8)
            ax.text(
                -0.48,
                y + 0.36,
                f"{name}: outage {tr['vm' if key == 'vm_replies' else 'up']['outage']:.3f} s",
                fontsize=8,
                color=color,
            )
        names = {
            "power_off": "power off",
            "detected": "detected_at (beacon)",
            "runner_start": "decision start",
            "published": "takeover published",
            "takeover_start": "takeover start",
            "bound": "bound",
            "announced": "announced (GARP)",
            "completed": "complete (dnsmasq up)",
        }
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, (k, label) in enumerate(names.items()):
            t = tr["marks"].get(k)
            if t is None:
                continue
            ax.axvline(
                t - t0, color=colors[i % len(colors)], linestyle="--", linewidth=1.2, label=f"{label}: {t - t0:+.3f} s"
            )
        ax.legend(
            loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title="marks (from the events)", title_fontsize=8
        )
        ax.set_yticks([0, 1], ["router -> FIP", "VM -> router"])
        ax.set_ylim(-0.5, 1.6)
        last = min(max(t for t, _ in tr["vm_replies"]), max(t for t, _ in tr["up_replies"])) - t0
        ax.set_xlim(-0.5, min(3.0, last + 0.05))
        ax.set_xlabel(f"seconds since power-off of {tr['killed']} (ping -i 0.01 replies)")
        ax.set_title(
            f"hanet failover {tr['killed']} -> {tr['to']} ({row['settings']['probe_interval_ms']} ms x "
            f"{row['settings']['probe_misses']}), median trial of {len(good)}, {time.strftime('%Y-%m-%d')}"
        )
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def run(self):
        t_start = time.monotonic()
        self.up()
        if not self.args.no_hanet:
            self.hanet_row("hanet defaults", None)
            if not self.args.no_fast:
                self.hanet_row("hanet 50 ms x 3", {"probe_interval_ms": 50, "probe_misses": 3})
            if self.args.fips > 1:
                self.hanet_row(f"hanet {self.args.fips} floating IPs", None, fips=self.args.fips)
            if not self.args.no_streams:
                self.hanet_row("hanet open connections", None, streams=True)
        if not self.args.no_keepalived:
            self.ka_setup()
            for adv in (1, 0.1):
                self.ka_row(adv)
        if not self.args.no_hanet and not self.args.no_two_masters and not shutil.which("etcd"):
            log("two-master rows skipped: no etcd here (Debian's etcd-server; ./dev setup installs it)")
        elif not self.args.no_hanet and not self.args.no_two_masters:
            # the same trials with two masters and the record in etcd (issue 11), in a lab
            # of their own, in the same run: compare with the first row (one master, file)
            self.down()
            self.up(masters=2, etcd=3)
            self.hanet_row("hanet 2 masters", None)
            self.hanet_row("hanet 2 masters, first killed", None, kill_master="master")
        self.elapsed = time.monotonic() - t_start


def main(argv=None):
    ap = argparse.ArgumentParser(prog="./dev bench failover", description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=10, help="power losses per row (default 10)")
    ap.add_argument("--no-fast", action="store_true", help="skip the hanet row with probe_interval_ms 50")
    ap.add_argument("--no-keepalived", action="store_true")
    ap.add_argument("--no-hanet", action="store_true")
    ap.add_argument(
        "--fips",
        type=int,
        default=1000,
        help="a row where the owner serves this many floating IPs (issue 14; default 1000; 0: no such row)",
    )
    ap.add_argument(
        "--no-streams",
        action="store_true",
        help="skip the row with two TCP streams through the failover (snat_address, conntrack_sync)",
    )
    ap.add_argument(
        "--no-two-masters",
        action="store_true",
        help="skip the rows with two masters and the record in etcd (needs etcd)",
    )
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for hanet's complete event")
    ap.add_argument(
        "--outdir",
        default=f"/tmp/hanet-bench-failover-{time.strftime('%Y%m%d-%H%M%S')}",
        help="where logs of failures, the JSON and (by default) the PNG go",
    )
    ap.add_argument("--png", help="timeline PNG of the median hanet trial (default OUTDIR/failover-timeline.png)")
    ap.add_argument("--json", help="every trial's figures (default OUTDIR/failover.json)")
    ap.add_argument("--md", help="also write the tables (markdown) to this file")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench failover: needs root (the namespace lab)", file=sys.stderr)
        return 2
    bench = Bench(args)
    log(
        f"failover benchmark: {args.trials} trials per row; load {loadavg()}; {os.cpu_count()} CPUs; "
        f"outdir {args.outdir}"
    )
    rc = 0
    try:
        bench.run()
    except (Exception, KeyboardInterrupt) as err:  # noqa: BLE001 - report, clean up, exit non-zero
        rc = 1
        log(f"benchmark aborted: {err!r}")
        traceback.print_exc()
        if bench.lab is not None:
            try:
                log(f"logs captured in {bench.capture_logs(f'aborted: {err!r}')}")
            except Exception:  # noqa: BLE001
                pass
    finally:
        bench.down()
    if bench.rows:
        table = bench.report()
        png = None
        try:
            png = bench.plot(args.png or os.path.join(args.outdir, "failover-timeline.png"))
        except Exception as err:  # noqa: BLE001
            log(f"timeline: {err!r}")
        header = (
            f"failover benchmark {time.strftime('%Y-%m-%d %H:%M')} on {platform.node()} "
            f"({os.cpu_count()} CPUs, kernel {platform.release()}), {args.trials} power-loss trials per row, "
            f"wall time {getattr(bench, 'elapsed', 0) / 60:.1f} min"
        )
        print("\n" + header + "\n\n" + table)
        if png:
            print(f"\ntimeline: {png}")
        if bench.benign:
            print(
                f"\n{len(bench.benign)} rejected liveness reports that did not stop a failover (reasons: "
                f"{sorted({b['reason'] for b in bench.benign})})"
            )
        if bench.failures:
            rc = 1
            print(f"\n{len(bench.failures)} FAILED failovers:")
            for t in bench.failures:
                print(f"  - {t['failure']}\n    logs: {t['logs']}")
        jpath = args.json or os.path.join(args.outdir, "failover.json")
        with open(jpath, "w") as fh:
            json.dump(
                {"header": header, "rows": bench.rows, "benign_rejections": bench.benign}, fh, default=str, indent=1
            )
        print(f"every trial: {jpath}")
        if args.md:
            with open(args.md, "w") as fh:
                fh.write(header + "\n\n" + table + "\n" + (f"\ntimeline: {png}\n" if png else ""))
    return rc


if __name__ == "__main__":
    sys.exit(main())
