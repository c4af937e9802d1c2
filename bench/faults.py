#!/usr/bin/env python3
"""Fault matrix: hanet under each fault of issue 10, with the outage and the seconds with two holders.

One lab (the default topology with four hosts). Network ``shared`` (10.20.0.0/24,
gateway 10.20.0.1) has three network hosts, net1, net2 and compute2, in that order; the
VM app1 sits on compute1's br200 with the floating IP 203.0.113.60. For each fault:

- app1 pings the upstream router through the gateway and the router pings the floating
  IP, every 10 ms; the **outage** of each is the longest silence between two replies;
- an ARP prober in the switch namespace (``hanet_lab.arpwatch``) asks who has the gateway
  (on the VM segment) and the floating IP (on the public segment) every 20 ms and records
  every reply and announcement: **two holders** is the time during which two MACs
  answered in the same round (must be 0);
- the record's epoch before and after gives the number of **moves**; the wire also gives
  how long the gateway was **silent** (no host answered for it);
- then the lab is brought back (power on, links back, master back) and the next fault runs.

    ./dev bench faults [--only NAME ...] [--md FILE] [--json FILE] [--logs DIR]

A fault whose expected outcome is not met prints FAIL in its row (the run still goes on).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback

from hanet_lab import Lab, chaos, default_topology
from hanet_lab.arpwatch import ArpWatch
from hanet_lab.pillar import lab_pillar

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKOUT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(CHECKOUT, "_modules"))

NET, GATEWAY, FLOATING, ROUTER, VM = "shared", "10.20.0.1", "203.0.113.60", "203.0.113.1", "app1"
NETWORK_HOSTS = ("net1", "net2", "compute2")


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Unmet(AssertionError):
    pass


class Matrix:
    def __init__(self, args):
        self.args = args
        self.lab = None
        self.rows = []

    # ------------------------------------------------------------------ the lab
    def up(self):
        log("lab: building the default topology (4 hosts)")
        self.lab = Lab(default_topology(hosts=4), progress=lambda m: None).up()
        lab = self.lab
        pillar = lab_pillar(lab.topology)
        h = pillar["hanet"]
        h["instances"][VM]["floating_ips"] = [FLOATING]
        h["networks"][NET]["network_hosts"] = list(NETWORK_HOSTS)
        h["hosts"]["compute2"]["networks"][NET] = {"address": "10.20.0.4"}
        lab.set_pillar(pillar)
        self.apply(sorted(lab.topology.hosts))
        lab.plug_vm(VM)
        self.apply(["compute1"])
        lease = lab.dhcp(VM, client="udhcpc")
        if lease["address"] != "10.20.0.10":
            raise RuntimeError(f"unexpected lease {lease}")
        time.sleep(2)
        log(f"lab {lab.prefix} up; {self.owner()} serves {NET}")

    def apply(self, tgt):
        got = self.lab.salt(tgt, "state.apply", ["hanet"], timeout=300)
        bad = {
            m: r for m, r in got.items() if not isinstance(r, dict) or any(v.get("result") is False for v in r.values())
        }
        if bad or set(got) != set(tgt):
            raise RuntimeError(f"state.apply failed: {json.dumps(bad, default=str)[:2000]}")

    def record(self):
        from _hanet import failover

        return failover.read_owners(os.path.join(self.lab.master_root, "var", "cache", "salt", "master"))

    def owner(self):
        return self.record().get(NET, {}).get("owner", NETWORK_HOSTS[0])

    def epoch(self):
        return self.record().get(NET, {}).get("epoch", 0)

    def holders(self, address):
        import subprocess

        out = []
        for host in NETWORK_HOSTS:
            # powered: mgmt0 administratively up (a powered-off host keeps its kernel state
            # in the lab, every link down; an unplugged one only lost its carrier)
            flags = (
                subprocess.run(
                    ["ip", "-n", self.lab.ns(host), "-o", "link", "show", "mgmt0"], capture_output=True, text=True
                )
                .stdout.split("<", 1)[-1]
                .split(">", 1)[0]
            )
            if "UP" in flags.split(",") and any(a.split("/")[0] == address for a in self.lab.addresses(host)):
                out.append(host)
        return out

    def wait(self, what, predicate, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = predicate()
            if got:
                return got
            time.sleep(0.1)
        raise Unmet(f"timed out waiting for {what}")

    def served_by(self, hosts, timeout=60):
        """One of ``hosts`` alone holds the gateway and the floating IP, and the record
        confirms it; returns it."""

        def one():
            got = self.holders(GATEWAY)
            return len(got) == 1 and got[0] in hosts and self.holders(FLOATING) == got and got[0]

        host = self.wait(f"one of {hosts} alone holding the gateway", one, timeout)
        self.wait(
            f"the record confirming {host}",
            lambda: self.owner() == host and self.record()[NET].get("confirmed", True) is True,
            timeout,
        )
        return host

    def serving(self, host):
        got = self.lab.salt(host, "hanet.serving", timeout=10).get(host)
        return got if isinstance(got, dict) else {}  # an error string while it starts

    def standby_again(self, host):
        self.wait(f"{host} back as a standby", lambda: self.serving(host).get("networks", {}).get(NET) is False, 90)

    def healthy(self, host):
        self.wait(f"{host} healthy", lambda: self.serving(host).get("lost") == [], 60)

    def others(self, host):
        return [h for h in NETWORK_HOSTS if h != host]

    # ------------------------------------------------------------------ the faults
    def power_loss(self):
        old = self.owner()
        chaos.power_off(self.lab, old)
        new = self.served_by(self.others(old))
        yield f"{old} off -> {new} serves"
        chaos.power_on(self.lab, old)
        self.standby_again(old)

    def _link(self, ifname):
        old = self.owner()
        chaos.unplug(self.lab, old, [ifname])
        try:
            new = self.served_by(self.others(old), timeout=15)
            held = [a.split("/")[0] for a in self.lab.addresses(old)]
            if GATEWAY in held or FLOATING in held:
                raise Unmet(f"{old} still holds {held}")
            yield f"{old} lost {ifname} -> {new} serves, {old} holds nothing"
        finally:
            chaos.replug(self.lab, old, [ifname])
        self.healthy(old)

    def uplink(self):
        yield from self._link("eth0")

    def segment(self):
        yield from self._link("eth3")

    def segment_blocked(self):
        old = self.owner()
        chaos.block(self.lab, old, ["eth3"])  # the switch drops its segment frames; carrier up
        try:
            new = self.served_by(self.others(old))
            held = [a.split("/")[0] for a in self.lab.addresses(old)]
            if GATEWAY in held or FLOATING in held:
                raise Unmet(f"{old} still holds {held}")
            yield f"{old} cut off from the segment (carrier up) -> {new} serves, {old} holds nothing"
        finally:
            chaos.unblock(self.lab, old)
        time.sleep(3)
        if self.holders(GATEWAY) != [new]:
            raise Unmet(f"after the heal the gateway is on {self.holders(GATEWAY)}")
        self.standby_again(old)

    def observer_only(self):
        old, before = self.owner(), self.epoch()
        chaos.unplug(self.lab, old, ["mgmt0"])
        try:
            time.sleep(6)  # the master's watch sees it dead; the reconcile loop asks the others
            if self.epoch() != before or self.holders(GATEWAY) != [old]:
                raise Unmet(f"moved: epoch {before} -> {self.epoch()}, gateway on {self.holders(GATEWAY)}")
            yield f"{old} unreachable from the master only: no move"
        finally:
            chaos.replug(self.lab, old, ["mgmt0"])
        time.sleep(2)

    def healed_partition(self):
        old = self.owner()
        links = list(self.lab.topology.hosts[old].links)
        chaos.unplug(self.lab, old, links)
        try:
            new = self.served_by(self.others(old))
            held = [a.split("/")[0] for a in self.lab.addresses(old)]
            if GATEWAY in held or FLOATING in held:
                raise Unmet(f"{old}, cut off, still holds {held}")
            time.sleep(max(0.0, 30 - (time.time() - self.t_fault)))
        finally:
            chaos.replug(self.lab, old, links)
        time.sleep(5)
        held = [a.split("/")[0] for a in self.lab.addresses(old)]
        if GATEWAY in held or FLOATING in held or self.holders(GATEWAY) != [new]:
            raise Unmet(f"after the heal {old} holds {held}; gateway on {self.holders(GATEWAY)}")
        yield f"{old} isolated 30 s: {new} served; after the heal {old} holds nothing"
        self.standby_again(old)

    def cut_off_but_router(self):
        old = self.owner()
        links = list(self.lab.topology.hosts[old].links)
        chaos.block(self.lab, old, links, spare=("router",))
        try:
            new = self.served_by(self.others(old))
            held = [a.split("/")[0] for a in self.lab.addresses(old)]
            if GATEWAY in held or FLOATING in held:
                raise Unmet(f"{old}, cut off from all but the router, still holds {held}")
            time.sleep(max(0.0, 15 - (time.time() - self.t_fault)))
        finally:
            chaos.unblock(self.lab, old)
        time.sleep(5)
        held = [a.split("/")[0] for a in self.lab.addresses(old)]
        if GATEWAY in held or FLOATING in held or self.holders(GATEWAY) != [new]:
            raise Unmet(f"after the heal {old} holds {held}; gateway on {self.holders(GATEWAY)}")
        yield f"{old} cut off 15 s but from the router: it fell silent, {new} served; after the heal {old} holds nothing"
        self.standby_again(old)

    def master_down(self):
        old = self.owner()
        self.lab.stop_master()
        try:
            chaos.power_off(self.lab, old)
            time.sleep(20)
            if self.holders(GATEWAY):
                raise Unmet(f"someone bound the gateway with no master: {self.holders(GATEWAY)}")
        finally:
            self.lab.start_master()
        new = self.served_by(self.others(old))
        yield f"master back after 20 s -> {new} serves (reason: {self.record()[NET].get('reason')})"
        chaos.power_on(self.lab, old)
        self.standby_again(old)

    def master_restart_mid_decision(self):
        from _hanet import failover

        old, before = self.owner(), self.epoch()
        new = self.others(old)[0]
        self.lab.stop_master()
        try:
            chaos.power_off(self.lab, old)
            cachedir = os.path.join(self.lab.master_root, "var", "cache", "salt", "master")
            with failover.Record(cachedir) as rec:
                failover.record_move(
                    rec.owners,
                    failover.Move(NET, old, new, before + 1),
                    time.time(),
                    "bench: decided, then the master died",
                )
                rec.save()
        finally:
            self.lab.start_master()
        got = self.served_by((new,))
        if self.epoch() != before + 1:
            raise Unmet(f"epoch {self.epoch()}, not {before + 1}")
        yield f"decision saved, master restarted -> {got} serves at the same epoch"
        chaos.power_on(self.lab, old)
        self.standby_again(old)

    def two_die(self):
        old = self.owner()
        first = self.others(old)[0]
        chaos.power_off(self.lab, old)
        chaos.power_off(self.lab, first)
        third = self.others(old)[1]
        got = self.served_by((third,))
        yield f"{old} and {first} off -> {got} serves"
        for host in (old, first):
            chaos.power_on(self.lab, host)
        for host in (old, first):
            self.standby_again(host)

    def dnsmasq_killed(self):
        old = self.owner()
        self.lab.dhcp(VM, client="udhcpc")
        pidfile = os.path.join(self.lab.minion_root(old), "run", "hanet", f"dnsmasq-{NET}.pid")
        with open(pidfile) as fh:
            pid = int(fh.read().strip())
        with self.lab.events() as ev:
            t0 = time.time()
            os.kill(pid, signal.SIGKILL)
            got = ev.wait(f"hanet/daemon/{old}/dnsmasq/{NET}/restarted", timeout=10)
        if not got:
            raise Unmet("no restarted event")
        lease = self.lab.dhcp(VM, client="dhclient")
        if lease["address"] != "10.20.0.10":
            raise Unmet(f"lease changed: {lease}")
        yield f"restarted {got['data']['at'] - t0:.2f} s after the kill; app1 renewed 10.20.0.10"

    def flapping_uplink(self):
        time.sleep(10)  # the previous faults changed the standbys' health: let it settle
        old = self.owner()
        try:
            for _ in range(8):
                chaos.unplug(self.lab, old, ["eth0"])
                time.sleep(2)
                chaos.replug(self.lab, old, ["eth0"])
                time.sleep(2)
        finally:
            chaos.replug(self.lab, old, ["eth0"])
        self.healthy(old)
        new = self.served_by(tuple(NETWORK_HOSTS))
        yield f"{old}'s uplink flapped 8 times -> {new} serves"

    FAULTS = [
        ("power_loss", "power loss of the owner", "a standby serves"),
        ("uplink", "owner loses only its public uplink", "a standby serves; owner gives up"),
        ("segment", "owner loses only its VM-segment link", "a standby serves; owner gives up"),
        (
            "segment_blocked",
            "owner cut off from its VM segment, carrier up (the switch drops its frames)",
            "a standby serves; owner gives up",
        ),
        ("observer_only", "master cannot reach the owner (VMs and standbys can)", "no move"),
        (
            "healed_partition",
            "owner isolated 30 s, then back with its kernel state",
            "standby serves; loser holds nothing after the heal",
        ),
        (
            "cut_off_but_router",
            "owner cut off from all but the router 15 s (carriers up)",
            "owner falls silent; standby serves; never two holders",
        ),
        ("master_down", "master down when the owner dies, back 20 s later", "failover completes after"),
        ("master_restart_mid_decision", "master restarted between decision and order", "one owner, same epoch"),
        ("two_die", "owner and first standby die together", "the third serves"),
        ("dnsmasq_killed", "dnsmasq killed on the owner", "restarted, lease kept"),
        ("flapping_uplink", "flapping uplink (2 s down / 2 s up, 32 s)", "at most one move"),
    ]
    MAX_MOVES = {
        "observer_only": 0,
        "dnsmasq_killed": 0,
        "flapping_uplink": 1,
        "uplink": 1,
        "segment": 1,
        "segment_blocked": 1,
        "power_loss": 1,
        "healed_partition": 1,
        "cut_off_but_router": 1,
        "master_down": 1,
        "two_die": 2,
        "master_restart_mid_decision": 1,
    }

    def run_fault(self, name, title, expected):
        lab = self.lab
        row = {"fault": name, "title": title, "expected": expected}
        before = self.epoch()
        vm = chaos.Pinger(lab, VM, ROUTER).start()
        up = chaos.Pinger(lab, "router", FLOATING).start()
        wire = ArpWatch(lab, [("seg-shared", GATEWAY), ("public", FLOATING)]).start()
        events = lab.events()
        time.sleep(1)
        self.t_fault = time.time()
        steps = getattr(self, name)()
        try:
            row["outcome"] = next(steps)
            row["ok"] = True
        except Unmet as err:
            row["outcome"], row["ok"] = f"FAIL: {err}", False
        except Exception as err:  # noqa: BLE001 - a broken row is reported, the run goes on
            row["outcome"], row["ok"] = f"ERROR: {err!r}", False
            traceback.print_exc()
        t_end = time.time()
        time.sleep(1)
        vm.stop(), up.stop(), wire.stop()
        if self.args.logs:
            import shutil

            os.makedirs(self.args.logs, exist_ok=True)
            for what, path in (("vm-ping", vm.path), ("router-ping", up.path), ("arp", wire.path)):
                shutil.copy(path, os.path.join(self.args.logs, f"{name}-{what}.log"))
        row["vm_outage_s"] = vm.outage(after=self.t_fault)[0]
        row["up_outage_s"] = up.outage(after=self.t_fault)[0]
        row["moves"] = self.epoch() - before
        if row["ok"] and row["moves"] > self.MAX_MOVES[name]:
            row["ok"], row["outcome"] = False, f"FAIL: {row['moves']} moves; {row['outcome']}"
        row["events"] = self.drain(events)
        wired = wire.summary()
        row["two_holders_s"] = round(sum(v["two_holders_s"] for v in wired.values()), 3)
        row["gateway_silent_s"] = wired.get(GATEWAY, {}).get("silent_s")
        row["wire"] = wired
        row["measured_s"] = round(t_end - self.t_fault, 1)
        if row["two_holders_s"]:
            row["ok"] = False
        try:  # bring the lab back (power, links, master) before the next fault
            for _ in steps:
                pass
        except Exception as err:  # noqa: BLE001
            log(f"WARNING: restoring after {name} failed: {err!r}")
            self.restore()
        self.rows.append(row)
        log(
            f"{name}: {'ok' if row['ok'] else 'NOT OK'} - {row['outcome']}; VM outage {fmt(row['vm_outage_s'])} s, "
            f"router outage {fmt(row['up_outage_s'])} s, gateway silent on the wire "
            f"{fmt(row['gateway_silent_s'])} s, two holders {row['two_holders_s']} s, moves {row['moves']}"
        )
        for what, detail in row["events"]:
            log(f"    {what}: {detail}")

    @staticmethod
    def drain(events):
        """The row's ``hanet/failover/...`` events: [(outcome, network, reason or from->to)]."""
        from hanet_lab.lab import LabError

        out = []
        try:
            for _ in range(100):
                got = events.wait("hanet/failover/*", timeout=0.2)
                if got is None:
                    break
                d, what = got.get("data") or {}, got["tag"].split("/")[-1]
                out.append([what, d.get("reason") or f"{d.get('from')} -> {d.get('to')} @{d.get('epoch')}"])
        except LabError:  # the master (and the lab's event gateway with it) restarted
            out.append(["-", "events before the master's restart are not shown"])
        finally:
            try:
                events.close()
            except LabError:
                pass
        return out

    def restore(self):
        """Everything back: every host powered and plugged, the master up."""
        lab = self.lab
        try:
            lab.start_master()
        except Exception:  # noqa: BLE001 - it may be running
            pass
        for host in NETWORK_HOSTS:
            try:
                chaos.replug(lab, host, list(lab.topology.hosts[host].links))
            except Exception:  # noqa: BLE001
                pass
            if not any(lab.processes(host).values()):
                chaos.power_on(lab, host)
        time.sleep(5)

    def run(self):
        self.up()
        for name, title, expected in self.FAULTS:
            if self.args.only and name not in self.args.only:
                continue
            log(f"fault: {title}")
            self.run_fault(name, title, expected)

    def table(self):
        lines = [
            "| fault | expected | outcome | VM outage (s) | router outage (s) | gateway silent (s) | "
            "two holders (s) | moves |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            lines.append(
                f"| {r['title']} | {r['expected']} | {'' if r['ok'] else '**'}{r['outcome']}"
                f"{'' if r['ok'] else '**'} | {fmt(r['vm_outage_s'])} | {fmt(r['up_outage_s'])} | "
                f"{fmt(r['gateway_silent_s'])} | "
                f"{r['two_holders_s']} | {r['moves']} |"
            )
        return "\n".join(lines)


def fmt(x):
    return "-" if x is None else f"{x:.3f}"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="./dev bench faults", description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help=f"run only these faults: {', '.join(n for n, _, _ in Matrix.FAULTS)}")
    ap.add_argument("--md", help="also write the table (markdown) to this file")
    ap.add_argument("--json", help="also write every row's figures (JSON) to this file")
    ap.add_argument("--logs", help="keep each fault's ping and ARP logs in this directory")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench faults: needs root (the namespace lab)", file=sys.stderr)
        return 2
    m = Matrix(args)
    rc = 0
    try:
        m.run()
    except (Exception, KeyboardInterrupt) as err:  # noqa: BLE001 - report, clean up, exit non-zero
        rc = 1
        log(f"benchmark aborted: {err!r}")
        traceback.print_exc()
    finally:
        if m.lab is not None:
            m.lab.down()
    if m.rows:
        table = m.table()
        print("\n" + table)
        if args.md:
            with open(args.md, "w", encoding="utf-8") as fh:
                fh.write(table + "\n")
        if args.json:
            with open(args.json, "w", encoding="utf-8") as fh:
                json.dump(m.rows, fh, indent=1, default=str)
        if not all(r["ok"] for r in m.rows):
            rc = rc or 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
