"""common.run: a child process created from a thread of a process that forks (the
minion forks its jobs from its main thread) must not wait for those forks to exit."""

import os
import subprocess
import sys
import threading
import time

import pytest

from _hanet import common, ruleset


def test_run_returns_the_output_and_the_exit_code():
    got = common.run(["sh", "-c", "echo hi; exit 3"], stdout=subprocess.PIPE, text=True)
    assert got.stdout == "hi\n" and got.returncode == 3


def test_run_kills_a_child_that_overruns_its_timeout():
    with pytest.raises(subprocess.TimeoutExpired):
        common.run(["sleep", "5"], timeout=0.2)


def test_run_feeds_its_input_and_captures_both_outputs():
    got = common.run(["sh", "-c", "cat; echo err >&2"], input="a\nb\n", capture_output=True, text=True)
    assert (got.stdout, got.stderr, got.returncode) == ("a\nb\n", "err\n", 0)
    assert common.run(["cat"], input=b"\x00\x01", capture_output=True).stdout == b"\x00\x01"


def _output(cmd):
    return lambda: common.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(_output(["true"]), id="captured output (dnsmasq by the supervisor)"),
        pytest.param(lambda: common.run(["cat"], input="x" * 100, capture_output=True), id="input (nft -f -)"),
        pytest.param(lambda: ruleset._run(["cat"], "table x {}\n"), id="ruleset (the port watch)"),
    ],
)
def test_children_started_from_a_thread_never_wait_for_the_main_threads_forks(command):
    """The main thread forks children that live 3 s (Salt jobs), while a thread runs
    short commands with a captured stdout, or fed an input (the port watch's
    ``nft -f -``, holding the ruleset lock the job's apply then waits for). A fork made
    while a command is being created would keep its pipes open, and that command would
    then take as long as the forked child lives; a fork that keeps the write end of the
    input pipe would leave the command waiting for the end of its input for ever.
    (Forking a large process holds the GIL: under load a command may take most of a
    second without waiting for any child, hence children that live much longer.)"""
    slowest, stop = [0.0], threading.Event()

    def commands():
        while not stop.is_set():
            t0 = time.monotonic()
            command()
            slowest[0] = max(slowest[0], time.monotonic() - t0)

    t = threading.Thread(target=commands)
    t.start()
    children = []
    try:
        for _ in range(40):
            pid = os.fork()
            if pid == 0:
                time.sleep(3.0)
                os._exit(0)
            children.append(pid)
            time.sleep(0.005)
    finally:
        stop.set()
        t.join()
        for pid in children:
            os.waitpid(pid, 0)
    assert slowest[0] < 2.0, f"a command waited {slowest[0]:.2f} s for a forked child"


SCRIPT = """
import os, sys, threading, time
from _hanet import common  # registers the at-fork hooks
sys.path.insert(0, sys.argv[1])
threading.Thread(target=__import__, args=("hanet_slow_import",)).start()
time.sleep(0.3)
pid = os.fork()
if pid == 0:
    import hanet_slow_import
    os._exit(0)
deadline = time.monotonic() + 5
while time.monotonic() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        print("child exit", status)
        break
    time.sleep(0.05)
else:
    print("child hung")
    os.kill(pid, 9)
"""


def test_a_child_forked_while_a_thread_imports_a_module_imports_it_afresh(tmp_path):
    """A Salt job forked while a beacon thread is importing a module lazily: without
    ``common``'s at-fork hook the job's own import of that module waits for ever for
    a lock held by a thread it does not have (checked: it hangs). In a fresh
    interpreter, as in the minion."""
    (tmp_path / "hanet_slow_import.py").write_text("import time\ntime.sleep(1.0)\nX = 1\n")
    modules = os.path.dirname(os.path.dirname(os.path.abspath(common.__file__)))
    got = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
        env=dict(os.environ, PYTHONPATH=modules),
    )
    assert got.stdout.strip() == "child exit 0", got.stdout + got.stderr
