"""The failover protocol, in one place: what travels (event tags, the signed form of a
liveness report, takeover orders), what is kept (the owners record and its epochs), and
the decision (report + record + second opinion + pillar -> verdict).

Everything a report, an order or a record looks like is defined here and nowhere else;
the beacon (``_beacons/hanet_liveness.py``) builds reports with it, the master's engine
and runner parse and decide with it, the ext_pillar and the execution module read the
record with it. The decision is a pure function (``decide``): no Salt, no I/O.

The flow (docs/architecture.md walks it file by file)::

    beacon: Prober sees a peer silent -> report(...) signed -> liveness_tag(...)
    master: parse_report -> verify -> at_stake -> second opinion -> decide -> Record
            -> takeover order to the new owner (TAKEOVER_KWARGS), relinquish to the old
    minion: parse_order (warm path in the beacon) / hanet.takeover job -> takeover.run
            -> failover_tag(network, "complete" | "failed")
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import dataclass, field
from typing import Optional

BEACON = "hanet_liveness"
UP, DOWN = "up", "down"
# a network host's report about itself (``_hanet.health``): it cannot serve some of its
# networks (``lost``), or it can serve them all again
IMPAIRED, HEALTHY = "impaired", "healthy"
STATES = (DOWN, UP, IMPAIRED, HEALTHY)
DWELL_S = 10.0  # a host whose health changed this recently is not handed a network
LIVENESS_GLOB = f"salt/beacon/*/{BEACON}/*"
PRIME_TAGS = ("hanet/prime", "salt/minion/*/start")
PRIME_TAG = "hanet/prime"
FRESH_S = 30.0  # a report detected longer ago than this is stale (or a replay)

TAKEOVER_FUN = "hanet.takeover"
RELINQUISH_FUN = "hanet.relinquish"
# the keyword arguments a takeover order may carry (the master sends them, the beacon's
# order listener accepts exactly these, hanet.takeover takes them)
TAKEOVER_KWARGS = frozenset({"previous", "detected_at", "planned", "decision", "handover"})
SIGNED = ("observer", "peer", "state", "detected_at", "nonce")  # what a report's signature covers
SIGNED_HEALTH = SIGNED + ("lost",)  # and a health report's


# --------------------------------------------------------------------------- tags


def liveness_tag(observer, peer, state):
    return f"salt/beacon/{observer}/{BEACON}/{peer}/{state}"


def parse_liveness_tag(tag):
    """(observer, peer, state) of a liveness tag, or None."""
    parts = tag.split("/") if isinstance(tag, str) else []
    if len(parts) != 6 or parts[:2] != ["salt", "beacon"] or parts[3] != BEACON or parts[5] not in STATES:
        return None
    return parts[2], parts[4], parts[5]


def failover_tag(network, outcome):
    """``hanet/failover/<network>/<outcome>`` (complete, failed, rejected)."""
    return f"hanet/failover/{network or 'unknown'}/{outcome}"


FAILOVER_GLOB = "hanet/failover/*/*"


def parse_failover_tag(tag):
    """(network, outcome) of a ``hanet/failover/...`` tag, or None."""
    parts = tag.split("/") if isinstance(tag, str) else []
    if len(parts) != 4 or parts[:2] != ["hanet", "failover"]:
        return None
    return parts[2], parts[3]


# --------------------------------------------------------------------------- reports


def canonical(data):
    """The signed part of a liveness or health report: the beacon signs exactly this,
    the master verifies exactly this."""
    keys = SIGNED_HEALTH if data.get("state") in (IMPAIRED, HEALTHY) else SIGNED
    return json.dumps({k: data.get(k) for k in keys}, sort_keys=True, separators=(",", ":"))


def report(observer, peer, state, detected_at, targets=(), nonce=None):
    """A liveness report's data, unsigned (``sign`` adds ``sig``)."""
    import uuid

    return {
        "peer": peer,
        "state": state,
        "detected_at": detected_at,
        "observer": observer,
        "targets": list(targets),
        "id": observer,
        "nonce": nonce or uuid.uuid4().hex,
    }


def health_report(host, lost, detected_at, nonce=None):
    """A network host's report about itself: the networks it cannot serve now (``lost``;
    empty: it can serve them all), unsigned."""
    data = report(host, host, IMPAIRED if lost else HEALTHY, detected_at, (), nonce)
    data["lost"] = sorted(lost)
    return data


def sign(private_key, data):
    """``data`` with ``sig``: its canonical form signed by ``private_key`` (a
    ``salt.crypt.PrivateKey``, the minion's own)."""
    import base64

    return dict(data, sig=base64.b64encode(private_key.sign(canonical(data).encode())).decode())


def verify(public_key_file, data):
    """None when ``data`` is signed by the key in ``public_key_file``; else why not."""
    import base64
    import binascii

    import salt.crypt

    sig = data.get("sig")
    if not isinstance(sig, str):
        return "unsigned"
    if not os.path.isfile(public_key_file):
        return f"no accepted key {os.path.basename(public_key_file)}"
    try:
        ok = salt.crypt.verify_signature(public_key_file, canonical(data).encode(), base64.b64decode(sig))
    except (binascii.Error, ValueError, TypeError) as err:
        return f"bad signature ({err})"
    return None if ok else "bad signature"


class Rejected(Exception):
    """A report, order or record that hanet refuses; ``reason`` says why, ``network``
    names the network concerned when there is one."""

    def __init__(self, reason, network=None):
        super().__init__(reason)
        self.reason = reason
        self.network = network


