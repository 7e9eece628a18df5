"""A resumed ``fairseq-train --user-dir fairseq_thor`` is the run left alone: the same batches after
the resume (fairseq-fixed reseeds them by the resume epoch), the same ``--patience`` count (fairseq
keeps it in process memory only), and a run that stopped early stays stopped."""
import hashlib
import re

import pytest
import torch

from test_cli import make_toy_data, run
from test_training_guards import TOY

pytestmark = pytest.mark.cli
THOR = ["--num-experts", "2", "--criterion", "thor_consistency", "--dropout", "0.3", "--log-interval", "1",
        "--save-interval-updates", "5", "--validate-interval-updates", "5", "--save-interval", "1000",
        "--validate-interval", "1000"]
# validation by loss: at toy size greedy BLEU is 0 at most validations, so a BLEU patience stops too soon
PATIENCE = ["--patience", "2", "--best-checkpoint-metric", "nll_loss"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_toy_data(tmp_path_factory.mktemp("resume"))


def train(data, save_dir, *extra, check=True):
    return run("fairseq-train", data, *TOY, *THOR, "--save-dir", save_dir, *extra, check=check)


def parameters(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_a_resumed_run_trains_on_the_batches_of_an_uninterrupted_one(data, tmp_path):
    # the toy epoch is ~3 updates, so update 10 is inside epoch 4: fairseq-fixed alone would rebuild
    # the batches with the seed of epoch 4 and every later update would see other sentence groupings
    _, whole_log = train(data, tmp_path / "whole", "--max-update", "16")
    _, first_log = train(data, tmp_path / "parts", "--max-update", "10")
    _, resumed = train(data, tmp_path / "parts", "--max-update", "16")
    # epochs count one by one, in a fresh run and across the resume (the iterator fairseq caches
    # between epochs is not touched: an earlier version advanced it twice per epoch)
    epochs = [int(e) for e in re.findall(r"begin training epoch (\d+)", whole_log)]
    assert epochs == list(range(1, len(epochs) + 1)) and len(epochs) >= 4, epochs
    parts = [int(e) for e in re.findall(r"begin training epoch (\d+)", first_log + resumed)]
    assert sorted(set(parts)) == epochs, (parts, epochs)  # the resumed epoch begins again, mid-way
    assert re.search(r"\(epoch ([2-9]|\d\d) @ 10 updates\)", resumed), resumed[-3000:]  # resumed mid-run
    whole, parts = parameters(tmp_path / "whole" / "checkpoint_last.pt"), parameters(tmp_path / "parts" / "checkpoint_last.pt")
    assert whole.keys() == parts.keys()
    for name in whole:
        assert torch.equal(whole[name], parts[name]), name


def valid_losses(output):
    return [line.split("| loss ")[1].split(" ")[0] for line in output.splitlines() if "valid on 'valid' subset" in line]


def test_patience_counts_across_a_resume_and_a_stopped_run_stays_stopped(data, tmp_path):
    code, whole = train(data, tmp_path / "whole", *PATIENCE, "--max-update", "200", "--lr", "0.03")
    stop = [line for line in whole.splitlines() if "early stop since valid performance" in line]
    assert code == 0 and stop, whole[-3000:]
    stopped_at = int(whole.split("done training")[0].rsplit("num_updates ", 1)[1].split()[0])
    assert 15 <= stopped_at < 200, stopped_at
    # the same run cut at the first validation after its best, then resumed
    cut = stopped_at - 5
    train(data, tmp_path / "parts", *PATIENCE, "--max-update", str(cut), "--lr", "0.03")
    _, resumed = train(data, tmp_path / "parts", *PATIENCE, "--max-update", "200", "--lr", "0.03")
    assert "--patience resumed: best nll_loss" in resumed and "1 validation(s) without a better one" in resumed
    assert "early stop since valid performance" in resumed
    assert valid_losses(resumed) == valid_losses(whole)[-1:]  # one validation, at the same stop
    last = tmp_path / "parts" / "checkpoint_last.pt"
    before = hashlib.sha256(last.read_bytes()).hexdigest()
    code, again = train(data, tmp_path / "parts", *PATIENCE, "--max-update", "200", "--lr", "0.03")
    assert code == 0 and "training already finished: it stopped early" in again, again[-2000:]
    assert "train_inner" not in again and hashlib.sha256(last.read_bytes()).hexdigest() == before
    # another metric: the count restarts (said), training goes on
    _, other = train(data, tmp_path / "parts", "--patience", "2", "--max-update", str(stopped_at + 5),
                     "--lr", "0.03")
    assert "--patience counts afresh: the checkpoint counted validations of nll_loss" in other
    assert "train_inner" in other
