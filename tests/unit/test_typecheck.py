"""mypy over the library (pyproject.toml's [tool.mypy] says what and how): an error
fails the run, as ruff's findings do (test_lint.py)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_library_type_checks():
    got = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", "--config-file", os.path.join(ROOT, "pyproject.toml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert got.returncode == 0, got.stdout + got.stderr
