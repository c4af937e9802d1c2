"""One dnsmasq per served network, nova-network style, supervised by its pid file.

There is no init system to lean on: ``apply`` starts dnsmasq itself (dnsmasq daemonizes,
so it outlives the Salt job that started it), and ``current`` finds it again through its
pid file, checking that the pid really is *our* dnsmasq (its command line names that pid
file) before trusting it (the plumbing, shared with the metadata service, is ``daemon``).

Files, per network label (``Paths`` keeps them under the minion's root_dir):

- ``run/hanet/dnsmasq-<label>.pid``        the pid file dnsmasq writes
- ``var/lib/hanet/dnsmasq/<label>.hosts``  ``--dhcp-hostsfile`` (re-read on SIGHUP)
- ``var/lib/hanet/dnsmasq/<label>.opts``   ``--dhcp-optsfile`` (re-read on SIGHUP)
- ``var/lib/hanet/dnsmasq/<label>.names``  ``--addn-hosts`` (re-read on SIGHUP): every
  instance of the network, on every host, so that each host's dnsmasq resolves them all
  (nova's ``update_dns_entries``); its own DHCP clients' names it knows anyway
- ``var/lib/hanet/dnsmasq/<label>.leases`` ``--dhcp-leasefile``
- ``var/lib/hanet/dnsmasq/<label>.log``    ``--log-facility``
- ``var/lib/hanet/dnsmasq/<label>.json``   what ``apply`` started: the options digest, the
  bridge, the argv (so ``current`` can tell whether a restart is due)

The flags are nova-network's (``linux_net.restart_dhcp``), with two deliberate
differences: dnsmasq keeps its own lease file (nova used ``--leasefile-ro`` plus its
``nova-dhcpbridge`` script as the lease database). It drops its privileges to the
distribution's ``dnsmasq`` user (or the pillar's ``dnsmasq_user``), and stays root only
where that user is missing or cannot read the files it re-reads on SIGHUP
(``run_as``; the reason is logged).

Tags, chosen so that nova's ``dnsmasq_config_file`` recipes behave as they did:

- the range sets the tag ``'<label>'`` *with* the quotes, as nova did
  (``--dhcp-range=set:'red',...``), since dnsmasq keeps quotes in a tag: the recipe
  line ``dhcp-option=tag:'red',option:router,172.16.100.1`` in a conf_file matches it;
- ``--tag-if`` also sets the bare ``<label>`` (later nova's ``set:red``), so
  ``dhcp-option=tag:red,...`` works too, except for the NICs tagged ``<label>-nogw``;
- the network's router is handed out by an *untagged* ``--dhcp-option``, dnsmasq's
  weakest rule, so a router the conf_file gives (tagged or not) wins, as it won over
  nova's default (dnsmasq's own address); ``router`` None: an empty router option;
- a NIC with ``default_route`` False is tagged ``<label>-nogw`` by its MAC
  (``--dhcp-mac=set:<label>-nogw,<mac>``) and the opts file gives that tag an empty
  router option (a client's own tag outranks them all).

Why not nova's way (``set:<tag>`` in the hosts file): dnsmasq 2.90 (Debian 12) crashes
(SIGSEGV, free() of a bad pointer) on SIGHUP when a host whose hosts-file line carries a
``set:`` tag holds a lease: the reload after any instance change would kill it. The
``--dhcp-mac`` lines are on the command line instead, so the set of no-default-route
NICs is part of the options digest: changing it restarts dnsmasq (the lease file is
kept, so no lease is lost), while every other instance change is a SIGHUP.

``--dhcp-authoritative`` is *not* passed, as with nova: in multi_host every compute host
runs a dnsmasq for the same subnet, each knowing only its own instances. An authoritative
dnsmasq NAKs every request for an address it has no lease for, so one DHCP request that
crossed hosts (a misconfigured guard, the uplink during a failover) would knock another
host's instance off its address. Static ranges already make our answers deterministic.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import time

from . import daemon
from .common import Change, run, write_atomic
from .daemon import process_matches  # dnsmasq.process_matches: the tests use it too
from .desired import DhcpHost, Dnsmasq, _plain

log = logging.getLogger(__name__)

FACET = "dnsmasq"
DNSMASQ = "dnsmasq"
DHCP_RELEASE = "dhcp_release"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
RELEASE_TIMEOUT = 3.0


# --------------------------------------------------------------------------- files


def files(label, paths):
    """Every file hanet keeps for the dnsmasq of network ``label``."""
    return {
        "pid": paths.run(f"dnsmasq-{label}.pid"),
        "hosts": paths.state("dnsmasq", f"{label}.hosts"),
        "opts": paths.state("dnsmasq", f"{label}.opts"),
        "names": paths.state("dnsmasq", f"{label}.names"),
        "leases": paths.state("dnsmasq", f"{label}.leases"),
        "log": paths.state("dnsmasq", f"{label}.log"),
        "record": paths.state("dnsmasq", f"{label}.json"),
    }


def no_router_tag(label):
    """The tag of the NICs that get no router (use_single_default_gateway)."""
    return f"{label}-nogw"


# --------------------------------------------------------------------------- pure rendering


DEFAULT_USER = "dnsmasq"  # the user Debian's dnsmasq-base creates (nova's dnsmasq ran as the default user too)


def _readable_by(pw, gids, path):
    """Whether the user of ``pw`` (a ``pwd`` entry, in groups ``gids``) can read
    ``path`` and reach it (search permission on every directory above it), by the
    mode bits."""
    import stat

    def allowed(st, bits):  # bits: (owner, group, other)
        if st.st_uid == pw.pw_uid:
            return bool(st.st_mode & bits[0])
        if st.st_gid in gids:
            return bool(st.st_mode & bits[1])
        return bool(st.st_mode & bits[2])

    path = os.path.abspath(path)
    try:
        if not allowed(os.stat(path), (stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH)):
            return False
        parent = os.path.dirname(path)
        while True:
            if not allowed(os.stat(parent), (stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH)):
                return False
            if parent == os.path.dirname(parent):
                return True
            parent = os.path.dirname(parent)
    except OSError:
        return False


def run_as(spec: Dnsmasq, paths):
    """``(user, why)``: the user the dnsmasq of ``spec`` drops its privileges to.
    ``dnsmasq_user`` when the pillar names one (a user the host lacks is an error);
    else the distribution's ``dnsmasq`` user, when the host has it and it can read the
    files dnsmasq reads again on SIGHUP (hosts, opts, names: the lease file and the
    log are opened before privileges are dropped); else root, with ``why``."""
    import pwd

    f = files(spec.network, paths)
    if spec.user:
        try:
            pwd.getpwnam(spec.user)
        except KeyError:
            raise ValueError(f"dnsmasq_user {spec.user!r}: this host has no such user") from None
        return spec.user, None
    try:
        pw = pwd.getpwnam(DEFAULT_USER)
    except KeyError:
        return "root", f"this host has no {DEFAULT_USER!r} user"
    import grp

    gids = {pw.pw_gid} | {g.gr_gid for g in grp.getgrall() if pw.pw_name in g.gr_mem}
    blocked = [f[k] for k in ("hosts", "opts", "names") if not _readable_by(pw, gids, f[k])]
    if blocked:
        return "root", f"user {DEFAULT_USER!r} cannot read {blocked[0]}"
    return DEFAULT_USER, None


def argv(spec: Dnsmasq, paths, user: str = "root") -> list:
    """dnsmasq's command line for ``spec`` (nova-network's flags).

    ``--user``: the user dnsmasq drops its privileges to after start-up (``run_as``).
    ``--conf-file=`` (empty) keeps dnsmasq from reading the host's /etc/dnsmasq.conf.
    ``--dhcp-authoritative``: each hanet dnsmasq is the only DHCP server its VMs can reach
    (DHCP is isolated per host on multi_host networks, and one network host serves a
    network-host network), so it answers a client whose lease it does not know: an
    instance that moved here, or renews from a new owner after a failover, keeps its
    address at once instead of waiting out its client's INIT-REBOOT timeout (dhclient's
    default is 10 s) and starting over with a DISCOVER.
    """
    f = files(spec.network, paths)
    cmd = [
        DNSMASQ,
        "--strict-order",
        "--bind-interfaces",
        f"--conf-file={spec.conf_file or ''}",
        f"--pid-file={f['pid']}",
        f"--dhcp-optsfile={f['opts']}",
        f"--listen-address={spec.listen_address}",
        "--except-interface=lo",
        f"--dhcp-range=set:'{spec.network}',{spec.range_start},static,{spec.netmask},{spec.lease_time}s",
        f"--tag-if=set:{spec.network},tag:'{spec.network}',tag:!{no_router_tag(spec.network)}",
        f"--dhcp-lease-max={spec.lease_max}",
        f"--dhcp-hostsfile={f['hosts']}",
        f"--dhcp-leasefile={f['leases']}",
        "--no-hosts",
        f"--addn-hosts={f['names']}",
        "--dhcp-authoritative",
        f"--user={user}",
        f"--log-facility={f['log']}",
    ]
    # the network's router (or none), untagged: the weakest rule, so that a router given
    # for the network in the user's conf_file wins, as it did over nova's default
    cmd.append(f"--dhcp-option=option:router,{spec.router}" if spec.router else "--dhcp-option=option:router")
    for mac in nogw_macs(spec):
        cmd.append(f"--dhcp-mac=set:{no_router_tag(spec.network)},{mac}")
    if spec.mtu:
        # option 26, forced (sent even when not asked for), like nova's recipe line
        # dhcp-option-force=26,<mtu>
        cmd.append(f"--dhcp-option-force=tag:{spec.network},option:mtu,{spec.mtu}")
    if spec.domain:
        cmd.append(f"--domain={spec.domain}")
    if spec.dns_servers:
        cmd.append("--no-resolv")
        cmd.extend(f"--server={server}" for server in spec.dns_servers)
    return cmd


def hostsfile(spec: Dnsmasq) -> str:
    """The ``--dhcp-hostsfile``: ``mac,hostname,ip`` (nova's order), sorted by MAC.

    No ``set:`` tags here (see the module doc): the no-default-route NICs are tagged by
    ``--dhcp-mac`` in ``argv``.
    """
    lines = [f"{h.mac.lower()},{h.hostname},{h.ip}" for h in sorted(spec.hosts, key=lambda h: (h.mac.lower(), h.ip))]
    return "".join(line + "\n" for line in lines)


def namesfile(spec: Dnsmasq) -> str:
    """The ``--addn-hosts`` file: ``ip fqdn short`` for every instance NIC of the
    network, sorted (hosts-file syntax)."""
    return "".join(f"{ip} {fqdn} {short}\n" for ip, fqdn, short in sorted(spec.names))


def nogw_macs(spec: Dnsmasq) -> list:
    """The MACs of the NICs that get no router (``default_route`` False), sorted."""
    return sorted({h.mac.lower() for h in spec.hosts if not h.default_route})


def optsfile(spec: Dnsmasq) -> str:
    """The ``--dhcp-optsfile`` (each line is what follows ``dhcp-option=``): an empty
    router option for the NICs tagged ``<label>-nogw`` (nova's use_single_default_gateway).

    A host's tag ranks above the range's tag and above untagged options in dnsmasq, so
    this wins over the network's router and over a router the user's conf_file gives
    for the network. The line is always there, whatever the hosts.
    """
    return f"tag:{no_router_tag(spec.network)},option:router\n"


# the command line's format: bumped when ``argv`` changes in a way ``spec`` does not show
# (2: --addn-hosts; 3: --user no longer root), so that every running dnsmasq restarts once
ARGV_VERSION = 3


def options_digest(spec: Dnsmasq) -> str:
    """A digest of everything that needs a restart when it changes: ``options_key``
    plus the no-default-route MACs (they are on the command line)."""
    data = _plain(dataclasses.asdict(spec.options_key()))
    data["nogw_macs"] = nogw_macs(spec)
    data["argv_version"] = ARGV_VERSION
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def spec_to_dict(spec: Dnsmasq) -> dict:
    return _plain(dataclasses.asdict(spec))


def spec_from_dict(data) -> Dnsmasq:
    if isinstance(data, Dnsmasq):
        return data
    data = dict(data)
    data["hosts"] = tuple(h if isinstance(h, DhcpHost) else DhcpHost(**h) for h in data.get("hosts", ()))
    data["dns_servers"] = tuple(data.get("dns_servers", ()))
    data["names"] = tuple(tuple(n) for n in data.get("names", ()))
    return Dnsmasq(**data)


def parse_hosts(text):
    """``{mac: ip}`` from a hosts file's text (either line form)."""
    out = {}
    for line in (text or "").splitlines():
        parts = line.strip().split(",")
        if len(parts) >= 3 and not line.startswith("#"):
            out[parts[0].lower()] = parts[-1]
    return out


def parse_leases(text):
    """``[(mac, ip)]`` from a dnsmasq lease file's text."""
    out = []
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) >= 3 and not parts[0].startswith("duid"):
            out.append((parts[1].lower(), parts[2]))
    return out


def lease_client_id(text, mac, ip):
    """The client identifier dnsmasq recorded with a lease (hex bytes), or None. A client
    that sent one (udhcpc does; dhclient does not by default) holds a lease that dnsmasq
    releases only for a DHCPRELEASE carrying the same identifier."""
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[1].lower() == mac.lower() and parts[2] == ip:
            return None if parts[4] == "*" else parts[4]
    return None


# --------------------------------------------------------------------------- current


def _read(path):
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _labels(paths, managed):
    labels = set(managed.get(FACET)) if managed is not None else set()
    try:
        for name in os.listdir(paths.state("dnsmasq")):
            if name.endswith(".json"):
                labels.add(name[: -len(".json")])
    except FileNotFoundError:
        pass
    try:
        for name in os.listdir(paths.run_dir):
            if name.startswith("dnsmasq-") and name.endswith(".pid"):
                labels.add(name[len("dnsmasq-") : -len(".pid")])
    except FileNotFoundError:
        pass
    return labels


def current(paths, managed=None) -> dict:
    """What runs now: ``{label: {pid, alive, argv_digest, hosts_text, bridge, leases}}``.

    A label is known from the managed record, a record file or a pid file. ``alive`` is
    True only when the pid file's process is running and is the dnsmasq started with that
    pid file. ``leases`` is ``[[mac, ip], ...]`` from the lease file.
    """
    out = {}
    for label in sorted(_labels(paths, managed)):
        f = files(label, paths)
        record = {}
        text = _read(f["record"])
        if text:
            try:
                record = json.loads(text)
            except ValueError:
                record = {}
        pid = daemon.read_pid(f["pid"])
        alive = process_matches(pid, f"--pid-file={f['pid']}")
        out[label] = {
            "pid": pid,
            "alive": alive,
            "argv_digest": record.get("argv_digest"),
            "hosts_text": _read(f["hosts"]) or "",
            "names_text": _read(f["names"]) or "",
            "bridge": record.get("bridge"),
            "listen_address": _listen_address(record.get("argv") or ()),
            "leases": [list(lease) for lease in parse_leases(_read(f["leases"]))],
        }
    return out


def _listen_address(argv):
    for arg in argv:
        if arg.startswith("--listen-address="):
            return arg.split("=", 1)[1]
    return None


# --------------------------------------------------------------------------- plan


def plan(desired, current) -> list:
    """The changes that make ``current`` what ``desired`` (a tuple of Dnsmasq) says.

    - ``start``: not running yet (detail: spec)
    - ``restart``: options changed (``options_key``) or the process died (detail: spec, pid, reason)
    - ``reload``: only the hosts or names changed: SIGHUP, no lease is lost (detail: spec, pid)
    - ``release``: an instance left a running dnsmasq while holding a lease: dhcp_release
      (detail: network, bridge, ip, mac, pid); ordered before the restart/reload
    - ``stop``: the network is no longer served: stop it, remove its files (detail: pid)
    """
    changes = []
    wanted = {}
    for spec in desired:
        wanted[spec.network] = spec
    for label in sorted(wanted):
        spec = wanted[label]
        cur = current.get(label)
        if cur is None:
            changes.append(Change(FACET, "start", label, {"spec": spec_to_dict(spec)}))
            continue
        releases = []
        new_hosts = parse_hosts(hostsfile(spec))
        if cur.get("alive"):
            leased = {(m.lower(), ip) for m, ip in (cur.get("leases") or [])}
            bridge = cur.get("bridge") or spec.bridge
            for mac, ip in sorted(leased):
                if new_hosts.get(mac) == ip:
                    continue
                releases.append(
                    Change(
                        FACET,
                        "release",
                        f"{label}/{ip}/{mac}",
                        {
                            "network": label,
                            "bridge": bridge,
                            "ip": ip,
                            "mac": mac,
                            "pid": cur.get("pid"),
                            "server": cur.get("listen_address") or spec.listen_address,
                        },
                    )
                )
        if not cur.get("alive") or cur.get("argv_digest") != options_digest(spec):
            reason = "dead" if not cur.get("alive") else "options changed"
            changes.extend(releases)
            changes.append(
                Change(FACET, "restart", label, {"spec": spec_to_dict(spec), "pid": cur.get("pid"), "reason": reason})
            )
        elif (cur.get("hosts_text") or "") != hostsfile(spec) or (cur.get("names_text") or "") != namesfile(spec):
            changes.extend(releases)
            changes.append(Change(FACET, "reload", label, {"spec": spec_to_dict(spec), "pid": cur.get("pid")}))
        else:
            changes.extend(releases)
    for label in sorted(set(current) - set(wanted)):
        changes.append(Change(FACET, "stop", label, {"pid": current[label].get("pid")}))
    return changes


# --------------------------------------------------------------------------- apply


def _write_files(spec, paths):
    f = files(spec.network, paths)
    paths.ensure()
    os.makedirs(os.path.dirname(f["hosts"]), exist_ok=True)
    os.makedirs(os.path.dirname(f["pid"]), exist_ok=True)
    write_atomic(f["hosts"], hostsfile(spec))
    write_atomic(f["opts"], optsfile(spec))
    write_atomic(f["names"], namesfile(spec))


def _prune_leases(spec, paths):
    """Drop leases of hosts no longer configured (done while dnsmasq is stopped)."""
    f = files(spec.network, paths)
    text = _read(f["leases"])
    if not text:
        return
    keep = parse_hosts(hostsfile(spec))
    lines = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and not parts[0].startswith("duid") and keep.get(parts[1].lower()) != parts[2]:
            continue
        lines.append(line)
    write_atomic(f["leases"], "".join(line + "\n" for line in lines))


def _stop(label, paths):
    f = files(label, paths)
    return daemon.stop(f["pid"], f"--pid-file={f['pid']}", STOP_TIMEOUT)


def _start(spec, paths):
    f = files(spec.network, paths)
    _write_files(spec, paths)
    _prune_leases(spec, paths)
    try:
        os.unlink(f["pid"])
    except FileNotFoundError:
        pass
    user, why = run_as(spec, paths)
    if why:
        log.warning("hanet: dnsmasq %s runs as root: %s", spec.network, why)
    cmd = argv(spec, paths, user)
    pid = _launch(cmd, spec.network, paths)
    record = {"argv_digest": options_digest(spec), "bridge": spec.bridge, "argv": cmd}
    write_atomic(f["record"], json.dumps(record, indent=1, sort_keys=True) + "\n")
    return pid


def _started_meanwhile(spec, paths):
    """The pid of the dnsmasq of ``spec`` when it runs with ``spec``'s options, else None."""
    f = files(spec.network, paths)
    pid = daemon.read_pid(f["pid"])
    if not process_matches(pid, f"--pid-file={f['pid']}"):
        return None
    try:
        record = json.loads(_read(f["record"]) or "null")
    except ValueError:
        return None
    return pid if isinstance(record, dict) and record.get("argv_digest") == options_digest(spec) else None


def _launch(cmd, label, paths):
    f = files(label, paths)
    # a dnsmasq that is still exiting may hold the address a moment longer: retry "in use"
    proc = daemon.launch(
        cmd,
        time.monotonic() + START_TIMEOUT / 2,
        retry_if=lambda proc: "in use" in proc.stdout,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=START_TIMEOUT,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"dnsmasq for {label} failed to start (exit {proc.returncode}): {proc.stdout.strip()}")
    pid = daemon.wait_for_pid(f["pid"], f"--pid-file={f['pid']}", time.monotonic() + START_TIMEOUT)
    if pid is None:
        raise RuntimeError(f"dnsmasq for {label} did not come up within {START_TIMEOUT}s (see {f['log']})")
    return pid


def revive(paths, label):
    """Start the dnsmasq of ``label`` again, with the command line it was started with,
    when its record says hanet runs it and its process is gone (a stopped one has no
    record). Its lease file is kept, so every lease survives. The new pid, or None."""
    with daemon.lock(paths):
        f = files(label, paths)
        try:
            record = json.loads(_read(f["record"]) or "null")
        except ValueError:
            return None
        if (
            not isinstance(record, dict)
            or not record.get("argv")
            or process_matches(daemon.read_pid(f["pid"]), f"--pid-file={f['pid']}")
        ):
            return None
        try:
            os.unlink(f["pid"])
        except FileNotFoundError:
            pass
        return _launch(record["argv"], label, paths)


def release_packet(server, ip, mac, client_id=None):
    """A DHCPRELEASE for lease ``ip``/``mac`` with server identifier ``server`` and, when
    the lease has one, its client identifier (what dhcp_release sends)."""
    import struct

    chaddr = bytes.fromhex(mac.replace(":", "").replace("-", ""))
    head = struct.pack(
        "!BBBBIHH4s4s4s4s16s64s128sI",
        1,
        1,
        len(chaddr),
        0,
        0,
        0,
        0,
        socket.inet_aton(ip),
        bytes(4),
        bytes(4),
        bytes(4),
        chaddr.ljust(16, b"\0"),
        bytes(64),
        bytes(128),
        0x63825363,
    )
    options = bytes([53, 1, 7, 54, 4]) + socket.inet_aton(server)
    if client_id:
        clid = bytes.fromhex(client_id.replace(":", ""))
        options += bytes([61, len(clid)]) + clid
    packet = head + options + bytes([255])
    return packet.ljust(300, b"\0")  # BOOTP's minimum size


def send_release(bridge, server, ip, mac, client_id=None):
    """Tell the dnsmasq listening on ``server`` (on ``bridge``) to drop a lease, as
    ``dhcp_release`` does (a UDP packet bound to the bridge, to server:67), but with the
    server identifier dnsmasq answers with. dhcp_release puts the bridge's *first* address
    in the same subnet there; on a network host that is the host's own address, not the
    gateway dnsmasq listens on, and dnsmasq ignores a release whose server identifier is
    not its own, so the lease stayed and every apply tried again."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, bridge.encode())
        sock.sendto(release_packet(server, ip, mac, client_id), (server, 67))
    finally:
        sock.close()


def _wait_released(paths, label, mac, ip, timeout=RELEASE_TIMEOUT, resend=None, every=0.5):
    """Wait until the lease is gone from dnsmasq's lease file; ``resend()`` (sending the
    release again) every ``every`` seconds meanwhile: a release is one UDP datagram with
    no answer, and a lost one would leave the lease until it expires."""
    path = files(label, paths)["leases"]
    deadline = time.monotonic() + timeout
    next_send = time.monotonic() + every
    while time.monotonic() < deadline:
        if (mac.lower(), ip) not in parse_leases(_read(path)):
            return True
        if resend is not None and time.monotonic() >= next_send:
            next_send += every
            try:
                resend()
            except OSError:
                pass
        time.sleep(0.05)
    return False


def apply(changes, paths, managed) -> list:
    """Carry out ``changes`` (from ``plan``); return one message per change done."""
    with daemon.lock(paths):
        return _apply(changes, paths, managed)


def _apply(changes, paths, managed):
    done = []
    names = managed.get(FACET) if managed is not None else set()
    for change in changes:
        if change.facet != FACET:
            continue
        label = change.target
        if change.action in ("start", "restart"):
            spec = spec_from_dict(change.detail["spec"])
            pid = _started_meanwhile(spec, paths) if change.action == "start" else None
            if pid is not None:
                # planned before this lock was taken: another applier (the takeover of
                # another network on this host) started it since; a second start fails on
                # the address in use, after unlinking the live one's pid file, and every
                # later apply then fails the same way
                _write_files(spec, paths)
                os.kill(pid, signal.SIGHUP)
                names.add(spec.network)
                if managed is not None:
                    managed.set(FACET, names)
                done.append(f"dnsmasq {spec.network} was started meanwhile: SIGHUP pid {pid}")
                continue
            old = _stop(spec.network, paths) if change.action == "restart" else None
            pid = _start(spec, paths)
            names.add(spec.network)
            if managed is not None:
                managed.set(FACET, names)
            if change.action == "restart":
                why = change.detail.get("reason", "options changed")
                done.append(f"restarted dnsmasq {spec.network} ({why}): pid {old} -> {pid}")
            else:
                done.append(f"started dnsmasq {spec.network}: pid {pid}")
        elif change.action == "reload":
            spec = spec_from_dict(change.detail["spec"])
            f = files(spec.network, paths)
            _write_files(spec, paths)
            pid = daemon.read_pid(f["pid"])
            if not process_matches(pid, f"--pid-file={f['pid']}"):
                pid = _start(spec, paths)
                done.append(f"started dnsmasq {spec.network} (was not running): pid {pid}")
            else:
                os.kill(pid, signal.SIGHUP)
                done.append(f"reloaded dnsmasq {spec.network} hosts: SIGHUP pid {pid}")
        elif change.action == "release":
            d = change.detail
            error, resend = None, None
            if d.get("server"):
                try:
                    clid = lease_client_id(_read(files(d["network"], paths)["leases"]), d["mac"], d["ip"])

                    def resend(d=d, clid=clid):
                        send_release(d["bridge"], d["server"], d["ip"], d["mac"], clid)

                    resend()
                except OSError as err:
                    error = str(err)
            else:
                proc = run(
                    [DHCP_RELEASE, d["bridge"], d["ip"], d["mac"]],
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    text=True,
                    timeout=10,
                )
                if proc.returncode != 0:
                    error = (proc.stderr or proc.stdout).strip()
            if error:
                done.append(f"dhcp_release {d['bridge']} {d['ip']} {d['mac']} failed: {error}")
            elif _wait_released(paths, d["network"], d["mac"], d["ip"], resend=resend):
                done.append(f"released lease {d['ip']} {d['mac']} on {d['bridge']}")
            else:
                done.append(f"sent dhcp_release {d['ip']} {d['mac']} on {d['bridge']} (lease still listed)")
        elif change.action == "stop":
            pid = _stop(label, paths)
            for path in files(label, paths).values():
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
            names.discard(label)
            if managed is not None:
                managed.set(FACET, names)
            done.append(f"stopped dnsmasq {label}" + (f" (pid {pid})" if pid else "") + ", removed its files")
        else:
            raise ValueError(f"unknown dnsmasq change {change.action}")
    return done


# --------------------------------------------------------------------------- status


def status(paths, managed=None) -> dict:
    """``{label: {pid, running, leases, hosts, bridge}}`` for ``hanet.status``."""
    out = {}
    for label, cur in current(paths, managed).items():
        out[label] = {
            "pid": cur["pid"] if cur["alive"] else None,
            "running": cur["alive"],
            "leases": len(cur["leases"]),
            "hosts": len(parse_hosts(cur["hosts_text"])),
            "bridge": cur["bridge"],
        }
    return out
