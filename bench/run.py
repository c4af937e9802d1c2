#!/usr/bin/env python3
"""hanet benchmarks: ``./dev bench NAME [args]`` (= ``bench/run.py NAME [args]``).

Runs ``bench/NAME.py`` (or the module an alias names) as ``__main__`` with ``args``, so
every benchmark is a standalone script with its own ``--help``. Adding a benchmark is
adding ``bench/<name>.py`` with a module docstring (its first line is the summary shown
by ``./dev bench``) and a ``main()`` / ``if __name__ == "__main__"`` block.

    ./dev bench                  # list the benchmarks
    ./dev bench apply --runs 3   # bench/apply_scale.py: state.apply at 16 networks x 1,000 instances
"""

from __future__ import annotations

import ast
import os
import runpy
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ALIASES = {"apply": "apply_scale"}  # short names for ./dev bench NAME


def _benchmarks() -> dict:
    """{name: summary} for every bench/*.py except this dispatcher and helpers (_*.py)."""
    out = {}
    for fn in sorted(os.listdir(HERE)):
        if not fn.endswith(".py") or fn.startswith("_") or fn == "run.py":
            continue
        with open(os.path.join(HERE, fn), encoding="utf-8") as fh:
            doc = ast.get_docstring(ast.parse(fh.read())) or ""
        out[fn[:-3]] = (doc.strip().splitlines() or [""])[0]
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help", "list"):
        print(__doc__.strip())
        print("\nbenchmarks:")
        aliases = {v: k for k, v in ALIASES.items()}
        for name, summary in _benchmarks().items():
            alias = f" ({aliases[name]})" if name in aliases else ""
            print(f"  {name}{alias}: {summary}")
        return 0
    name = ALIASES.get(argv[0], argv[0]).replace("-", "_")
    path = os.path.join(HERE, f"{name}.py")
    if not os.path.exists(path):
        print(
            f"bench: no benchmark {argv[0]!r}; one of: {', '.join(sorted(set(_benchmarks()) | set(ALIASES)))}",
            file=sys.stderr,
        )
        return 2
    sys.argv = [path] + argv[1:]
    sys.path.insert(0, HERE)
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
