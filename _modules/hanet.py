"""hanet execution module: what this host holds, and the functions the hanet states call.

CLI examples::

    salt '*' hanet.links
    salt compute1 hanet.status
    salt compute1 hanet.garp 192.168.0.3 br100 3
"""
import logging

log = logging.getLogger(__name__)

__virtualname__ = "hanet"


def __virtual__():
    try:
        import pyroute2  # noqa: F401
    except ImportError:
        return False, "hanet needs pyroute2 (see hanet's README)"
    return __virtualname__


def links():
    """The network links of this host (this network namespace), by name.

    CLI example::

        salt '*' hanet.links
    """
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return sorted(link.get_attr("IFLA_IFNAME") for link in ipr.get_links())
