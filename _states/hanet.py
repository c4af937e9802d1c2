"""hanet states: make this host what the ``hanet`` pillar says, one facet at a time.

Each state reads the host's current state, compares it with the desired state computed
from the pillar, reports what would change under ``test=True``, and otherwise makes
exactly those changes and reports them. Removing something from the pillar removes it
from the host at the next apply. A pillar with problems fails ``hanet.validated`` with
every problem and its pillar path, and every other hanet state refuses to act.

The ``hanet`` SLS (``salt://hanet/init.sls``) applies them all in order. Each is also
usable on its own in a user's SLS; ``pillar`` may name another pillar key to read
(default: ``hanet``).

.. code-block:: yaml

    hanet-pillar:
      hanet.validated: []

    hanet-links:              # bridges, VLAN/VXLAN links, the host's addresses on them
      hanet.links:
        - require:
          - hanet: hanet-pillar

    hanet-sysctls:            # net.ipv4.ip_forward where this host forwards
      hanet.sysctls:
        - require:
          - hanet: hanet-links

    hanet-ruleset:            # SNAT, metadata DNAT/REDIRECT, forward, anti-spoofing
      hanet.ruleset:
        - require:
          - hanet: hanet-links

    hanet-floating:           # floating IPs as /32 on the public interface, GARPed
      hanet.floating_ips:
        - require:
          - hanet: hanet-ruleset

    hanet-conntrackd:         # conntrackd on network hosts (ha:conntrack_sync)
      hanet.conntrackd:
        - require:
          - hanet: hanet-ruleset

    hanet-dnsmasq:            # one dnsmasq per served network
      hanet.dnsmasq:
        - require:
          - hanet: hanet-ruleset

    hanet-metadata:           # the local metadata service (metadata_host 127.0.0.1)
      hanet.metadata:
        - require:
          - hanet: hanet-ruleset
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # Salt's loader injects these
    __opts__: dict = {}
    __salt__: dict = {}

__virtualname__ = "hanet"


def __virtual__():
    if "hanet.apply_facet" in __salt__:
        return __virtualname__
    return False, "the hanet execution module is not available (saltutil.sync_all?)"


def _pillar(pillar_key):
    if pillar_key == "hanet":
        return None  # the execution module reads this minion's own hanet pillar
    return __salt__["pillar.get"](pillar_key, {})


def validated(name, pillar_key="hanet"):
    """Succeed when the hanet pillar is valid; fail listing every problem with its path.

    .. code-block:: yaml

        hanet-pillar:
          hanet.validated: []
    """
    ret = {"name": name, "changes": {}, "result": True, "comment": ""}
    res = __salt__["hanet.validate"](_pillar(pillar_key))
    if res["valid"]:
        ret["comment"] = "The hanet pillar is valid."
    else:
        ret["result"] = False
        ret["comment"] = "\n".join(
            [f"hanet pillar has {len(res['problems'])} problem(s); nothing was changed:"]
            + [f"  {p}" for p in res["problems"]]
        )
    return ret


def _facet(name, facet, pillar_key):
    ret = {"name": name, "changes": {}, "result": True, "comment": ""}
    test = bool(__opts__.get("test"))
    try:
        res = __salt__["hanet.apply_facet"](facet, pillar=_pillar(pillar_key), test=test)
    except Exception as err:  # PillarInvalid and applier failures: report, never traceback
        ret["result"] = False
        ret["comment"] = f"hanet {facet}: {err}"
        return ret
    changes = res["changes"]
    if not changes:
        ret["comment"] = f"hanet {facet} is already as the pillar says."
    elif test:
        ret["result"] = None
        ret["changes"] = {facet: changes}
        ret["comment"] = f"hanet {facet} would make {len(changes)} change(s)."
    else:
        ret["changes"] = {facet: changes}
        ret["comment"] = f"hanet {facet}: made {len(changes)} change(s)."
    return ret


def links(name, pillar_key="hanet"):
    """Bridges (STP off, forward delay 0, MAC pinned to the uplink's) with their uplinks
    enslaved, VLAN (``vlan<id>``) and VXLAN (``vx<vni>``) links, and this host's
    addresses on them (its own address first; the gateway where it is the active
    network host). Bridges hanet made that the pillar no longer names are removed.

    .. code-block:: yaml

        hanet-links:
          hanet.links: []
    """
    return _facet(name, "links", pillar_key)


def sysctls(name, pillar_key="hanet"):
    """Forwarding sysctls (``net.ipv4.ip_forward=1``) where this host routes for VMs.

    .. code-block:: yaml

        hanet-sysctls:
          hanet.sysctls: []
    """
    return _facet(name, "sysctls", pillar_key)


def ruleset(name, pillar_key="hanet"):
    """hanet's own NAT/filter ruleset (nftables table, or iptables chains), replaced
    atomically, never touching anyone else's rules.

    .. code-block:: yaml

        hanet-ruleset:
          hanet.ruleset: []
    """
    return _facet(name, "ruleset", pillar_key)


def floating_ips(name, pillar_key="hanet"):
    """Floating IPs this host serves, as /32 on its public interface, announced with
    gratuitous ARP (``send_arp_for_ha``) when bound; unbound ones are removed with their
    conntrack entries. Their NAT lives in the ruleset.

    .. code-block:: yaml

        hanet-floating:
          hanet.floating_ips: []
    """
    return _facet(name, "floating", pillar_key)


def conntrackd(name, pillar_key="hanet"):
    """conntrackd on a network host (``ha:conntrack_sync``): started, restarted when its
    config changes, stopped when the host no longer serves a network or the pillar turns
    it off. It carries the flows of the host's networks to the other network hosts, which
    commit them before they take a network over (docs/failover.md#open-connections).

    .. code-block:: yaml

        hanet-conntrackd:
          hanet.conntrackd: []
    """
    return _facet(name, "conntrackd", pillar_key)


def dnsmasq(name, pillar_key="hanet"):
    """One dnsmasq per network this host serves: started, SIGHUPed when only host
    entries change, restarted when options change, stopped when no longer served.

    .. code-block:: yaml

        hanet-dnsmasq:
          hanet.dnsmasq: []
    """
    return _facet(name, "dnsmasq", pillar_key)


def metadata(name, pillar_key="hanet"):
    """hanet's local metadata service (when ``metadata_host`` is 127.0.0.1), serving
    each instance its own OpenStack and EC2 metadata, found by its source address.

    .. code-block:: yaml

        hanet-metadata:
          hanet.metadata: []
    """
    return _facet(name, "metadata", pillar_key)


def liveness(name, pillar_key="hanet"):
    """The ``hanet_liveness`` beacon, configured from the pillar: on every host that
    stands by for, or uses, a network host, it watches those network hosts (their own
    addresses on the VM network and their public addresses) every
    ``ha:probe_interval_ms``. On a host that runs dnsmasq or the metadata service it also restarts
    them when they die. Removed where there is nothing to watch or supervise.

    .. code-block:: yaml

        hanet-liveness:
          hanet.liveness: []
    """
    ret = _facet(name, "liveness", pillar_key)
    if ret["result"] and not __opts__.get("test"):
        # Warm the master's failover path (its reactor and the hanet runner) with the
        # pillar this highstate applied: see reactor/prime.sls.
        __salt__["event.fire_master"]({"id": __opts__["id"]}, "hanet/prime")
    return ret


def startup(name, pillar_key="hanet"):
    """Start-up behaviour: a ``minion.d/hanet.conf`` that makes the minion apply the
    hanet state when it starts, so that a host that was down consults the master's
    failover record before binding any gateway address (it comes back as the standby).

    .. code-block:: yaml

        hanet-startup:
          hanet.startup: []
    """
    return _facet(name, "startup", pillar_key)
