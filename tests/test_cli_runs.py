"""A benchmark killed from outside takes its training with it (benchmarks/cli_runs.run)."""
import os
import signal
import subprocess
import sys
import time

from test_cli import REPO

CHILD = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(120)"
PARENT = """
import signal, sys
# Ctrl-C reaches a benchmark run from a terminal; a test suite started in the background
# (`make test &`) hands its processes SIGINT ignored, which would make this test hang, not fail
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path.insert(0, {benchmarks!r})
import cli_runs
cli_runs.run([sys.executable, "-c", {child!r}, {pidfile!r}], {log!r})
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _child_started_by_a_killed_parent(tmp_path, sig):
    pidfile = tmp_path / "child.pid"
    script = PARENT.format(benchmarks=os.path.join(REPO, "benchmarks"), child=CHILD,
                           pidfile=str(pidfile), log=str(tmp_path / "child.log"))
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    deadline = time.time() + 60
    while not (pidfile.exists() and pidfile.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    child = int(pidfile.read_text())
    parent.send_signal(sig)
    return parent.wait(timeout=30), child


def test_kill_of_a_benchmark_stops_the_training_it_runs(tmp_path):
    code, child = _child_started_by_a_killed_parent(tmp_path, signal.SIGTERM)
    try:
        assert code == 128 + signal.SIGTERM
        assert not _alive(child), "the training outlived the benchmark that started it"
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)


def test_ctrl_c_of_a_benchmark_stops_the_training_it_runs(tmp_path):
    code, child = _child_started_by_a_killed_parent(tmp_path, signal.SIGINT)
    try:
        assert code != 0
        assert not _alive(child), "the training outlived the benchmark that started it"
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)
