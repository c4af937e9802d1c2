"""Network namespaces for the unit tests that check an applier against the real kernel
(never the root namespace's links or ruleset)."""

import contextlib
import ctypes
import os
import random
import subprocess

libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def sh(*args, check=True, **kw):
    return subprocess.run(args, check=check, capture_output=True, text=True, **kw)


@contextlib.contextmanager
def inside(ns):
    """Run this thread (the commands and the threads it starts) in network namespace ``ns``."""
    with open("/proc/self/ns/net") as home, open(f"/run/netns/{ns}") as target:
        if libc.setns(target.fileno(), CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        try:
            yield
        finally:
            if libc.setns(home.fileno(), CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")


@contextlib.contextmanager
def fresh(prefix):
    """A new network namespace named ``<prefix>-<pid>-<random>``, deleted afterwards."""
    name = f"{prefix}-{os.getpid()}-{random.randrange(16**6):06x}"
    sh("ip", "netns", "add", name)
    try:
        yield name
    finally:
        sh("ip", "netns", "del", name, check=False)
