"""A refused ``--restore-file`` in a multi-process run: every rank waits for the others before
any stops (a rank that exits early takes the rendezvous store down under a rank still building
its Trainer), and a rank whose own file exists stops with the ranks that refused."""
import json
import time
from types import SimpleNamespace

from fairseq_thor import restore_file
from fairseq_thor.errors import ThorError
from tests.distributed_utils import run_in_processes

LATE = 2.0  # seconds rank 1 spends "building its Trainer" before it reaches the check


def _resume_on_every_rank(rank, world_size, folder, restore_by_rank):
    loaded = []
    load = restore_file._checked_load_checkpoint(lambda cfg, trainer, **kw: loaded.append(cfg.restore_file))
    if rank == 1:
        time.sleep(LATE)
    arrived = time.time()
    try:
        load(SimpleNamespace(restore_file=restore_by_rank[rank]), SimpleNamespace(checkpoint_suffix=""))
        outcome = "loaded"
    except ThorError as error:
        outcome = str(error)
    with open(f"{folder}/rank{rank}.json", "w") as f:
        json.dump({"arrived": arrived, "stopped": time.time(), "outcome": outcome, "loaded": loaded}, f)


def _run(tmp_path, restore_by_rank):
    run_in_processes(_resume_on_every_rank, 2, str(tmp_path), restore_by_rank)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def test_no_rank_stops_before_the_slowest_has_reached_the_check(tmp_path):
    missing = str(tmp_path / "checkpoint_9_9.pt")
    ranks = _run(tmp_path, [missing, missing])
    for rank in ranks:
        assert rank["outcome"].startswith(f"--restore-file {missing}: no checkpoint at {missing}")
        assert rank["loaded"] == []
    assert ranks[0]["stopped"] >= ranks[1]["arrived"]
    assert ranks[0]["stopped"] - ranks[0]["arrived"] >= LATE * 0.9


def test_a_rank_whose_file_exists_stops_with_the_rank_that_refused(tmp_path):
    present = tmp_path / "checkpoint_1_2.pt"
    present.write_bytes(b"")
    missing = str(tmp_path / "checkpoint_9_9.pt")
    refused, followed = _run(tmp_path, [missing, str(present)])
    assert refused["outcome"].startswith(f"--restore-file {missing}: no checkpoint at")
    assert followed["outcome"] == (f"--restore-file {present}: 1 other rank(s) found no checkpoint to "
                                   f"restore; this rank stops with them, so no save is overwritten")
    assert refused["loaded"] == followed["loaded"] == []


def test_ranks_that_all_find_their_file_load_it(tmp_path):
    present = tmp_path / "checkpoint_1_2.pt"
    present.write_bytes(b"")
    ranks = _run(tmp_path, [str(present), str(present)])
    assert [r["outcome"] for r in ranks] == ["loaded", "loaded"]
    assert [r["loaded"] for r in ranks] == [[str(present)], [str(present)]]
