"""Who answers for an address, as the wire sees it: "seconds with two holders".

``ArpWatch(lab, [(segment, ip), ...])`` runs a small prober in the lab's switch
namespace. On each segment's bridge it asks "who has <ip>?" every ``interval`` (an ARP
probe, sender 0.0.0.0: it teaches no host's cache anything) and records every reply
and every announcement (gratuitous ARP) for the watched addresses, with the MAC that
sent it. Every host that holds an address answers each probe, so a round with replies
from two MACs is a moment with two holders, and a round with none is a moment with
none::

    with ArpWatch(lab, [("seg-shared", "10.20.0.1"), ("public", "203.0.113.60")]) as w:
        ...  # the fault
    w.summary()  # {ip: {"rounds", "two_holders_s", "silent_s", "macs", "announced_by"}}

Run as a program (``python -m hanet_lab.arpwatch OUT SEG:IP ...``) it is the prober
itself; the lab starts it with ``ip netns exec``.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time

ETH_P_ARP = 0x0806


def _request(src_mac, ip):
    eth = b"\xff" * 6 + src_mac + struct.pack("!H", ETH_P_ARP)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + src_mac + b"\0" * 4 + b"\0" * 6 + socket.inet_aton(ip)
    return eth + arp


def _parse(frame):
    """(op, sender mac, sender ip, target ip) of an ARP frame, or None."""
    if len(frame) < 42 or frame[12:14] != b"\x08\x06":
        return None
    _, ptype, hlen, plen, op = struct.unpack("!HHBBH", frame[14:22])
    if ptype != 0x0800 or hlen != 6 or plen != 4:
        return None
    return (
        op,
        ":".join(f"{b:02x}" for b in frame[22:28]),
        socket.inet_ntoa(frame[28:32]),
        socket.inet_ntoa(frame[38:42]),
    )


def probe_loop(out_path, targets, interval):
    """The prober: runs until SIGTERM/SIGINT, one JSON line per probe round and per
    reply or announcement seen."""
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    socks = {}
    for seg, _ip in targets:
        if seg not in socks:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
            s.bind((seg, 0))
            s.setblocking(False)
            socks[seg] = s
    watched = {ip for _, ip in targets}
    by_fd = {s.fileno(): (seg, s) for seg, s in socks.items()}
    rnd = 0
    with open(out_path, "w", encoding="utf-8") as out:
        next_at = time.monotonic()
        while not stop:
            rnd += 1
            for seg, ip in targets:
                s = socks[seg]
                s.send(_request(s.getsockname()[4], ip))
            out.write(json.dumps({"round": rnd, "t": time.time()}) + "\n")
            next_at += interval
            while not stop:
                left = next_at - time.monotonic()
                if left <= 0:
                    break
                try:
                    ready = select.select(list(by_fd), [], [], left)[0]
                except InterruptedError:
                    continue
                for fd in ready:
                    seg, s = by_fd[fd]
                    try:
                        frame = s.recv(128)
                    except BlockingIOError:
                        continue
                    got = _parse(frame)
                    if got is None:
                        continue
                    op, mac, sip, tip = got
                    if sip in watched and (op == 2 or sip == tip):
                        kind = "announce" if sip == tip else "reply"
                        out.write(
                            json.dumps(
                                {"round": rnd, "t": time.time(), "seg": seg, "ip": sip, "mac": mac, "kind": kind}
                            )
                            + "\n"
                        )
            out.flush()
            if next_at < time.monotonic():
                next_at = time.monotonic()


def summarize(lines, interval):
    """{ip: {"rounds", "two_holders_s", "silent_s", "macs", "announced_by", "two_holders_at"}}
    from the prober's lines (an announcement counts as a holder in its round too)."""
    rounds = sorted({ln["round"] for ln in lines if "ip" not in ln})
    ips = sorted({ln["ip"] for ln in lines if "ip" in ln})
    out = {}
    for ip in ips:
        per = {}
        for ln in lines:
            if ln.get("ip") == ip:
                per.setdefault(ln["round"], set()).add(ln["mac"])
        doubled = [r for r in rounds if len(per.get(r, ())) > 1]
        t_of = {ln["round"]: ln["t"] for ln in lines if "ip" not in ln}
        out[ip] = {
            "rounds": len(rounds),
            "two_holders_s": round(len(doubled) * interval, 3),
            "two_holders_at": [t_of.get(r) for r in doubled[:5]],
            "silent_s": round(sum(1 for r in rounds[1:-1] if not per.get(r)) * interval, 3),
            "macs": sorted({m for ms in per.values() for m in ms}),
            "announced_by": sorted({ln["mac"] for ln in lines if ln.get("ip") == ip and ln.get("kind") == "announce"}),
        }
    return out


class ArpWatch:
    """The prober in the lab's switch namespace (see the module docstring)."""

    def __init__(self, lab, targets, interval=0.02):
        self.lab, self.targets, self.interval = lab, list(targets), float(interval)
        self.path = os.path.join(lab.rundir, f"arpwatch-{os.getpid()}-{time.time_ns()}.jsonl")
        self.proc = None

    def start(self):
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=here)
        self.proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.lab.switch_ns,
                sys.executable,
                "-m",
                "hanet_lab.arpwatch",
                self.path,
                str(self.interval),
            ]
            + [f"{seg}:{ip}" for seg, ip in self.targets],
            env=env,
            start_new_session=True,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 5
        while not os.path.exists(self.path) and time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"arpwatch failed: {self.proc.stderr.read().decode()[-500:]}")
            time.sleep(0.02)
        return self

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self

    def lines(self):
        out = []
        try:
            with open(self.path, encoding="utf-8") as fh:
                for line in fh:
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        pass  # the last line of a prober that was killed
        except FileNotFoundError:
            pass
        return out

    def summary(self):
        return summarize(self.lines(), self.interval)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def main(argv):
    out, interval, targets = argv[0], float(argv[1]), [tuple(t.rsplit(":", 1)) for t in argv[2:]]
    probe_loop(out, targets, interval)


if __name__ == "__main__":
    main(sys.argv[1:])
