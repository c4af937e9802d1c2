"""The sysctl applier: ``current(keys)``, ``plan(desired, current)`` (pure) and
``apply(changes)``, writing ``/proc/sys``.

Desired sysctls are ``(key, value)`` tuples such as ``("net.ipv4.ip_forward", "1")``.
``net.*`` keys are per network namespace: ``/proc/sys/net`` shows the namespace of the
process that opens it, so the minion (running in the host's namespace) sets the host's
values, and a test running inside its own namespace sets only that namespace's.

Keys may name links (``net.ipv4.conf.br100.forwarding``) that exist only after
``links.apply``: ``current`` reports them as ``None`` and ``plan`` still plans them.
Interface names containing dots are handled for ``net.ipv{4,6}.{conf,neigh}.<if>.<key>``.

Change vocabulary: ``Change("sysctls", "set", key, {"value": new, "old": old_or_None})``.
"""

from __future__ import annotations

import os

from .common import Change

FACET = "sysctls"
PROC_SYS = "/proc/sys"
_PER_INTERFACE = ("net.ipv4.conf.", "net.ipv6.conf.", "net.ipv4.neigh.", "net.ipv6.neigh.")


class SysctlError(RuntimeError):
    pass


def path_of(key, root=PROC_SYS):
    """The /proc/sys file of ``key`` (dots are separators, except inside an interface
    name of a per-interface key; a key written with slashes is taken as is)."""
    if "/" in key:
        rel = key.strip("/")
    else:
        for prefix in _PER_INTERFACE:
            if key.startswith(prefix) and key.count(".") > 4:
                ifname, _, leaf = key[len(prefix) :].rpartition(".")
                rel = "/".join(prefix.rstrip(".").split(".") + [ifname, leaf])
                break
        else:
            rel = key.replace(".", "/")
    return os.path.join(root, rel)


def normalize(value):
    """Compare values as sysctl(8) does: whitespace-separated fields."""
    if value is None:
        return None
    return " ".join(str(value).split())


def current(keys, root=PROC_SYS):
    """``((key, value-or-None), ...)`` in the order of ``keys`` (None: no such key now)."""
    out = []
    for key in keys:
        try:
            with open(path_of(key, root), encoding="ascii") as fh:
                out.append((key, normalize(fh.read())))
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            out.append((key, None))
    return tuple(out)


def plan(desired, current):
    """The ``set`` Changes for every desired key whose current value differs (pure)."""
    have = dict(current)
    changes = []
    seen = set()
    for key, value in desired:
        if key in seen:
            continue
        seen.add(key)
        want = normalize(value)
        old = have.get(key)
        if normalize(old) != want:
            changes.append(Change(FACET, "set", key, {"value": want, "old": old}))
    return changes


def apply(changes, root=PROC_SYS):
    """Write the planned values; return descriptions. Raises ``SysctlError`` naming the key
    when one cannot be written (e.g. the link in the key does not exist)."""
    done = []
    for change in changes:
        if change.facet != FACET:
            continue
        key, value = change.target, change.detail["value"]
        path = path_of(key, root)
        try:
            with open(path, encoding="ascii") as fh:
                if normalize(fh.read()) == normalize(value):
                    continue
            with open(path, "w", encoding="ascii") as fh:
                fh.write(f"{value}\n")
        except OSError as exc:
            raise SysctlError(f"cannot set {key} = {value}: {exc.strerror or exc}") from exc
        done.append(f"set {key} = {value}")
    return done
