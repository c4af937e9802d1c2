"""ext_pillar ``hanet_owners``: the master's failover record, as pillar.

Every minion gets ``hanet_owners: {network: {owner, epoch}}``, read from the record the
hanet runner keeps durably on the master (``<cachedir>/hanet/owners.json``). A host's
highstate, and so its start-up, consults it before binding a gateway: a host that was
down while its network moved comes back as the standby.

Master configuration (``saltutil.sync_all`` / ``salt-run saltutil.sync_pillar`` brings the
module over)::

    ext_pillar:
      - hanet_owners: {}
"""
import json
import os

__virtualname__ = "hanet_owners"


def __virtual__():
    return __virtualname__


def record_path(opts):
    return os.path.join(opts["cachedir"], "hanet", "owners.json")


def ext_pillar(minion_id, pillar, *args, **kwargs):  # pylint: disable=unused-argument
    try:
        with open(record_path(__opts__), encoding="utf-8") as fh:  # noqa: F821
            record = json.load(fh)
    except (FileNotFoundError, ValueError):
        record = {}
    return {"hanet_owners": record.get("owners", {})}
