"""Bad training input refused up front in one line, and a finished run left as it is.

Through ``fairseq-train --user-dir fairseq_thor`` at toy size: each bad value or file ends the
command with exit status 1 and a single ``error:`` line naming the flag (or split and files) and
what is valid, with no traceback.
"""
import hashlib

import pytest

from test_cli import make_toy_data, run

pytestmark = pytest.mark.cli

TOY = ["--user-dir", "fairseq_thor", "--cpu", "--task", "translation_thor", "--arch", "thor_transformer",
       "--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "16",
       "--decoder-embed-dim", "16", "--encoder-ffn-embed-dim", "32", "--decoder-ffn-embed-dim", "32",
       "--encoder-attention-heads", "2", "--decoder-attention-heads", "2", "--optimizer", "adam",
       "--lr", "0.003", "--max-tokens", "1000", "--log-format", "simple", "--no-epoch-checkpoints",
       "--seed", "3"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_toy_data(tmp_path_factory.mktemp("guards"))


def train(data, save_dir, *extra, check=True):
    return run("fairseq-train", data, *TOY, "--save-dir", save_dir, *extra, check=check)


def assert_refused_in_one_line(code, out, *fragments):
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert code == 1 and "Traceback" not in out, out[-3000:]
    assert len(errors) == 1 and all(f in errors[0] for f in fragments), out[-3000:]


@pytest.mark.parametrize("extra,fragments", [
    (["--consistency-alpha", "nan"], ["--consistency-alpha must be >= 0 and finite"]),
    (["--consistency-alpha", "inf"], ["--consistency-alpha must be >= 0 and finite"]),
    (["--expert-router", "switch", "--capacity-factor", "inf"],
     ["--capacity-factor must be a finite number > 0 (0 < F < inf), got inf"]),
    (["--expert-router", "switch", "--capacity-factor", "nan"], ["--capacity-factor must be a finite number > 0"]),
    (["--encoder-expert-layers", ""], ["--encoder-expert-layers is empty", "'none' for no expert layer"]),
    (["--fp16"], ["--fp16 needs a CUDA device but the command has --cpu"]),
    (["--bf16"], ["--bf16 needs a CUDA device but the command has --cpu"]),
])
def test_bad_values_are_refused_before_training(data, tmp_path, extra, fragments):
    criterion = "moe_label_smoothed_cross_entropy" if "switch" in extra else "thor_consistency"
    code, out = train(data, tmp_path / "ckpt", "--criterion", criterion, "--max-update", "2", *extra,
                      check=False)
    assert_refused_in_one_line(code, out, *fragments)
    assert not (tmp_path / "ckpt" / "checkpoint_last.pt").exists()


def test_a_reference_code_command_is_not_trained_without_its_consistency_term(data, tmp_path):
    # the reference computes the consistency loss in its task; here --criterion thor_consistency does
    code, out = train(data, tmp_path / "ckpt", "--criterion", "label_smoothed_cross_entropy",
                      "--consistency-alpha", "5", "--max-update", "2", check=False)
    assert_refused_in_one_line(code, out, "--consistency-alpha is set but --criterion "
                               "label_smoothed_cross_entropy does not use it", "--criterion thor_consistency")


def test_an_empty_split_is_named_with_its_files(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    data = make_toy_data(root)
    for lang in ("src", "tgt"):  # what fairseq-preprocess writes for an empty --validpref file
        (data / f"valid.src-tgt.{lang}.bin").write_bytes(b"")
    code, out = train(data, tmp_path / "ckpt", "--criterion", "thor_consistency", "--max-update", "2",
                      check=False)
    assert_refused_in_one_line(code, out, "the valid split is empty:", f"{data}/valid.src-tgt.src.bin",
                               "--disable-validation")
    assert "cannot mmap an empty file" not in out


def digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("bound", [["--max-update", "3"], ["--max-epoch", "1"]])
def test_rerunning_a_finished_training_changes_nothing(data, tmp_path, bound):
    save_dir = tmp_path / "ckpt"
    # a one-pass criterion on a THOR model without --consistency-alpha is a legitimate ablation
    train(data, save_dir, "--criterion", "label_smoothed_cross_entropy", *bound)
    before = digests(save_dir)
    _, out = train(data, save_dir, "--criterion", "label_smoothed_cross_entropy", *bound)
    assert digests(save_dir) == before  # byte for byte, and no new file
    assert "train_inner" not in out and "Saving checkpoint" not in out and "Saved checkpoint" not in out, out[-3000:]
    if bound[0] == "--max-update":
        assert "training already finished: the checkpoint is at update 3 and --max-update is 3" in out
    # a higher bound trains on from there
    more = ["--max-update", "5"] if bound[0] == "--max-update" else ["--max-epoch", "2"]
    _, out = train(data, save_dir, "--criterion", "label_smoothed_cross_entropy", *more)
    assert digests(save_dir)["checkpoint_last.pt"] != before["checkpoint_last.pt"]