@dataclass(frozen=True)
class Report:
    observer: str
    peer: str
    state: str
    detected_at: float
    nonce: str
    lost: tuple = ()  # a health report's: the networks the host cannot serve


def parse_report(tag, data, now, fresh_s=FRESH_S):
    """The report in a liveness event, checked for shape and freshness (not for its
    signature: ``verify``). Raises Rejected."""
    if not isinstance(tag, str) or not isinstance(data, dict):
        raise Rejected("malformed event")
    parsed = parse_liveness_tag(tag)
    if parsed is None:
        raise Rejected("malformed tag")
    observer, peer, state = parsed
    if data.get("observer") != observer or data.get("peer") != peer or data.get("state") != state:
        raise Rejected("tag and data disagree")
    detected_at = data.get("detected_at")
    if (
        isinstance(detected_at, bool)
        or not isinstance(detected_at, (int, float))
        or not isinstance(data.get("nonce"), str)
    ):
        raise Rejected("malformed data (detected_at, nonce)")
    if abs(now - detected_at) > fresh_s:
        raise Rejected(
            f"stale event (detected {now - detected_at:.1f} s "
            + (
                "ago: held up on the way, or the observer's clock is behind"
                if now >= detected_at
                else "in the future: the observer's clock is ahead"
            )
            + f"; hanet needs the hosts' clocks within {fresh_s:.0f} s of the master's)"
        )
    lost = ()
    if state in (IMPAIRED, HEALTHY):
        lost = data.get("lost")
        if (
            observer != peer
            or not isinstance(lost, list)
            or not all(isinstance(x, str) for x in lost)
            or bool(lost) != (state == IMPAIRED)
        ):
            raise Rejected("malformed health report")
        lost = tuple(sorted(lost))
    return Report(observer, peer, state, float(detected_at), data["nonce"], lost)


# --------------------------------------------------------------------------- orders


def takeover_order(network, epoch, previous, detected_at=None, planned=False, decision=None, handover=False):
    """(args, kwargs) of a ``hanet.takeover`` order. ``handover``: the previous owner is
    alive and has been told to let go; wait for the gateway to fall silent, then bind."""
    kwargs = {"previous": previous}
    if handover:
        kwargs["handover"] = True
    if detected_at is not None:
        kwargs["detected_at"] = detected_at
    if planned:
        kwargs["planned"] = True
    if decision is not None:
        kwargs["decision"] = decision
    assert set(kwargs) <= TAKEOVER_KWARGS
    return [network, int(epoch)], kwargs


# --------------------------------------------------------------------------- direct orders
#
# The master also sends each takeover and relinquish order straight to the network host,
# as one UDP datagram signed with the master's key, before it publishes the Salt job of
# the same jid: the beacon acts on whichever comes first (each jid once), and the job
# does the rest. The datagram skips the master's publish handling and the minion's
# share of a publication (decrypting it, forking the job) on the failover path.

ORDER_MAX_AGE_S = 30.0  # a direct order older (or newer) than this, by the host's clock, is refused
ORDER_MAX_BYTES = 8192


