"""fairseq-thor-average: the mean of known checkpoints, one-process and expert-sharded."""
import argparse
import os
import subprocess
import sys

import pytest
import torch

from fairseq_thor.average import average, last_checkpoints, main
from fairseq_thor.distributed import sharded_checkpoint as shards
from fairseq_thor.distributed.consolidate import one_process_meta
from fairseq_thor.errors import ThorError

E = 4  # experts per bank


def one_process_state(value, step):
    """A THOR-shaped checkpoint whose float tensors all hold ``value``."""
    return {"model": {"encoder.layers.0.fc1.weight": torch.full((E, 3, 2), value),
                      "encoder.layers.0.fc1.bias": torch.full((E, 3), value),
                      "encoder.layers.0.fc2.weight": torch.full((E, 2, 3), value, dtype=torch.float16),
                      "encoder.layers.0.fc2.bias": torch.full((E, 2), value),
                      "encoder.embed_tokens.weight": torch.full((5, 2), value),
                      "encoder.version": torch.tensor([step])},
            "args": argparse.Namespace(arch="thor_transformer", step=step),
            "last_optimizer_state": {"exp_avg": torch.ones(2)}}


def test_the_last_epoch_checkpoints_are_averaged(tmp_path):
    for epoch, value in ((1, 100.0), (2, 1.0), (9, 2.0), (10, 6.0)):
        torch.save(one_process_state(value, epoch), tmp_path / f"checkpoint{epoch}.pt")
    torch.save({}, tmp_path / "checkpoint_last.pt")  # not an epoch checkpoint: ignored
    paths = last_checkpoints(str(tmp_path), 3, "epoch")
    assert [os.path.basename(p) for p in paths] == ["checkpoint2.pt", "checkpoint9.pt", "checkpoint10.pt"]
    main(["--inputs", str(tmp_path), "--num-epoch-checkpoints", "3", "--out", str(tmp_path / "avg.pt")])
    avg = torch.load(tmp_path / "avg.pt", weights_only=False)
    for name, tensor in avg["model"].items():
        if tensor.is_floating_point():
            assert tensor.eq(3.0).all(), name  # (1 + 2 + 6) / 3, every expert in place
    assert avg["model"]["encoder.layers.0.fc2.weight"].dtype == torch.float16  # dtypes kept
    assert avg["model"]["encoder.version"].tolist() == [10]  # integers: the newest checkpoint's
    assert avg["args"].step == 10 and avg["last_optimizer_state"] is None
    with pytest.raises(ThorError, match="holds 4 epoch checkpoints, fewer than the 5 asked for"):
        last_checkpoints(str(tmp_path), 5, "epoch")


def test_update_checkpoints_are_picked_by_update_number(tmp_path):
    for update in (50, 100, 1000):
        torch.save(one_process_state(float(update), update), tmp_path / f"checkpoint_3_{update}.pt")
    assert [os.path.basename(p) for p in last_checkpoints(str(tmp_path), 2, "update")] == [
        "checkpoint_3_100.pt", "checkpoint_3_1000.pt"]  # by number: 1000 is after 100


def write_sharded(state, prefix, world_size=2):
    shared, ranks = shards.shard(state, one_process_meta(state), world_size, f"fp-{prefix}",
                                 os.path.basename(shards.shared_path(prefix)))
    for r, rank_state in enumerate(ranks):
        torch.save(rank_state, shards.rank_path(prefix, r))
    torch.save(shared, shards.shared_path(prefix))


def test_sharded_saves_are_averaged_rank_by_rank(tmp_path):
    states = []
    for i, update in enumerate((10, 20)):
        state = one_process_state(0.0, update)
        state.pop("last_optimizer_state")
        g = torch.Generator().manual_seed(i)
        state["model"] = {k: torch.randn(v.shape, generator=g).to(v.dtype) if v.is_floating_point() else v
                          for k, v in state["model"].items()}
        write_sharded(state, str(tmp_path / f"checkpoint_1_{update}"))
        states.append(state)
    message = average([str(tmp_path / "checkpoint_1_10"), str(tmp_path / "checkpoint_1_20")],
                      str(tmp_path / "avg" / "checkpoint_avg"))
    assert "(2 ranks each)" in message
    _, shared, ranks = shards.read_shards(str(tmp_path / "avg" / "checkpoint_avg"))  # a valid sharded save
    averaged = shards.consolidate(shared, ranks)["model"]
    for name, tensor in averaged.items():
        if tensor.is_floating_point():
            expected = ((states[0]["model"][name].double() + states[1]["model"][name].double()) / 2)
            torch.testing.assert_close(tensor, expected.to(tensor.dtype), msg=name)
    assert "optimizer_state" not in ranks[0] and "last_optimizer_state" not in shared


def test_mixed_or_mismatched_inputs_are_refused_in_one_line(tmp_path):
    torch.save(one_process_state(1.0, 1), tmp_path / "one.pt")
    state = one_process_state(1.0, 2)
    state.pop("last_optimizer_state")
    write_sharded(state, str(tmp_path / "two"))
    with pytest.raises(ThorError, match="some inputs are sharded"):
        average([str(tmp_path / "one.pt"), str(tmp_path / "two")], str(tmp_path / "out.pt"))
    proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "fairseq-thor-average"),
                           "--inputs", str(tmp_path), "--num-epoch-checkpoints", "2", "--out", str(tmp_path / "x.pt")],
                          capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "fewer than the 2 asked for" in lines[0] and "--keep-last-epochs 2" in lines[0]
