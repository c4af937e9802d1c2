"""Fixtures for tests that run in the namespace lab (lab/hanet_lab).

- ``lab``: one lab per test module, built from the module's ``lab_topology`` fixture
  (default: :func:`hanet_lab.default_topology`, 1 master + 4 hosts + router + VMs).
  Override it in a module::

      @pytest.fixture(scope="module")
      def lab_topology():
          return default_topology(hosts=2)

  With ``HANET_LAB_PREFIX=hl-xxxxxx`` in the environment, ``lab`` attaches to that
  running lab (``./dev lab up``) instead of building one, and leaves it running.
- ``lab_factory``: ``lab_factory(topology=None, **Lab_kwargs)`` builds more labs; all
  are torn down at the end of the module.

Before the first lab of a session, labs left by killed runs (owner process gone) and
leftovers without a state file are swept (``hanet_lab down --stale``).
"""

import os

import pytest


@pytest.fixture(scope="session")
def lab_sweep():
    from hanet_lab import state, unavailable_reason

    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)

    state.sweep("stale")


@pytest.fixture(scope="module")
def lab_factory(lab_sweep):
    from hanet_lab import Lab

    labs = []

    def make(topology=None, **kwargs):
        lab = Lab(topology, **kwargs)
        labs.append(lab)
        return lab.up()

    yield make
    for lab in reversed(labs):
        lab.down()


@pytest.fixture(scope="module")
def lab_topology():
    from hanet_lab import default_topology

    return default_topology()


@pytest.fixture(scope="module")
def lab(request, lab_topology):
    from hanet_lab import Lab

    prefix = os.environ.get("HANET_LAB_PREFIX")
    if prefix:
        request.getfixturevalue("lab_sweep")
        yield Lab.attach(prefix)
        return
    yield request.getfixturevalue("lab_factory")(lab_topology)


@pytest.fixture
def ns_pair():
    """Two network namespaces joined by a veth (eth0 in each: 10.9.0.1/24 and
    10.9.0.2/24), removed afterwards whatever happens."""
    import subprocess
    import uuid

    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")

    def sh(*args):
        subprocess.run(args, check=True, capture_output=True)

    tag = uuid.uuid4().hex[:6]
    a, b = f"hnp-{tag}-a", f"hnp-{tag}-b"
    sh("ip", "netns", "add", a)
    sh("ip", "netns", "add", b)
    try:
        sh("ip", "-n", a, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", b)
        for ns, addr in ((a, "10.9.0.1/24"), (b, "10.9.0.2/24")):
            sh("ip", "-n", ns, "addr", "add", addr, "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield a, b
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
