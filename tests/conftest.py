"""Shared test configuration.

Tests marked ``lab`` need root (network namespaces, netlink, nftables) and the lab's
tools; without them they are skipped with the reason, instead of failing.
"""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# `./dev test` sets PYTHONPATH=lab:_modules; make a bare `pytest` run work the same way.
for sub in ("lab", "_modules"):
    path = os.path.join(ROOT, sub)
    if path not in sys.path:
        sys.path.insert(0, path)


def pytest_sessionstart(session):  # pylint: disable=unused-argument
    """Salt installs a handler when it is imported that holds log records back and writes
    them to stderr at exit, after pytest has closed it ("--- Logging error --- I/O
    operation on closed file" after the summary). Hand them to pytest's logging instead."""
    try:
        import salt._logging
    except ImportError:
        return
    salt._logging.shutdown_temp_handler()


def pytest_collection_modifyitems(config, items):
    try:
        from hanet_lab import unavailable_reason

        reason = unavailable_reason()
    except ImportError as err:  # the lab's own requirements are missing
        reason = f"the lab cannot load: {err}"
    if not reason:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "lab" in item.keywords:
            item.add_marker(skip)
