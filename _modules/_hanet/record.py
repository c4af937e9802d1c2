"""Where the failover record (the owner and epoch of each network) lives: its backends,
chosen by the master option ``hanet_record``.

- ``file`` (no ``hanet_record`` option: one master, nothing to install):
  ``<cachedir>/hanet/owners.json``, written durably under a lock (``failover.Record``).
- ``etcd``: one key per network in an etcd v3 cluster (etcd >= 3.4, its HTTP/JSON
  gateway), ``<prefix>owners/<network>`` = the entry as JSON (the same entry as
  owners.json: ``{owner, epoch, since, reason, previous, confirmed}``), so that several
  masters read and write one record. A save changes only what this decision changed, in
  one transaction that compares each changed key's ``mod_revision`` with the one read
  (``create_revision == 0`` for a key that did not exist): when another master wrote
  first the transaction fails and ``RecordConflict`` is raised; the caller reads again
  and decides again (``attempts``), so two masters deciding one report make one epoch
  step and the loser adopts the winner's. Every read is linearizable (a member cut off
  from its quorum cannot serve an old record). An etcd the master cannot reach (every
  endpoint down, quorum lost, no answer within ``timeout``) raises
  ``RecordUnavailable`` after at most ``timeout`` seconds over all endpoints: no decision
  is made and nothing is written (fail static).

  The nonces of the reports this master handled (replay protection, and the dedupe of
  the reactor and engine paths on one master) stay in the master's own
  ``<cachedir>/hanet/seen.json``, under the same local lock as with the file backend:
  they are per master by nature (each master gets each report), and two masters that
  both act on one report are kept to one decision by the compare-and-swap.

Configuration (master config)::

    hanet_record:
      backend: etcd                    # or file (the default)
      endpoints: [http://192.0.2.21:2379, http://192.0.2.22:2379, http://192.0.2.23:2379]
      prefix: /hanet/                  # every key hanet writes starts with it
      timeout: 2                       # seconds, for one read or one save, all endpoints
      ca_cert: /etc/hanet/etcd-ca.pem  # https endpoints: the CA that signed etcd's cert
      cert_cert: /etc/hanet/etcd-client.pem   # client certificate (with cert_key)
      cert_key: /etc/hanet/etcd-client.key
      user: hanet                      # etcd authentication (with password)
      password: ...

The interface (the runner, the ext_pillar)::

    with record.open(opts) as rec:       # reads the record; RecordError: no decision
        rec.owners                        # {network: entry}, changed in place
        rec.handle(nonce, via, now)       # the local nonce check (failover.Record.handle)
        rec.record(moves, now, reason)    # failover.record_move each, then save
        rec.save()                        # etcd: RecordConflict when another master wrote first
    record.read_owners(opts)              # {network: entry}, no lock

    for attempt in record.attempts(opts):  # a fresh read and decision after a conflict
        with attempt as rec:
            ...

The client is etcd3gw (OpenStack's etcd v3 client over etcd's HTTP/JSON gateway):
docs/record.md says why.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Optional
from urllib.parse import urlsplit

from . import failover

OPTION = "hanet_record"
BACKENDS = ("file", "etcd")
ETCD_KEYS = ("endpoints", "prefix", "timeout", "ca_cert", "cert_cert", "cert_key", "user", "password")
DEFAULT_PREFIX = "/hanet/"
DEFAULT_TIMEOUT = 2.0
MAX_TIMEOUT = 60.0
CONFLICT_TRIES = 3  # reads and decisions after a RecordConflict before giving up
API_PATH = "/v3/"  # etcd >= 3.4's gateway (3.3 had /v3beta/)


class RecordConfigError(failover.RecordError):
    """The ``hanet_record`` option is wrong: no record can be read, no decision made."""


class RecordUnavailable(failover.RecordError):
    """The record's store cannot be reached or cannot answer now (every etcd endpoint
    down, quorum lost, no answer in time): no decision is made, nothing is written."""


class RecordConflict(failover.RecordError):
    """Another master changed the record since this decision read it: nothing of this
    decision was written; read again and decide again. ``current``: {network: entry or
    None} as the store holds them now."""

    def __init__(self, message, current=None):
        super().__init__(message)
        self.current = current or {}


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Config:
    backend: str = "file"
    endpoints: tuple = ()
    prefix: str = DEFAULT_PREFIX
    timeout: float = DEFAULT_TIMEOUT
    ca_cert: Optional[str] = None
    cert_cert: Optional[str] = None
    cert_key: Optional[str] = None
    user: Optional[str] = None
    password: Optional[str] = field(default=None, repr=False)

    def describe(self, cachedir=None):
        if self.backend == "etcd":
            return f"etcd {', '.join(self.endpoints)} (prefix {self.prefix})"
        where = os.path.join(failover.record_dir(cachedir), failover.RECORD_FILE) if cachedir else "owners.json"
        return f"file {where}"


def _path_problem(key, value, problems):
    if not isinstance(value, str) or not value:
        problems.append(f"{OPTION}.{key}: must be a file path, not {value!r}")
    elif not os.path.isfile(value):
        problems.append(f"{OPTION}.{key}: {value}: no such file")


def config(opts):
    """The validated ``hanet_record`` option of ``opts`` (a master's config) as a
    Config; absent or empty: the file backend. Raises RecordConfigError listing every
    problem, each named ``hanet_record.<key>``."""
    raw = (opts or {}).get(OPTION)
    if raw is None or raw == {}:
        return Config()
    if not isinstance(raw, dict):
        raise RecordConfigError(
            f"{OPTION}: must be a mapping such as {{backend: etcd, endpoints: "
            f"[http://192.0.2.21:2379]}}, not {type(raw).__name__} {raw!r}"
        )
    problems = []
    backend = raw.get("backend", "file")
    if backend not in BACKENDS:
        problems.append(f"{OPTION}.backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    for key in sorted(k for k in raw if k != "backend" and k not in ETCD_KEYS):
        problems.append(f"{OPTION}.{key}: unknown option (known: backend, {', '.join(ETCD_KEYS)})")
    if backend == "file":
        for key in sorted(k for k in raw if k in ETCD_KEYS):
            problems.append(f"{OPTION}.{key}: only for backend etcd (backend is file)")
    if backend != "etcd" or problems:
        if problems:
            raise RecordConfigError(_problems(problems))
        return Config()

    endpoints = raw.get("endpoints")
    if isinstance(endpoints, str):
        endpoints = [endpoints]
    if not isinstance(endpoints, (list, tuple)) or not endpoints:
        problems.append(
            f"{OPTION}.endpoints: a list of etcd client URLs (http://host:2379) is "
            f"needed for backend etcd, not {endpoints!r}"
        )
        endpoints = []
    norm = []
    for i, url in enumerate(endpoints):
        why = _endpoint_problem(url)
        if why:
            problems.append(f"{OPTION}.endpoints.{i}: {why}")
        else:
            norm.append(url.rstrip("/"))
    if len(set(norm)) != len(norm):
        problems.append(f"{OPTION}.endpoints: an endpoint is named twice")

    prefix = raw.get("prefix", DEFAULT_PREFIX)
    if not isinstance(prefix, str) or not prefix or not prefix.isascii() or not prefix.isprintable():
        problems.append(
            f"{OPTION}.prefix: must be a non-empty printable ASCII string such as {DEFAULT_PREFIX}, not {prefix!r}"
        )
        prefix = DEFAULT_PREFIX
    elif not prefix.endswith("/"):
        prefix += "/"

    timeout = raw.get("timeout", DEFAULT_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= MAX_TIMEOUT:
        problems.append(f"{OPTION}.timeout: must be a number of seconds in (0, {MAX_TIMEOUT:g}], not {timeout!r}")
        timeout = DEFAULT_TIMEOUT

    for key in ("ca_cert", "cert_cert", "cert_key"):
        if raw.get(key) is not None:
            _path_problem(key, raw[key], problems)
    if (raw.get("cert_cert") is None) != (raw.get("cert_key") is None):
        missing = "cert_key" if raw.get("cert_key") is None else "cert_cert"
        problems.append(
            f"{OPTION}.{missing}: needed with "
            f"{'cert_cert' if missing == 'cert_key' else 'cert_key'} (a client "
            "certificate and its key)"
        )
    tls = [k for k in ("ca_cert", "cert_cert", "cert_key") if raw.get(k) is not None]
    if tls and norm and not any(u.startswith("https://") for u in norm):
        problems.append(f"{OPTION}.{tls[0]}: set, but no endpoint is https://")

    for key in ("user", "password"):
        if raw.get(key) is not None and (not isinstance(raw[key], str) or not raw[key]):
            problems.append(f"{OPTION}.{key}: must be a non-empty string")
    if (raw.get("user") is None) != (raw.get("password") is None):
        missing = "password" if raw.get("password") is None else "user"
        problems.append(f"{OPTION}.{missing}: needed with {'user' if missing == 'password' else 'password'}")

    if problems:
        raise RecordConfigError(_problems(problems))
    return Config(
        backend="etcd",
        endpoints=tuple(norm),
        prefix=prefix,
        timeout=float(timeout),
        ca_cert=raw.get("ca_cert"),
        cert_cert=raw.get("cert_cert"),
        cert_key=raw.get("cert_key"),
        user=raw.get("user"),
        password=raw.get("password"),
    )


def _problems(problems):
    if len(problems) == 1:
        return f"{problems[0]}; no decision is made"
    return f"{OPTION} has {len(problems)} problems; no decision is made:\n  " + "\n  ".join(problems)


def _endpoint_problem(url):
    if not isinstance(url, str):
        return f"must be a URL such as http://192.0.2.21:2379, not {url!r}"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as err:
        return f"{url!r} is not a URL ({err})"
    if parts.scheme not in ("http", "https"):
        return f"{url!r}: the scheme must be http or https"
    if not parts.hostname:
        return f"{url!r} names no host"
    if port is None:
        return f"{url!r} names no port (etcd's client port is usually 2379)"
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        return f"{url!r}: only scheme://host:port (no path, query or user)"
    return None


# --------------------------------------------------------------------------- the interface


def open(opts, seed=None):  # pylint: disable=redefined-builtin  (record.open(opts), like a file)
    """The record of the master whose config is ``opts``, as a context manager that
    reads it on entry (file: ``failover.Record`` under ``<cachedir>/hanet``; etcd:
    ``EtcdRecord``). Raises RecordConfigError for a bad ``hanet_record``. ``seed``: what
    an earlier open of this decision read (``seed_of``): etcd takes it instead of
    reading again (one round trip less; the compare-and-swap still catches a change
    since, as a RecordConflict); the file, read under its lock, ignores it."""
    cfg = config(opts)
    if cfg.backend == "etcd":
        return EtcdRecord(cfg, opts["cachedir"], seed=seed)
    return failover.Record(opts["cachedir"])


def seed_of(rec):
    """What ``rec`` (an opened record) read, to seed the next open of the same decision."""
    return rec.seed() if isinstance(rec, EtcdRecord) else None


def read_owners(opts):
    """The record's owners ({network: entry}), without the local lock."""
    cfg = config(opts)
    if cfg.backend == "etcd":
        owners, _ = EtcdStore(cfg).read_owners()
        return owners
    return failover.read_owners(opts["cachedir"])


def describe(opts):
    """Where the record lives, for status: "file <path>" or "etcd <endpoints>"."""
    return config(opts).describe(opts.get("cachedir"))


class Attempt:
    """One read-and-decide of ``attempts``: ``with attempt as rec`` opens the record; a
    RecordConflict raised in the block ends it quietly when another attempt follows."""

    def __init__(self, opts, number, last, seed=None):
        self.opts, self.number, self.last, self.seed = opts, number, last, seed
        self.conflict = None
        self._rec = None

    def __enter__(self):
        self._rec = open(self.opts, seed=self.seed)
        return self._rec.__enter__()

    def __exit__(self, exc_type, exc, tb):
        self._rec.__exit__(exc_type, exc, tb)
        if exc_type is not None and issubclass(exc_type, RecordConflict) and not self.last:
            self.conflict = exc
            return True
        return False


def attempts(opts, tries=CONFLICT_TRIES, seed=None):
    """Yield up to ``tries`` Attempts: the next only when the one before ended in a
    RecordConflict (another master wrote first), so the block reads the record again
    and decides again. The last attempt's conflict propagates. ``attempt.number`` > 0:
    this decision lost a race before (its record now has the winner's). ``seed``
    (``seed_of``): the first attempt uses that read; the others read afresh."""
    for number in range(tries):
        attempt = Attempt(opts, number, number == tries - 1, seed if number == 0 else None)
        yield attempt
        if attempt.conflict is None:
            return


# --------------------------------------------------------------------------- entries and transactions


def owners_key(prefix, network):
    return f"{prefix}owners/{network}"


def encode_entry(entry):
    """A record entry as the value etcd keeps (compact JSON, sorted keys)."""
    return json.dumps(entry, sort_keys=True, separators=(",", ":"))


def decode_entry(key, value):
    """The entry etcd keeps at ``key``; RecordError when it is not one (never guessed)."""
    try:
        entry = json.loads(value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else value)
    except (ValueError, UnicodeDecodeError) as err:
        raise failover.RecordError(
            f"the failover record's key {key} in etcd is not JSON ({err}); restore it or delete it deliberately"
        ) from err
    if (
        not isinstance(entry, dict)
        or not isinstance(entry.get("owner"), str)
        or isinstance(entry.get("epoch"), bool)
        or not isinstance(entry.get("epoch"), int)
    ):
        raise failover.RecordError(
            f"the failover record's key {key} in etcd is not an entry "
            f"{{owner, epoch, ...}}: {entry!r}; restore it or delete it deliberately"
        )
    return entry


@dataclass(frozen=True)
class Change:
    """One network's change in a save: ``value`` the new entry's encoding (None: delete),
    ``mod_revision`` the key's revision when read (0: it did not exist)."""

    network: str
    value: Optional[str]
    mod_revision: int


def changes(read, owners):
    """The Changes that make the store hold ``owners``, given what was read: ``read``
    {network: (entry, mod_revision)}. Unchanged networks are left out (a save compares
    and writes only what this decision changed). Pure."""
    out = []
    for net in sorted(set(read) | set(owners)):
        old = read.get(net)
        new = owners.get(net)
        if old is not None and new == old[0]:
            continue
        if old is None and new is None:
            continue
        out.append(Change(net, None if new is None else encode_entry(new), old[1] if old else 0))
    return out


def _b64(text):
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def txn_payload(prefix, chg):
    """The etcd v3 transaction (JSON gateway form) that applies ``chg`` (Changes) only if
    no changed key moved since it was read: compare each key's mod_revision with the one
    read (create_revision == 0 for a key that did not exist); on success put or delete
    each; on failure read each back (so the caller sees the winner). Pure."""
    compare, success, failure = [], [], []
    for c in chg:
        key = _b64(owners_key(prefix, c.network))
        if c.mod_revision:
            compare.append({"key": key, "result": "EQUAL", "target": "MOD", "mod_revision": str(c.mod_revision)})
        else:
            compare.append({"key": key, "result": "EQUAL", "target": "CREATE", "create_revision": "0"})
        if c.value is None:
            success.append({"request_delete_range": {"key": key}})
        else:
            success.append({"request_put": {"key": key, "value": _b64(c.value)}})
        failure.append({"request_range": {"key": key}})
    return {"compare": compare, "success": success, "failure": failure}


def _range_end(prefix):
    b = bytearray(prefix.encode("ascii"))
    b[-1] += 1
    return bytes(b).decode("ascii")


# --------------------------------------------------------------------------- etcd


_LOCAL = threading.local()  # per thread: {(config, endpoint, pid): etcd3gw client}
_PREFERRED: dict = {}  # config -> the endpoint that answered last


def _cause(err, timeout):
    """A short reason for one endpoint's failure."""
    import requests

    try:
        from etcd3gw import exceptions as ex
    except ImportError:  # pragma: no cover
        ex = None
    timed_out = isinstance(err, requests.exceptions.Timeout) or (
        ex is not None and isinstance(err, ex.ConnectionTimeoutError)
    )
    if timed_out:
        text = getattr(err, "detail_text", "") or str(err)
        if text.lstrip().startswith("{"):
            return _etcd_message(text)
        return f"no answer within {timeout:.2f} s"
    text = getattr(err, "detail_text", None) or str(err) or type(err).__name__
    if text.lstrip().startswith("{"):
        return _etcd_message(text)
    for mark, short in (
        ("Connection refused", "connection refused"),
        ("No route to host", "no route to host"),
        ("Network is unreachable", "network unreachable"),
        ("Name or service not known", "unknown host"),
        ("CERTIFICATE_VERIFY_FAILED", "TLS: certificate verify failed"),
        ("SSLError", "TLS error"),
    ):
        if mark in text:
            return short
    return " ".join(text.split())[:200]


def _etcd_message(text):
    try:
        data = json.loads(text)
        return str(data.get("message") or data.get("error") or text)[:200]
    except ValueError:
        return " ".join(text.split())[:200]


class _Refused(Exception):
    """etcd answered, and refused (authentication, permission, a bad request): trying
    another endpoint would not help."""


class EtcdStore:
    """The record's etcd calls, each over every endpoint within one ``timeout``: the
    endpoint that answered last is asked first, and each next one gets a share of
    what is left (a member that hangs, cut off from its quorum, cannot use it all)."""

    def __init__(self, cfg):
        self.cfg = cfg

    def _client(self, endpoint):
        import requests
        from etcd3gw.client import Etcd3Client

        cache = getattr(_LOCAL, "clients", None)
        if cache is None:
            cache = _LOCAL.clients = {}
        key = (self.cfg, endpoint, os.getpid())  # a forked child makes its own connections
        client = cache.get(key)
        if client is None:
            parts = urlsplit(endpoint)
            session = requests.Session()
            if self.cfg.ca_cert:
                session.verify = self.cfg.ca_cert
            if self.cfg.cert_cert:
                session.cert = (self.cfg.cert_cert, self.cfg.cert_key)
            client = Etcd3Client(
                host=parts.hostname,
                port=parts.port,
                protocol=parts.scheme,
                api_path=API_PATH,
                session=session,
                timeout=self.cfg.timeout,
            )
            cache[key] = client
        return client

    def _authenticate(self, client):
        got = client.post(
            client.get_url("/auth/authenticate"), json={"name": self.cfg.user, "password": self.cfg.password}
        )
        token = (got or {}).get("token")
        if not token:
            raise _Refused(f"etcd gave user {self.cfg.user} no token")
        client.session.headers["Authorization"] = token

    def _once(self, client, fn):
        """``fn(client)`` with authentication (again, when the token expired)."""
        from etcd3gw import exceptions as ex

        if self.cfg.user and "Authorization" not in client.session.headers:
            self._authenticate_or_refuse(client)
        try:
            return fn(client)
        except (ex.ConnectionFailedError, ex.ConnectionTimeoutError, ex.InternalServerError):
            raise
        except ex.Etcd3Exception as err:
            msg = _etcd_message(getattr(err, "detail_text", "") or "") or str(err)
            if self.cfg.user and "auth token" in msg:  # expired or revoked: once more
                client.session.headers.pop("Authorization", None)
                self._authenticate_or_refuse(client)
                return fn(client)
            raise _Refused(msg) from err

    def _authenticate_or_refuse(self, client):
        from etcd3gw import exceptions as ex

        try:
            self._authenticate(client)
        except (ex.ConnectionFailedError, ex.ConnectionTimeoutError, ex.InternalServerError):
            raise
        except ex.Etcd3Exception as err:
            msg = _etcd_message(getattr(err, "detail_text", "") or "") or str(err)
            raise _Refused(f"authentication as {self.cfg.user} failed: {msg}") from err

    def call(self, what, fn):
        """``fn(client)`` on the first endpoint that answers within the deadline.
        RecordUnavailable names every endpoint and why it failed; RecordError when etcd
        refused (authentication, permission)."""
        import requests

        eps = list(self.cfg.endpoints)
        first = _PREFERRED.get(self.cfg)
        if first in eps:
            eps.remove(first)
            eps.insert(0, first)
        deadline = time.monotonic() + self.cfg.timeout
        causes = []
        for i, ep in enumerate(eps):
            left = deadline - time.monotonic()
            if left <= 0.01:
                causes.append(f"{ep}: not tried (the {self.cfg.timeout:g} s timeout ran out)")
                continue
            share = left / min(2, len(eps) - i)
            client = self._client(ep)
            client.timeout = share
            try:
                got = self._once(client, fn)
            except _Refused as err:
                raise failover.RecordError(f"etcd at {ep} refused to {what}: {err}") from err
            except (requests.RequestException, ValueError, OSError) as err:
                causes.append(f"{ep}: {_cause(err, share)}")
                continue
            except Exception as err:  # pylint: disable=broad-except  (etcd3gw's errors: try the next)
                causes.append(f"{ep}: {_cause(err, share)}")
                continue
            _PREFERRED[self.cfg] = ep
            return got
        raise RecordUnavailable(f"etcd cannot {what} (no decision is made, nothing is written): " + "; ".join(causes))

    def read_owners(self):
        """({network: entry}, {network: (entry, mod_revision)}), read linearizably."""
        prefix = owners_key(self.cfg.prefix, "")

        def get(client):
            return client.get(prefix.encode("ascii"), metadata=True, range_end=_range_end(prefix))

        got = self.call("read the record", get)
        owners, read = {}, {}
        for value, meta in got:
            key = meta["key"].decode("utf-8", "replace")
            net = key[len(prefix) :]
            entry = decode_entry(key, value)
            owners[net] = entry
            read[net] = (copy.deepcopy(entry), int(meta.get("mod_revision", 0)))
        return owners, read

    def transact(self, chg):
        """Apply ``chg`` by compare-and-swap. Returns {network: its key's mod_revision
        now}; raises RecordConflict (with what the store holds) when a key moved since
        it was read."""
        payload = txn_payload(self.cfg.prefix, chg)
        got = self.call("save the record", lambda client: client.transaction(payload))
        if got.get("succeeded"):  # the gateway leaves out a false "succeeded"
            revision = int((got.get("header") or {}).get("revision", 0))
            return {c.network: revision for c in chg}
        current, revs = {}, {}
        for c, resp in zip(chg, got.get("responses") or []):
            kvs = ((resp or {}).get("response_range") or {}).get("kvs") or []
            key = owners_key(self.cfg.prefix, c.network)
            current[c.network] = decode_entry(key, base64.b64decode(kvs[0].get("value", ""))) if kvs else None
            revs[c.network] = int(kvs[0].get("mod_revision", 0)) if kvs else 0
        ours = all(
            (current.get(c.network) is None) if c.value is None else current.get(c.network) == json.loads(c.value)
            for c in chg
        )
        if ours and len(current) == len(chg):
            # what we meant to write is there already: an earlier try of this same save
            # that timed out on another endpoint had gone through (or the same change
            # made elsewhere); nothing to undo, nothing lost
            return revs
        moved = ", ".join(
            f"{c.network} (now {_brief(current.get(c.network))})"
            for c in chg
            if current.get(c.network) != (None if c.value is None else json.loads(c.value))
        )
        raise RecordConflict(f"the record changed since it was read (another master decided): {moved}", current)


def _brief(entry):
    if not entry:
        return "absent"
    return f"{entry.get('owner')} at epoch {entry.get('epoch')}"


class EtcdRecord(failover.Record):
    """The record in etcd, held for one decision. The local lock (``owners.lock``) and
    the handled nonces (``seen.json``) are the master's own, in ``<cachedir>/hanet``
    as with the file backend; the owners are read from etcd on entry and saved by
    compare-and-swap (``save``)."""

    backend = "etcd"

    def __init__(self, cfg, cachedir, seed=None):
        super().__init__(cachedir)
        self.cfg = cfg
        self.store = EtcdStore(cfg)
        self._read = {}
        self._seed = seed

    def _load(self):
        if self._seed is not None and self._seed[0] == self.cfg:
            self._read = copy.deepcopy(self._seed[1])
            owners = {net: copy.deepcopy(entry) for net, (entry, _) in self._read.items()}
        else:
            owners, self._read = self.store.read_owners()
        self._seed = None
        return {"owners": owners}

    def seed(self):
        """(config, {network: (entry, mod_revision)}) as read, for ``open(seed=)``."""
        return (self.cfg, copy.deepcopy(self._read))

    def save(self):
        """Write what changed since the record was read, in one compare-and-swap
        transaction. RecordConflict: another master changed one of those networks
        first, nothing was written; RecordUnavailable: etcd could not be reached."""
        chg = changes(self._read, self.owners)
        if not chg:
            return
        revs = self.store.transact(chg)
        for c in chg:
            if c.value is None:
                self._read.pop(c.network, None)
            else:
                self._read[c.network] = (json.loads(c.value), revs[c.network])
