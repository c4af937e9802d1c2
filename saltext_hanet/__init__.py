"""hanet as an installed Salt extension (``pip install <checkout>``).

Salt's loader finds this package through the ``salt.loader`` entry point in
pyproject.toml and loads its ``modules``, ``states``, ``beacons``, ``runners``,
``engines`` and ``pillar`` directories, which the wheel builds from the checkout's
formula layout (``_modules``, ``_states``, ...). Nothing here runs on its own.

Salt looks in a minion's or master's synced ``extmods`` before installed extensions: a
``saltutil.sync_all`` copy shadows the installed one (docs/install.md).
"""
