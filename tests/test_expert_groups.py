"""Expert groups and shards without processes: which W are valid, which rank reads which file."""
import argparse

import pytest
import torch

from fairseq_thor.distributed import sharded_checkpoint as shards
from fairseq_thor.distributed.consolidate import one_process_meta
from fairseq_thor.errors import ThorError
from fairseq_thor.modules.expert_groups import ExpertGroups, num_shards


@pytest.mark.parametrize("experts, world, expected", [(4, 2, 2), (4, 4, 4), (2, 4, 2), (2, 8, 2), (8, 2, 2)])
def test_shards_are_the_smaller_of_world_size_and_experts(experts, world, expected):
    assert num_shards(experts, world) == expected


def test_a_world_size_neither_multiple_nor_divisor_is_refused_with_valid_choices():
    with pytest.raises(ValueError, match=r"--num-experts \(4\) to be a multiple or a divisor of the "
                                         r"world size \(6\).*valid here: --num-experts 2, 3, 6, 12, 18"):
        num_shards(4, 6)


def test_replicas_read_their_shard_and_only_the_first_group_writes():
    groups = [ExpertGroups(world_size=6, rank=r, num_shards=2, expert_group=None, replica_group=None)
              for r in range(6)]
    assert [g.shard for g in groups] == [0, 1, 0, 1, 0, 1]
    assert [g.writes_rank_file for g in groups] == [True, True, False, False, False, False]
    assert {g.num_replicas for g in groups} == {3}


def thor_state():
    return {"model": {"encoder.layers.0.fc1.weight": torch.arange(4 * 3 * 2.0).view(4, 3, 2),
                      "encoder.layers.0.fc1.bias": torch.zeros(4, 3),
                      "encoder.layers.0.fc2.weight": torch.zeros(4, 2, 3),
                      "encoder.layers.0.fc2.bias": torch.zeros(4, 2),
                      "encoder.embed_tokens.weight": torch.ones(5, 2)},
            "args": argparse.Namespace(arch="thor_transformer")}


def test_reshard_for_more_processes_than_experts_writes_each_expert_once():
    state = thor_state()
    shared, ranks = shards.shard(state, one_process_meta(state), 8, "fp", "x-shared.pt")
    assert len(ranks) == 4 and shared["expert_parallel"]["world_size"] == 4
    for r, rank_state in enumerate(ranks):
        torch.testing.assert_close(rank_state["model"]["encoder.layers.0.fc1.weight"],
                                   state["model"]["encoder.layers.0.fc1.weight"][r: r + 1])
    back = shards.consolidate(shared, ranks)["model"]["encoder.layers.0.fc1.weight"]
    assert torch.equal(back, state["model"]["encoder.layers.0.fc1.weight"])
    with pytest.raises(ThorError, match=r"--world-size 3 must be a divisor or a multiple of the "
                                        r"checkpoint's 4 experts: 1, 2, 4, 8, \.\.\.$"):
        shards.shard(state, one_process_meta(state), 3, "fp", "x-shared.pt")


def summary(rank_file, world_size=2, fingerprint="a"):
    return {"file": rank_file, "world_size": world_size, "fingerprint": fingerprint, "updates": 4,
            "problem": None}


def test_resume_checks_count_shards_not_processes(tmp_path):
    prefix = str(tmp_path / "checkpoint_last")
    # 4 processes, 2 shards: ranks 2 and 3 read the files of ranks 0 and 1
    saved = [summary(shards.rank_path(prefix, r % 2)) for r in range(4)]
    shards.check_ranks_agree(prefix, saved, 2)  # one save, two shards: accepted
    with pytest.raises(ThorError, match=r"checkpoint_last-rank-1\.pt missing"):
        shards.check_ranks_agree(prefix, saved[:3] + [None], 2)  # rank 3 found no shard-1 file
    with pytest.raises(ThorError, match=r"saved by 2 expert-parallel ranks, this run has 4"):
        shards.check_ranks_agree(prefix, saved, 4)
