"""ext_pillar ``hanet_owners``: the master's failover record, as pillar.

Every minion gets ``hanet_owners: {network: {owner, epoch, since, reason}}``, read from the record the
hanet runner keeps durably: on the master (``<cachedir>/hanet/owners.json``, see
``_hanet/failover.py``), or in etcd when the master option ``hanet_record`` says so
(``_hanet/record.py``; every master then serves the same record). A host's highstate,
and so its start-up, consults it before binding a gateway: a host that was down while
its network moved comes back as the standby. A record that cannot be read (torn, etcd
unreachable or without quorum) fails the pillar compile loudly rather than letting
hosts fall back to the pillar's first network hosts.

Master configuration (``pillar_dirs`` pointing at the checkout's ``_pillar``, or
``saltutil.sync_all`` / ``salt-run saltutil.sync_pillar`` and a master restart)::

    ext_pillar:
      - hanet_owners: {}
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # Salt's loader injects these
    __opts__: dict = {}

__virtualname__ = "hanet_owners"


def __virtual__():
    return __virtualname__


def _lib(name):
    """The ``_hanet.<name>`` library module, found where Salt modules find it: beside
    the directory this module was loaded from (a checkout's ``_modules``, a master's
    synced ``extmods/modules``), or in ``<extension_modules>/modules``."""
    up = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for cand in (
        os.path.join(up, "_modules"),
        os.path.join(up, "modules"),
        os.path.join(__opts__["extension_modules"], "modules"),
    ):
        if os.path.isdir(os.path.join(cand, "_hanet")):
            if cand not in sys.path:
                sys.path.append(cand)
            break
    return importlib.import_module(f"_hanet.{name}")


def ext_pillar(minion_id, pillar, *args, **kwargs):  # pylint: disable=unused-argument
    return {"hanet_owners": _lib("record").read_owners(__opts__)}
