"""benchmarks/cell_claim.py and atomic_files.py: what lets two study processes share one plan."""
import json
import os
import signal
import subprocess
import sys

import pytest

from test_cli import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import atomic_files  # noqa: E402
import cell_claim  # noqa: E402

HOLD = ("import sys, time; sys.path.insert(0, 'benchmarks'); import cell_claim; "
        "c = cell_claim.try_claim(sys.argv[1], 'dense-seed1'); print('held' if c else 'refused', flush=True); "
        "time.sleep(600)")


@pytest.fixture
def other_process(tmp_path):
    """Another process that claimed dense-seed1 in tmp_path and keeps it until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait()


def test_a_claim_held_by_a_live_process_is_refused_and_named(tmp_path, other_process):
    assert cell_claim.try_claim(str(tmp_path), "dense-seed1") is None
    assert cell_claim.holder(str(tmp_path), "dense-seed1").startswith(f"pid {other_process.pid} on ")
    with cell_claim.try_claim(str(tmp_path), "dense-seed2") as other_cell:
        assert other_cell is not None  # claims are per cell


def test_a_killed_holder_leaves_no_stale_claim(tmp_path, other_process):
    other_process.send_signal(signal.SIGKILL)
    other_process.wait()
    claim = cell_claim.try_claim(str(tmp_path), "dense-seed1")
    assert claim is not None
    assert json.loads(open(cell_claim.claim_path(str(tmp_path), "dense-seed1")).read())["pid"] == os.getpid()
    claim.release()


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing_behind(tmp_path):
    path = tmp_path / "cells" / "dense-seed1.json"
    atomic_files.write_text(str(path), "old")
    with pytest.raises(RuntimeError):
        with atomic_files.replacing(str(path)) as tmp:
            open(tmp, "w").write("half")
            assert not os.path.basename(tmp).endswith(".json.tmp") and os.path.basename(tmp).startswith(".")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "old" and os.listdir(path.parent) == ["dense-seed1.json"]
