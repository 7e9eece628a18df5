"""The fault drills of issue 20, each through the real command: a wrong ``--restore-file`` never
starts a run over existing saves, and every input a user can fix ends the command with one
``error:`` line (no traceback) naming the file or option and what to do."""
import hashlib
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch

from test_checkpoint_files import flip_bytes_inside_largest_entry
from test_cli import BIN, REPO, make_toy_data, run
from test_training_guards import TOY

pytestmark = pytest.mark.cli
SAVE_EVERY = ["--save-interval-updates", "2", "--save-interval", "1000", "--validate-interval", "1000",
              "--validate-interval-updates", "2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A one-process THOR run of 4 updates saved every 2, and its data."""
    root = tmp_path_factory.mktemp("drills")
    data, ckpt = make_toy_data(root), root / "ckpt"
    _, log = run("fairseq-train", data, *TOY, "--num-experts", "2", "--criterion", "thor_consistency",
                 "--save-dir", ckpt, "--max-update", "4", *SAVE_EVERY)
    return {"root": root, "data": data, "ckpt": ckpt, "log": log}


def one_error_line(code, out, *fragments):
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert code == 1 and "Traceback" not in out, out[-3000:]
    assert len(errors) == 1, out[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def digest(folder):
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in sorted(os.listdir(folder))}


def train_more(trained, *extra, save_dir=None):
    return run("fairseq-train", trained["data"], *TOY, "--num-experts", "2", "--criterion", "thor_consistency",
               "--save-dir", save_dir or trained["ckpt"], "--max-update", "8", *SAVE_EVERY, *extra, check=False)


def test_a_restore_file_that_names_nothing_stops_before_training_over_the_saves(trained, tmp_path):
    save_dir = tmp_path / "ckpt"
    shutil.copytree(trained["ckpt"], save_dir)
    before = digest(save_dir)
    for wrong in (save_dir / "checkpoint_1_99.pt", save_dir / "checkpoint_1_2-rank-1.pt", tmp_path / "nope" / "x.pt"):
        code, out = train_more(trained, "--restore-file", wrong, save_dir=save_dir)
        line = one_error_line(code, out, f"--restore-file {wrong}: no checkpoint at {wrong}",
                              "Nothing was trained, so no save was overwritten")
        if wrong.parent == save_dir:  # what is there, newest first, in a form --restore-file takes
            assert f"{save_dir}/checkpoint_last.pt" in line and f"{save_dir}/checkpoint_1_2.pt" in line, line
        else:
            assert f"the folder {tmp_path / 'nope'} does not exist" in line
        assert "train_inner" not in out and "No existing checkpoint found" not in out
    assert digest(save_dir) == before


def test_an_explicit_restore_file_that_exists_is_loaded(trained, tmp_path):
    save_dir = tmp_path / "ckpt"
    code, out = train_more(trained, "--restore-file", trained["ckpt"] / "checkpoint_1_2.pt", save_dir=save_dir)
    loaded = re.search(r"Loaded checkpoint .*checkpoint_1_2\.pt \(epoch \d+ @ 2 updates\)", out)
    assert code == 0 and loaded, out[-2000:]


def test_the_training_log_counts_the_expert_parameters(trained):
    # 1+1 layers, d=16, FFN 32, E=2 experts in every other layer: the encoder's and decoder's layer 0
    one_expert = 2 * 16 * 32 + 32 + 16
    assert f"num. THOR expert FFN params: {2 * 2 * one_expert:,} in 2 expert layers of 2 experts" in trained["log"]


def test_consolidating_a_one_process_checkpoint_says_it_is_not_sharded(trained, tmp_path):
    last = trained["ckpt"] / "checkpoint_last.pt"
    code, out = run("fairseq-thor-consolidate", last, "--out", tmp_path / "out.pt", check=False)
    one_error_line(code, out, f"{last} is a one-process checkpoint, not an expert-sharded one",
                   f"--path {last}")
    damaged = tmp_path / "checkpoint_last.pt"
    shutil.copy(last, damaged)
    flip_bytes_inside_largest_entry(damaged)
    code, out = run("fairseq-thor-consolidate", damaged, "--out", tmp_path / "out.pt", check=False)
    one_error_line(code, out, f"checkpoint {damaged} cannot be used", "fails the CRC check")
    assert not (tmp_path / "out.pt").exists()


def test_a_data_folder_without_its_dictionaries_is_named(trained, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(trained["data"], data)
    os.remove(data / "dict.tgt.txt")
    code, out = run("fairseq-train", data, *TOY, "--save-dir", tmp_path / "ckpt", "--max-update", "1", check=False)
    one_error_line(code, out, f"data folder {data} has no dict.tgt.txt", "fairseq-preprocess --source-lang src")
    code, out = run("fairseq-generate", data, "--user-dir", "fairseq_thor", "--cpu", "--task", "translation_thor",
                    "--path", trained["ckpt"] / "checkpoint_last.pt", "--gen-subset", "test", check=False)
    one_error_line(code, out, f"data folder {data} has no dict.tgt.txt")
    code, out = run("fairseq-generate", tmp_path / "missing", "--user-dir", "fairseq_thor", "--cpu",
                    "--task", "translation_thor", "--path", trained["ckpt"] / "checkpoint_last.pt", check=False)
    one_error_line(code, out, f"data folder {tmp_path / 'missing'} does not exist")


def test_a_test_sentence_longer_than_the_positions_is_named_not_dropped(trained, tmp_path):
    generate = ["fairseq-generate", trained["data"], "--user-dir", "fairseq_thor", "--cpu", "--task",
                "translation_thor", "--path", trained["ckpt"] / "checkpoint_last.pt", "--gen-subset", "test",
                "--beam", "2", "--max-tokens", "1000"]
    # the toy test sentences have 4-10 tokens: a limit of 8 makes some of them too long
    code, out = run(*generate, "--max-source-positions", "8", "--max-target-positions", "8", check=False)
    line = one_error_line(code, out, "the test split has", "longer than the model's positions (8, 8)",
                          "--skip-invalid-size-inputs-valid-test")
    assert re.search(r"#\d+ \(\d+ / \d+ tokens\)", line) and "H-" not in out
    code, out = run(*generate, "--max-source-positions", "8", "--max-target-positions", "8",
                    "--skip-invalid-size-inputs-valid-test")  # the opt-out still works, and is logged
    assert code == 0 and "have invalid sizes and will be skipped" in out


def test_resuming_with_another_number_of_experts_ends_with_the_plugins_line(trained, tmp_path):
    save_dir = tmp_path / "ckpt"
    shutil.copytree(trained["ckpt"], save_dir)
    code, out = run("fairseq-train", trained["data"], *TOY, "--num-experts", "3", "--criterion", "thor_consistency",
                    "--save-dir", save_dir, "--max-update", "8", check=False)
    one_error_line(code, out, "--num-experts")
    assert "Cannot load model parameters" not in out


def test_the_safe_loader_refusal_is_one_line_of_our_own(trained, tmp_path):
    odd = tmp_path / "checkpoint_odd.pt"
    state = torch.load(trained["ckpt"] / "checkpoint_last.pt", weights_only=True)
    state["odd"] = zipfile.ZipInfo("x")  # a class nobody allow-lists
    torch.save(state, odd)
    code, out = run("fairseq-generate", trained["data"], "--user-dir", "fairseq_thor", "--cpu", "--task",
                    "translation_thor", "--path", odd, "--gen-subset", "test", check=False)
    line = one_error_line(code, out, f"checkpoint {odd} cannot be used", "refused the class zipfile.ZipInfo",
                          "torch.serialization.add_safe_globals")
    assert "weights_only" not in line and len(line) < 400, line


def test_the_plugin_import_prints_no_third_party_deprecation_warnings():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    proc = subprocess.run([sys.executable, "-m", "fairseq_thor.path"], cwd="/", env=env, text=True,
                          capture_output=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == os.path.join(REPO, "fairseq_thor")
    assert "Warning" not in proc.stderr, proc.stderr


def test_fairseq_thor_train_names_the_installed_copy_for_another_user_dir(tmp_path):
    copy = tmp_path / "elsewhere" / "fairseq_thor"
    shutil.copytree(os.path.join(REPO, "fairseq_thor"), copy, ignore=shutil.ignore_patterns("__pycache__"))
    code, out = run("fairseq-thor-train", "unused-data", "--user-dir", copy, check=False)
    one_error_line(code, out, f"--user-dir {copy} is another copy of fairseq_thor",
                   f"pass --user-dir {os.path.join(REPO, 'fairseq_thor')}", f"pip install -e {copy.parent}")
    assert "not globally unique" not in out
    os.symlink(os.path.join(REPO, "fairseq_thor"), tmp_path / "linked")  # the same copy by another path
    code, out = run("fairseq-thor-train", "unused-data", "--user-dir", tmp_path / "linked", "--help")
    assert code == 0 and f"--user-dir={os.path.join(REPO, 'fairseq_thor')} has already been imported" in out
    assert os.path.isfile(os.path.join(BIN, "fairseq-thor-train"))
