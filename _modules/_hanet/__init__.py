"""hanet's library: a pure core (model, desired, plan, render) and the appliers
(links, ruleset, dnsmasq, metadata) that touch the host.

It ships inside ``_modules`` so that ``saltutil.sync_all`` brings it to every
minion; the leading underscore keeps Salt's loader from loading it as an
execution module of its own. Salt modules import it as ``_hanet``.
"""

VERSION = "0.7.0"  # pyproject.toml reads it from here
