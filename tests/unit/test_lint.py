"""ruff over the whole checkout (ruff.toml says what it checks): a finding fails the run, and so
does a file ruff's formatter would change (run `.venv/bin/ruff format .`)."""

import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _ruff():
    here = os.path.join(os.path.dirname(sys.executable), "ruff")
    return here if os.path.exists(here) else shutil.which("ruff")


def test_ruff_finds_nothing():
    ruff = _ruff()
    assert ruff is not None, "ruff is not installed (./dev setup installs it from requirements.txt)"
    got = subprocess.run(
        [ruff, "check", "--no-cache", "--output-format", "concise", ROOT], capture_output=True, text=True
    )
    assert got.returncode == 0, got.stdout + got.stderr


def test_ruff_format_changes_nothing():
    ruff = _ruff()
    assert ruff is not None, "ruff is not installed (./dev setup installs it from requirements.txt)"
    got = subprocess.run([ruff, "format", "--check", "--no-cache", ROOT], capture_output=True, text=True)
    assert got.returncode == 0, "run .venv/bin/ruff format .\n" + got.stdout + got.stderr