def order_datagram(private_key, tgt, fun, args, kwargs, jid, now):
    """The direct order ``fun(*args, **kwargs)`` for minion ``tgt`` under ``jid``,
    signed with ``private_key`` (a ``salt.crypt.PrivateKey``: the master's)."""
    import base64

    body = json.dumps(
        {"v": 1, "tgt": tgt, "fun": fun, "arg": list(args), "kwarg": dict(kwargs or {}), "jid": jid, "sent_at": now},
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    sig = base64.b64encode(private_key.sign(body.encode())).decode()
    return json.dumps({"order": body, "sig": sig}, separators=(",", ":")).encode()


def parse_order_datagram(raw, public_key_file, minion_id, now):
    """``(order, None)`` for a direct order to ``minion_id`` signed by the key in
    ``public_key_file`` (the master's, as the minion cached it) and sent within
    ``ORDER_MAX_AGE_S`` of ``now``; ``(None, why)`` for anything else. ``order`` is
    what ``parse_order`` returns for the same publication."""
    import base64
    import binascii

    import salt.crypt

    if len(raw) > ORDER_MAX_BYTES:
        return None, "too large"
    try:
        outer = json.loads(raw)
        body, sig = outer["order"], base64.b64decode(outer["sig"], validate=True)
        if not isinstance(body, str):
            raise TypeError("order is not a string")
    except (ValueError, KeyError, TypeError, binascii.Error) as err:
        return None, f"not an order ({err})"
    if not os.path.isfile(public_key_file):
        return None, f"no master key {public_key_file}"
    try:
        ok = salt.crypt.verify_signature(public_key_file, body.encode(), sig)
    except (ValueError, TypeError) as err:
        return None, f"bad signature ({err})"
    if not ok:
        return None, "bad signature"
    try:
        order = json.loads(body)
        sent_at = float(order["sent_at"])
        arg = list(order["arg"]) + ([dict(order["kwarg"], __kwarg__=True)] if order["kwarg"] else [])
        load = {"fun": order["fun"], "tgt": order["tgt"], "tgt_type": "glob", "arg": arg, "jid": order["jid"]}
    except (ValueError, KeyError, TypeError) as err:
        return None, f"not an order ({err})"
    if abs(now - sent_at) > ORDER_MAX_AGE_S:
        return None, f"sent {now - sent_at:.1f} s ago by this host's clock (at most {ORDER_MAX_AGE_S:.0f})"
    got = parse_order({"load": load}, minion_id)
    return (got, None) if got is not None and got["jid"] else (None, "not an order for this host")


def report_datagram(tag, data):
    """A signed liveness or health report (``tag``, ``data``) as the beacon also sends it
    straight to the masters' engines (``ha:report_port``), beside the beacon event."""
    return json.dumps({"tag": tag, "data": data}, separators=(",", ":"), default=str).encode()


def parse_report_datagram(raw):
    """``(tag, data)`` of a report datagram, or None when it is not one. Nothing is
    verified here: the engine hands it to the decision (``hanet.liveness``), which checks
    the observer's signature, freshness and nonce as for the event."""
    import fnmatch

    if len(raw) > ORDER_MAX_BYTES:
        return None
    try:
        got = json.loads(raw)
        tag, data = got["tag"], got["data"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(tag, str) or not isinstance(data, dict) or not fnmatch.fnmatchcase(tag, LIVENESS_GLOB):
        return None
    return tag, data


def parse_order(payload, minion_id):
    """A ``hanet.takeover`` or ``hanet.relinquish`` publication aimed at ``minion_id``
    alone, as {jid, fun, args, kwargs}; None for anything else."""
    load = payload.get("load") if isinstance(payload, dict) else None
    if not isinstance(load, dict) or load.get("fun") not in (TAKEOVER_FUN, RELINQUISH_FUN):
        return None
    tgt, tgt_type = load.get("tgt"), load.get("tgt_type", "glob")
    if not ((tgt_type == "glob" and tgt == minion_id) or (tgt_type == "list" and tgt == [minion_id])):
        return None
    args, kwargs = [], {}
    for item in load.get("arg") or []:
        if isinstance(item, dict) and item.get("__kwarg__"):
            kwargs.update({k: v for k, v in item.items() if k != "__kwarg__"})
        else:
            args.append(item)
    if load["fun"] == RELINQUISH_FUN:
        if len(args) != 3 or kwargs:
            return None
    elif len(args) != 2 or set(kwargs) - TAKEOVER_KWARGS:
        return None
    return {"jid": load.get("jid"), "fun": load["fun"], "args": args, "kwargs": kwargs}


# --------------------------------------------------------------------------- the record

RECORD_FILE = "owners.json"
SEEN_FILE = "seen.json"
ENGINE_BEAT = "engine.beat"  # the hanet_failover engine touches it every second
ENGINE_FRESH_S = 5.0


class RecordError(Exception):
    """The owners record cannot be read (torn, empty, not a record): no decision is
    made on it, and nothing resets it silently."""


def record_dir(cachedir):
    """Where the master keeps the record (``<cachedir>/hanet``)."""
    return os.path.join(cachedir, "hanet")


def engine_beat(cachedir):
    return os.path.join(record_dir(cachedir), ENGINE_BEAT)


def engine_alive(cachedir, now=None):
    """Whether the hanet_failover engine runs (its heartbeat file is fresh)."""
    try:
        age = (now if now is not None else time.time()) - os.stat(engine_beat(cachedir)).st_mtime
    except OSError:
        return False
    return age < ENGINE_FRESH_S


def load_record(path):
    """``{"owners": {network: {owner, epoch, since, reason}}}`` from ``path``; a missing
    file is the empty record (nothing has moved yet). Raises RecordError for anything
    unreadable."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        return {"owners": {}}
    except OSError as err:
        raise RecordError(f"the failover record {path} cannot be read: {err}") from err
    try:
        data = json.loads(text)
    except ValueError as err:
        raise RecordError(
            f"the failover record {path} is not JSON ({err}); restore it or remove it deliberately"
        ) from err
    if not isinstance(data, dict) or not isinstance(data.get("owners", {}), dict):
        raise RecordError(f"the failover record {path} is not a record")
    data.setdefault("owners", {})
    return data


def write_durable(path, text):
    """Replace ``path`` with ``text`` so that a crash leaves either the old or the new
    file: write a temporary file, fsync it, rename it, fsync the directory."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class Record:
    """The master's durable record, held under an exclusive lock for one decision::

        with Record(cachedir) as rec:
            record_move(rec.owners, move, now, reason)
            rec.save()

    ``owners`` (``owners.json``) is written durably; the nonces of the reports already
    handled (``seen``, ``seen.json``) are kept beside it without fsync: losing them in
    a crash only reopens the freshness window for a replay, which the signature and
    the record's epochs still bound."""

    def __init__(self, cachedir):
        self.dir = record_dir(cachedir)
        self.path = os.path.join(self.dir, RECORD_FILE)
        self.seen_path = os.path.join(self.dir, SEEN_FILE)
        self.data = None
        self.seen = None
        self._lock = None

    @property
    def owners(self):
        return self.data["owners"]

    def __enter__(self):
        os.makedirs(self.dir, exist_ok=True)
        self._lock = open(os.path.join(self.dir, "owners.lock"), "w", encoding="utf-8")
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        try:
            self.data = self._load()
        except BaseException:
            self.__exit__()
            raise
        try:
            with open(self.seen_path, encoding="utf-8") as fh:
                self.seen = json.load(fh)
        except (OSError, ValueError):
            self.seen = None
        if not isinstance(self.seen, dict):
            self.seen = {}
        return self

    def _load(self):
        """The record (``{"owners": {...}}``), read under the lock; another backend
        (``_hanet.record``) reads it from elsewhere."""
        return load_record(self.path)

    def handle(self, nonce, via, now):
        """Remember that path ``via`` handles the report ``nonce``. Returns the other
        path's name when that one took it already (within the freshness window); raises
        Rejected for a replay."""
        seen = self.seen.get(nonce)
        if seen is not None:
            if seen_via(seen) != via and now - seen_at(seen) < FRESH_S:
                return seen_via(seen)
            raise Rejected("replayed event")
        self.seen[nonce] = [now, via]
        self.save_seen(now)
        return None

    def record(self, moves, now, reason):
        """Record ``moves`` (``record_move``) and save, when there are any."""
        for move in moves:
            record_move(self.owners, move, now, reason)
        if moves:
            self.save()

    def save(self):
        """Write the owners durably: an owner change must survive a crash of the master."""
        self.data.pop("seen", None)  # kept in seen.json since the record is durable
        write_durable(self.path, json.dumps(self.data, sort_keys=True, indent=1) + "\n")

    def save_seen(self, now=None):
        now = now if now is not None else time.time()
        self.seen = {k: v for k, v in self.seen.items() if now - seen_at(v) < 10 * FRESH_S}
        tmp = f"{self.seen_path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(self.seen, fh, sort_keys=True)
        os.replace(tmp, self.seen_path)

    def __exit__(self, *exc):
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None


def read_owners(cachedir):
    """The record's owners ({network: {owner, epoch, ...}}), without the lock."""
    return load_record(os.path.join(record_dir(cachedir), RECORD_FILE))["owners"]


def seen_at(entry):
    """When a nonce was first handled (``[at, via]``; a bare float in older records)."""
    return entry[0] if isinstance(entry, list) else float(entry)


def seen_via(entry):
    return entry[1] if isinstance(entry, list) and len(entry) > 1 else "reactor"


def merge(*records):
    """{network: {owner, epoch}} from several records (the master's, as pillar, and a
    host's own copy): per network the entry with the higher epoch wins, so a host that
    was down while its network moved learns so before it binds anything."""
    out = {}
    for rec in records:
        for net, entry in (rec or {}).items():
            if not isinstance(entry, dict) or not isinstance(entry.get("owner"), str):
                continue
            if net not in out or entry.get("epoch", 0) > out[net].get("epoch", 0):
                out[net] = entry
    return out


def owner_of(cfg, owners, network):
    """Who holds a network-host network by the record (its first network host when the
    record has never moved it)."""
    rec = owners.get(network)
    return rec["owner"] if rec else cfg.networks[network].network_hosts[0]


def epoch_of(owners, network):
    return int((owners.get(network) or {}).get("epoch", 0))


# --------------------------------------------------------------------------- the decision


@dataclass(frozen=True)
class Move:
    network: str
    previous: str
    new: str
    epoch: int
    handover: bool = False  # the old owner is alive and lets go first (handover_orders)


@dataclass
class Verdict:
    """What to do about a report: ``moves`` to make, and ``rejected`` [(network or
    None, reason)] to report. Both empty: nothing to do (moved already)."""

    moves: list = field(default_factory=list)
    rejected: list = field(default_factory=list)


def at_stake(cfg, owners, observer, peer):
    """The networks that ``peer`` holds and ``observer`` watches it for."""
    return [
        label
        for label, n in sorted(cfg.networks.items())
        if not n.multi_host
        and peer in n.network_hosts
        and observer != peer
        and owner_of(cfg, owners, label) == peer
        and observer in cfg.hosts_carrying(label)
    ]


REJECT_KINDS = (  # (text the reason starts with or contains, metric label); first match wins
    ("malformed", "malformed"),
    ("tag and data disagree", "malformed"),
    ("stale event", "stale"),
    ("replayed", "replayed"),
    ("not from ", "forged"),
    ("watches no network", "not_at_stake"),
    ("answers the master", "alive"),
    ("the master cannot check", "unchecked"),
    ("no live standby", "no_standby"),
    ("pillar:", "pillar"),
    ("no decision:", "record"),
)


def reject_kind(reason):
    """A rejected report's reason as a short label (``hanet_reports_rejected_total``)."""
    text = str(reason or "")
    for needle, kind in REJECT_KINDS:
        if text.startswith(needle) or needle in text:
            return kind
    return "other"


def moved_away(cfg, owners, observer, peer):
    """The networks ``observer`` watches that the record already moved away from
    ``peer``: a report of its death that arrives after the decision (every host that
    carries one of its networks reports it) is late, not wrong."""
    return [
        label
        for label, n in sorted(cfg.networks.items())
        if not n.multi_host
        and (owners.get(label) or {}).get("previous") == peer
        and owner_of(cfg, owners, label) != peer
        and observer in cfg.hosts_carrying(label)
    ]


def nothing_at_stake(rep):
    return f"{rep.observer} watches no network that {rep.peer} holds"


def choose_standby(net, peer, observer, dead=()):
    """The host that takes ``net`` over from ``peer``: the observer when it stands by
    for it (it sees the segment from the standby's side), else the first other network
    host the master does not see dead; None when there is none."""
    standbys = [h for h in net.network_hosts if h != peer and h not in dead]
    if observer in standbys:
        return observer
    return standbys[0] if standbys else None


def decide(cfg, owners, rep, opinion, evidence="", dead=()):
    """The verdict on a *down* report ``rep`` (a Report) against the record's
    ``owners``, given the master's second opinion of the suspect: "alive", "dead" or
    None (no check could be made). A suspect the master sees alive, or cannot see at
    all, is not moved; a standby the master sees ``dead`` is not chosen. Pure."""
    if rep.state != DOWN:
        return Verdict()
    nets = at_stake(cfg, owners, rep.observer, rep.peer)
    if not nets:
        return Verdict(rejected=[(None, nothing_at_stake(rep))])
    if opinion == "alive":
        return Verdict(
            rejected=[
                (nets[0], f"second opinion: {rep.peer} answers the master" + (f" ({evidence})" if evidence else ""))
            ]
        )
    if opinion != "dead":
        return Verdict(
            rejected=[
                (
                    nets[0],
                    f"second opinion: the master cannot check {rep.peer}" + (f" ({evidence})" if evidence else ""),
                )
            ]
        )
    verdict = Verdict()
    for label in nets:
        new = choose_standby(cfg.networks[label], rep.peer, rep.observer, dead)
        if new is None:
            verdict.rejected.append((label, f"no live standby for {label}"))
            continue
        verdict.moves.append(Move(label, rep.peer, new, epoch_of(owners, label) + 1))
    return verdict


def can_serve(health, host, network, now, dwell_s=DWELL_S):
    """Whether ``host`` can be handed ``network`` by its health: it has not lost it, and
    its health has not changed within ``dwell_s`` (a flapping link is not trusted).
    ``health``: {host: {"lost": [network], "since": when the master saw it change, 0:
    never}}; a host with no health known is presumed fine (it never said otherwise)."""
    h = health.get(host) or {}
    if network in (h.get("lost") or ()):
        return False
    since = float(h.get("since") or 0)
    return not since or now - since >= dwell_s


def handover(cfg, owners, host, lost, health, dead=(), now=0.0, dwell_s=DWELL_S):
    """The verdict on a network host that cannot serve ``lost`` (its health report):
    each of those networks that it owns goes to the first standby that is not dead and
    can serve it (``can_serve``). With no such standby the owner keeps the network:
    never both giving up. Pure."""
    verdict = Verdict()
    for label in sorted(lost):
        net = cfg.networks.get(label)
        if net is None or net.multi_host or owner_of(cfg, owners, label) != host:
            continue
        ready = [
            h for h in net.network_hosts if h != host and h not in dead and can_serve(health, h, label, now, dwell_s)
        ]
        if not ready:
            verdict.rejected.append(
                (
                    label,
                    f"{host} cannot serve {label}, and no live standby can "
                    f"(lost it too, or changed within {dwell_s:.0f} s): "
                    f"{host} keeps it",
                )
            )
            continue
        verdict.moves.append(Move(label, host, ready[0], epoch_of(owners, label) + 1, handover=True))
    return verdict


def handover_orders(move):
    """The orders of a handover, in the order they are sent: the old owner lets go, the
    new one waits for the gateway to fall silent and binds (never two holders)."""
    return [
        Order("relinquish", move.previous, move.network, move.epoch, owner=move.new),
        Order("takeover", move.new, move.network, move.epoch, previous=move.previous, handover=True),
    ]


def record_move(owners, move, now, reason):
    """Write ``move`` into the record's ``owners``; it is unconfirmed until the new
    owner's ``complete`` event for that epoch arrives (``confirm``)."""
    owners[move.network] = {
        "owner": move.new,
        "epoch": move.epoch,
        "since": now,
        "reason": reason,
        "previous": move.previous,
        "confirmed": False,
    }
    if move.handover:  # sent again as a handover: the old owner lets go, the new one waits
        owners[move.network]["handover"] = True


def confirm(owners, network, owner, epoch, complete=None):
    """Mark ``owner``'s hold of ``network`` at ``epoch`` confirmed (its ``complete``
    event, ``complete``: that event's data); True when that changed the record. The
    entry also keeps how the move went, for ``hanet.status``: ``took`` (seconds from
    the detection, or from the order for a planned move, to DHCP served) and ``path``
    (who decided, and who bound the addresses: ``engine/warm``, ``reconcile/job``, ...)."""
    entry = owners.get(network)
    if not entry or entry.get("owner") != owner or entry.get("epoch") != epoch or entry.get("confirmed", True) is True:
        return False
    entry["confirmed"] = True
    entry.update(move_summary(complete))
    return True


def move_summary(complete):
    """``{took, path}`` from a ``complete`` event's data (what it carries of them)."""
    if not isinstance(complete, dict):
        return {}
    out = {}
    done, seen = complete.get("completed_at"), complete.get("detected_at")
    dhcp = (complete.get("timings") or {}).get("dhcp_s")
    if isinstance(done, (int, float)) and isinstance(seen, (int, float)) and not complete.get("planned"):
        out["took"] = round(max(0.0, done - seen), 3)
    elif isinstance(dhcp, (int, float)):
        out["took"] = round(dhcp, 3)
    via = (complete.get("decision") or {}).get("via") if isinstance(complete.get("decision"), dict) else None
    if complete.get("planned"):
        via = "planned"
    if via or complete.get("bound_by"):
        out["path"] = f"{via or '?'}/{complete.get('bound_by') or '?'}"
    return out


def confirmed(owners, network):
    """Whether the record's owner of ``network`` has confirmed its epoch. A network the
    record never moved is confirmed (the highstate binds its first network host)."""
    entry = owners.get(network)
    return not entry or entry.get("confirmed", True) is True


def planned_move(cfg, owners, network, new):
    """The Move that makes ``new`` the owner of ``network`` (None: it is already). A
    planned move is a handover: the old owner lets go first, the new one binds once
    every address is silent (never two holders)."""
    old = owner_of(cfg, owners, network)
    if old == new:
        return None
    return Move(network, old, new, epoch_of(owners, network) + 1, handover=True)


def evacuation(cfg, owners, minion):
    """[(network, Move or None)] for every network ``minion`` holds: each to its next
    network host (None: no standby)."""
    out = []
    for label, net in sorted(cfg.networks.items()):
        if net.multi_host or owner_of(cfg, owners, label) != minion:
            continue
        standbys = [h for h in net.network_hosts if h != minion]
        out.append((label, Move(label, minion, standbys[0], epoch_of(owners, label) + 1) if standbys else None))
    return out


def vouching_addresses(cfg, host_ipv4):
    """The suspect's own addresses that can vouch for it (its grains' ipv4), less
    loopback and every address that moves between hosts (gateways, floating IPs)."""
    moving = {n.gateway for n in cfg.networks.values() if n.gateway}
    moving |= {n.dhcp_server for n in cfg.networks.values() if n.dhcp_server}
    moving |= {f.address for i in cfg.instances.values() for f in i.floating_ips}
    return sorted(a for a in host_ipv4 or () if not a.startswith("127.") and a not in moving)


def watched_hosts(cfg):
    """Every network host of a network-host network (what the master watches)."""
    return sorted({h for n in cfg.networks.values() if not n.multi_host for h in n.network_hosts})


@dataclass(frozen=True)
class Opinion:
    """The master's second opinion of a suspect: ``verdict`` "alive", "dead" or None,
    ``source`` (watch, icmp) and the addresses it checked."""

    verdict: Optional[str]
    source: str
    addresses: tuple = ()

    @property
    def evidence(self):
        return ", ".join(self.addresses) if self.addresses else "no address to check"


# --------------------------------------------------------------------------- the cluster's view


def cluster_status(cfg, owners, answers, skew=None):
    """``salt-run hanet.status``: for each network who serves, who stands by, who did not
    answer and whether every host agrees with the record; for each floating IP where it
    lives. ``answers``: {minion: its ``hanet.status``}. Pure."""
    nets = {}
    for label, net in sorted(cfg.networks.items()):
        holders = {h: s["networks"][label] for h, s in answers.items() if label in s.get("networks", {})}
        serving = sorted(h for h, n in holders.items() if n.get("role") == "serving")
        entry = {
            "multi_host": net.multi_host,
            "serving": serving,
            "standby": sorted(h for h, n in holders.items() if n.get("role") == "standby"),
            "unreachable": sorted(h for h in cfg.hosts_carrying(label) if h not in answers),
        }
        if not net.multi_host:
            owner = owner_of(cfg, owners, label)
            with_gw = sorted(h for h, n in holders.items() if net.service_cidr in n.get("addresses", []))
            entry.update(
                owner=owner,
                epoch=epoch_of(owners, label),
                confirmed=confirmed(owners, label),
                gateway_on=with_gw,
                agree=with_gw == [owner] and serving == [owner],
            )
        else:
            entry["agree"] = all(n.get("present") for n in holders.values())
        nets[label] = entry
    fips = {}
    for h, s in answers.items():
        for f in s.get("floating_ips", []):
            fips.setdefault(f["address"], []).append(h)
    fips = {a: sorted(h) for a, h in sorted(fips.items())}
    return {
        "networks": nets,
        "floating_ips": fips,
        "record": owners,
        "problems": cluster_problems(cfg, nets, fips, answers, skew),
    }


CLOCK_WARN_S = 5.0  # a host's clock this far from the master's is a problem (reports go stale at FRESH_S)


def clock_skew(answers, asked_at, returned_at):
    """{host: seconds its clock is off the master's} (pure), from the ``time`` each host
    put in its ``hanet.status`` answer: it must lie between when the master asked and when
    the answers were back; the skew is how far outside that window it is (0 inside)."""
    out = {}
    for h, s in answers.items():
        t = s.get("time") if isinstance(s, dict) else None
        if isinstance(t, (int, float)) and not isinstance(t, bool):
            out[h] = round(t - asked_at if t < asked_at else t - returned_at if t > returned_at else 0.0, 3)
    return out


def _what(net):
    """What a network-host network's moving address is called in a message."""
    return "dhcp_server" if net.dhcp_server else "gateway"


def cluster_problems(cfg, nets, fips, answers, skew=None):
    """What an operator must look at, from ``cluster_status``'s networks and floating IPs
    and the hosts' answers: ``[{"network"|"floating_ip"|"host": name, "problem": text}]``,
    sorted. Pure."""
    out = []
    for label, e in nets.items():
        net = cfg.networks[label]

        def add(text, label=label):
            out.append({"network": label, "problem": text})

        for h in e["unreachable"]:
            add(f"{h} did not answer")
        if net.multi_host:
            gone = sorted(
                h
                for h, s in answers.items()
                if label in s.get("networks", {}) and not s["networks"][label].get("present")
            )
            if gone:
                add(f"bridge {net.bridge} missing on {', '.join(gone)}")
            continue
        on, owner = e.get("gateway_on") or [], e.get("owner")
        if len(on) > 1:
            add(f"{len(on)} hosts hold the {_what(net)} {net.service_address}: {', '.join(on)}")
        elif not on and owner is not None:
            add(f"no host holds the {_what(net)} {net.service_address} (the record says {owner})")
        elif owner is not None and on != [owner]:
            add(f"the {_what(net)} {net.service_address} is on {on[0]}, the record says {owner}")
        if e.get("confirmed") is False:
            add(f"the move to {owner} (epoch {e.get('epoch')}) is not confirmed yet")
        if not e["standby"]:
            add("no standby answered")
        for h in e["serving"]:
            d = ((answers.get(h) or {}).get("networks", {}).get(label) or {}).get("dnsmasq")
            if isinstance(d, dict) and not d.get("running"):
                add(f"dnsmasq is not running on {h}")
    for address, hosts in fips.items():
        if len(hosts) > 1:
            out.append({"floating_ip": address, "problem": f"held by {len(hosts)} hosts: {', '.join(hosts)}"})
    for h, s in sorted(answers.items()):
        for text in s.get("problems") or []:
            out.append({"host": h, "problem": str(text)})
    for h, off in sorted((skew or {}).items()):
        if abs(off) > CLOCK_WARN_S:
            out.append(
                {
                    "host": h,
                    "problem": f"its clock is {abs(off):.1f} s {'ahead of' if off > 0 else 'behind'} "
                    f"the master's: its reports go stale past {FRESH_S:.0f} s (NTP)",
                }
            )
    return sorted(
        out, key=lambda p: (sorted(p)[0], p.get("network") or p.get("floating_ip") or p.get("host"), p["problem"])
    )


def status_table(status, now=None):
    """``salt-run hanet.status table=True``: ``cluster_status`` (with the runner's
    ``record_error``) as the operator's one screen of text. Pure."""
    import datetime

    def when(t):
        if not isinstance(t, (int, float)):
            return "-"
        return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")

    record = status.get("record") or {}
    rows = [
        ("NETWORK", "KIND", "OWNER", "EPOCH", "SINCE (UTC)", "WHY", "TOOK", "PATH", "GATEWAY ON", "SERVING", "STANDBY")
    ]
    for label, e in sorted(status.get("networks", {}).items()):
        if e.get("multi_host"):
            rows.append((label, "multi_host", "-", "-", "-", "-", "-", "-", "-", ",".join(e["serving"]) or "-", "-"))
            continue
        entry = record.get(label) or {}
        epoch = e.get("epoch")
        rows.append(
            (
                label,
                "network hosts",
                e.get("owner") or "?",
                "?" if epoch is None else str(epoch),
                when(entry.get("since")),
                str(entry.get("reason") or "-")[:40],
                f"{entry['took']:.3f} s" if isinstance(entry.get("took"), (int, float)) else "-",
                str(entry.get("path") or "-"),
                ",".join(e.get("gateway_on") or []) or "none",
                ",".join(e["serving"]) or "-",
                ",".join(e["standby"]) or "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if status.get("record_error"):
        lines += [
            "",
            f"RECORD UNAVAILABLE ({status.get('record_backend')}): {status['record_error']}",
            "no failover is decided until it is back; owners keep serving",
        ]
    fips = status.get("floating_ips") or {}
    if fips:
        lines += ["", "FLOATING IP      ON"] + [f"{a:<16} {','.join(h)}" for a, h in fips.items()]
    problems = status.get("problems") or []
    lines += ["", f"PROBLEMS ({len(problems)})" if problems else "PROBLEMS: none"]
    for p in problems:
        what = next(f"{k} {p[k]}" for k in ("network", "floating_ip", "host") if k in p)
        lines.append(f"  {what}: {p['problem']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- reconcile

CONFIRM_S = 5.0  # an order not confirmed within this is sent again


@dataclass(frozen=True)
class Order:
    """An order the master sends: ``takeover`` (``host`` takes ``network`` at ``epoch``,
    from ``previous``) or ``relinquish`` (``host`` gives ``network`` up to ``owner``)."""

    kind: str
    host: str
    network: str
    epoch: int
    owner: str = ""
    previous: Optional[str] = None
    handover: bool = False  # a takeover that waits for a live old owner to let go

    @property
    def key(self):
        return (self.kind, self.host, self.network, self.epoch)


def reconcile(cfg, owners, verdicts, views, holdings, now, issued, confirm_s=CONFIRM_S, health=None, dwell_s=DWELL_S):
    """One round of the master's reconcile loop: what makes the hosts converge on the
    record, and the record follow what the master can prove. Pure.

    ``verdicts``: {host: "alive" | "dead" | None}, the master's watch of the network
    hosts; ``views``: {observer: {peer: "up" | "down"}}, what hosts' beacons see now
    (only those that answered); ``holdings``: {host: {network: holds its gateway}}, or
    None when the hosts were not asked this round; ``issued``: {Order.key: when it was
    last sent}; ``health``: what the master knows of the network hosts' own health
    (``can_serve``). Returns (moves, orders): the moves to record, then the orders to send.

    - An owner the master sees dead, and that a live host carrying its network sees
      down too, is replaced by the first live standby (one that sees it down first).
      The master's view alone moves nothing (it may have lost only its own path).
    - An owner that says it cannot serve a network (its uplink, its segment link) hands
      it to a standby that can (``handover``), when the report path has not already.
    - A move not confirmed (no ``complete`` at its epoch) within ``confirm_s`` is
      ordered again, to the same host while it lives.
    - A host holding a gateway it does not own is ordered to give it up; an owner that
      confirmed but no longer holds it (a lost bind, a host that fenced itself) is
      ordered to take it again.
    """
    moves, orders = [], []

    def send(order):
        if now - issued.get(order.key, float("-inf")) >= confirm_s:
            orders.append(order)

    for label, net in sorted(cfg.networks.items()):
        if net.multi_host or not net.network_hosts:
            continue
        owner, epoch = owner_of(cfg, owners, label), epoch_of(owners, label)
        entry = owners.get(label) or {}
        if verdicts.get(owner) == DEAD_VERDICT:
            seen_down = {
                o
                for o, v in views.items()
                if verdicts.get(o) != DEAD_VERDICT and (v or {}).get(owner) == DOWN and o in cfg.hosts_carrying(label)
            }
            live = [h for h in net.network_hosts if h != owner and verdicts.get(h) == ALIVE_VERDICT]
            if seen_down and live:
                new = next((h for h in live if h in seen_down), live[0])
                move = Move(label, owner, new, epoch + 1)
                moves.append(move)
                orders.append(Order("takeover", new, label, move.epoch, previous=owner))
                orders.append(Order("relinquish", owner, label, move.epoch, owner=new))
            continue
        if health and label in ((health.get(owner) or {}).get("lost") or ()) and verdicts.get(owner) != DEAD_VERDICT:
            dead = {h for h, v in verdicts.items() if v == DEAD_VERDICT}
            got = handover(cfg, owners, owner, [label], health, dead, now, dwell_s)
            if got.moves:
                moves.append(got.moves[0])
                orders.extend(handover_orders(got.moves[0]))
                continue
        if not confirmed(owners, label) and now - float(entry.get("since") or 0) >= confirm_s:
            if entry.get("handover") and entry.get("previous") and entry["previous"] != owner:
                send(Order("relinquish", entry["previous"], label, epoch, owner=owner))
            send(
                Order(
                    "takeover",
                    owner,
                    label,
                    epoch,
                    previous=entry.get("previous"),
                    handover=bool(entry.get("handover")),
                )
            )
        if holdings is None:
            continue
        for host in sorted(holdings):
            if host != owner and (holdings[host] or {}).get(label):
                send(Order("relinquish", host, label, epoch, owner=owner))
        if epoch and confirmed(owners, label) and (holdings.get(owner) or {}).get(label) is False:
            send(Order("takeover", owner, label, epoch, previous=entry.get("previous")))
    return moves, orders


CUT_DWELL_S = 3.0  # a cut segment must be seen this long before its network moves
SUSPECT_S = 60.0  # after a down report the master refused (the suspect answers it): ask its witnesses


def segment_cuts(cfg, owners, verdicts, links):
    """Networks whose owner is cut off from the network's segment without losing carrier
    (a switch port that drops its frames, a VLAN removed upstream, a filter): the master
    sees the owner alive, so no down report moves it, but a strict majority of the other
    hosts carrying the network that answered (at least two) see it down, and a live
    standby among them is seen up by the rest. ``{label: (owner, standby, down, asked)}``.
    The runner moves such a network by handover once the cut has lasted ``CUT_DWELL_S``:
    the owner (alive, reachable) lets go first, the standby binds once the gateway is
    silent on its side. ``links``: {host: {peer: {ifname: "up" | "down"}}}, what each host
    that answered sees of its peers on each link (``host.link_states``): the owner is
    "down" on the network's bridge even while it answers on its uplink. Pure."""
    out = {}
    for label, net in sorted(cfg.networks.items()):
        if net.multi_host or not net.network_hosts:
            continue
        owner = owner_of(cfg, owners, label)
        if verdicts.get(owner) != ALIVE_VERDICT:
            continue  # a dead owner is the dead-owner rules' business

        def on_segment(w, peer, bridge=net.bridge):
            return ((links.get(w) or {}).get(peer) or {}).get(bridge)

        carriers = [
            h
            for h in sorted(cfg.hosts_carrying(label))
            if h != owner and on_segment(h, owner) is not None and verdicts.get(h) != DEAD_VERDICT
        ]
        down = [h for h in carriers if on_segment(h, owner) == DOWN]
        if len(carriers) < 2 or 2 * len(down) <= len(carriers):
            continue
        standbys = [
            h
            for h in net.network_hosts
            if h != owner
            and h in down
            and verdicts.get(h) == ALIVE_VERDICT
            and not any(on_segment(w, h) == DOWN for w in down if w != h)
        ]
        if standbys:
            out[label] = (owner, standbys[0], len(down), len(carriers))
    return out


def to_ask(cfg, owners, verdicts, audit, suspects=()):
    """The hosts the reconcile loop asks what they hold and see (``hanet.serving``): the
    network hosts when it is time for an ``audit``, and every live host carrying a
    network whose owner the master sees dead (its witnesses), or that was reported down
    while the master sees it alive (``suspects``: is it cut off from its segment?)."""
    dead = [
        label
        for label, n in cfg.networks.items()
        if not n.multi_host and n.network_hosts and verdicts.get(owner_of(cfg, owners, label)) == DEAD_VERDICT
    ]
    ask = set(watched_hosts(cfg)) if audit else set()
    ask |= {h for label in dead for h in cfg.hosts_carrying(label)}
    # an owner reported down that answers the master: is it cut off from a segment?
    cut = [label for label, n in cfg.networks.items() if not n.multi_host and owner_of(cfg, owners, label) in suspects]
    ask |= {h for label in cut for h in cfg.hosts_carrying(label)}
    return {h for h in ask if verdicts.get(h) != DEAD_VERDICT}


def still_valid(cfg, owners, move):
    """Whether ``move`` (decided on an earlier copy of the record) still applies to it."""
    return owner_of(cfg, owners, move.network) == move.previous and epoch_of(owners, move.network) + 1 == move.epoch


ALIVE_VERDICT, DEAD_VERDICT = "alive", "dead"
