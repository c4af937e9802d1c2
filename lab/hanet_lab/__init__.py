"""hanet's namespace lab: network namespaces + a real salt-master and salt-minions.

    from hanet_lab import Lab, default_topology
    with Lab(default_topology(hosts=2)) as lab:
        lab.salt("*", "hanet.links")

CLI: ``python -m hanet_lab {up,down,status,exec,salt,plug,topology,demo}`` (``./dev lab``).
"""

from .lab import EventListener, Lab, LabError, checkout_dir, unavailable_reason
from .state import sweep
from .topology import VM, Host, Master, Nic, Router, Topology, TopologyError, default_topology

__all__ = [
    "Lab",
    "LabError",
    "EventListener",
    "Topology",
    "TopologyError",
    "Master",
    "Host",
    "Router",
    "VM",
    "Nic",
    "default_topology",
    "checkout_dir",
    "sweep",
    "unavailable_reason",
]
