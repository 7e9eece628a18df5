"""Checkpoints that are whole or refused: atomic copies to checkpoint_last, CRC-verified loads.

The unit tests damage files the way the fault drill did (bytes overwritten inside a tensor, a file
cut short, an empty file, a kill during the copy); the CLI tests check that fairseq's own commands,
run with ``--user-dir fairseq_thor``, end with one line naming the file and an intact alternative.
"""
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch

from fairseq_thor import checkpoint_files
from fairseq_thor.checkpoint_files import UnreadableCheckpoint, problem_with
from test_cli import MODEL, REPO, make_toy_data, run


def save(path, value=1.0):
    torch.save({"model": {"w": torch.full((64, 64), value)}}, path)
    return path


def flip_bytes_inside_largest_entry(path, count=100):
    """Overwrite ``count`` bytes in the middle of the biggest stored tensor (the zip's own headers
    and directory stay valid, so only the CRC can tell)."""
    with zipfile.ZipFile(path) as archive:
        entry = max(archive.infolist(), key=lambda i: i.file_size)
    with open(path, "rb+") as f:
        f.seek(entry.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        start = entry.header_offset + 30 + name_len + extra_len + entry.file_size // 2
        f.seek(start)
        original = f.read(count)
        f.seek(start)
        f.write(bytes((b + 1) % 256 for b in original))


def truncate(path, keep=0.5):
    with open(path, "rb+") as f:
        f.truncate(int(os.path.getsize(path) * keep))


# ---- verification ------------------------------------------------------------------------------

def test_an_intact_checkpoint_passes_and_damaged_ones_say_what_is_wrong(tmp_path):
    assert problem_with(save(tmp_path / "ok.pt")) is None
    flipped = save(tmp_path / "flipped.pt")
    flip_bytes_inside_largest_entry(flipped)
    assert "fails the CRC check" in problem_with(flipped)
    torch.load(flipped, weights_only=True)  # why this module exists: torch itself loads it
    cut = save(tmp_path / "cut.pt")
    truncate(cut)
    assert "truncated or damaged" in problem_with(cut)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert problem_with(empty) == "it is empty"
    text = tmp_path / "text.pt"
    text.write_text("not a checkpoint")
    assert "not a torch checkpoint" in problem_with(text)


def test_the_legacy_format_has_no_checksum_and_still_loads(tmp_path):
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(3)}, legacy, _use_new_zipfile_serialization=False)
    assert problem_with(legacy) is None
    assert torch.equal(checkpoint_files.load(str(legacy))["w"], torch.ones(3))


def test_the_error_names_the_file_and_the_newest_intact_sibling(tmp_path):
    older = save(tmp_path / "checkpoint_1_10.pt")
    newer = save(tmp_path / "checkpoint_1_20.pt")
    os.utime(older, (1, 1))
    save(tmp_path / "checkpoint_1_20-rank-0.pt")  # another kind of file: never suggested
    last = save(tmp_path / "checkpoint_last.pt")
    truncate(last)
    with pytest.raises(UnreadableCheckpoint) as error:
        checkpoint_files.load(str(last))
    message = str(error.value)
    assert str(last) in message and "truncated" in message
    assert f"use {newer} (the newest intact checkpoint beside it)" in message
    flip_bytes_inside_largest_entry(newer)  # the next one is damaged too: suggest the older one
    with pytest.raises(UnreadableCheckpoint, match=f"use {older} "):
        checkpoint_files.load(str(last))


def test_a_refused_pickle_names_the_file(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({"model": {}, "odd": zipfile.ZipInfo("x")}, path)  # a class nobody allow-lists
    with pytest.raises(UnreadableCheckpoint, match=f"checkpoint {path} cannot be used: torch's safe loader"):
        checkpoint_files.load(str(path))


# ---- atomic copies -----------------------------------------------------------------------------

KILLED_DURING_COPY = """
import os, shutil, sys
import fairseq_thor  # installs the atomic copy
from fairseq.file_io import PathManager

def copy_half_then_die(src, dst, **kwargs):  # what kill -9 in the middle of a copy leaves behind
    data = open(src, "rb").read()
    with open(dst, "wb") as f:
        f.write(data[: len(data) // 2])
    os._exit(9)

shutil.copyfile = copy_half_then_die
PathManager.copy(sys.argv[1], sys.argv[2], overwrite=True)
"""


def test_a_kill_during_the_copy_leaves_the_previous_checkpoint_last_whole(tmp_path):
    numbered, last = save(tmp_path / "checkpoint_1_20.pt", 2.0), save(tmp_path / "checkpoint_last.pt", 1.0)
    before = last.read_bytes()
    proc = subprocess.run([sys.executable, "-c", KILLED_DURING_COPY, str(numbered), str(last)],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr[-2000:]
    assert last.read_bytes() == before and problem_with(last) is None  # the old save, whole
    # and a copy that completes replaces it
    from fairseq.file_io import PathManager
    assert PathManager.copy(str(numbered), str(last), overwrite=True)
    assert last.read_bytes() == numbered.read_bytes() and not (tmp_path / "checkpoint_last.pt.tmp").exists()


def test_copy_without_overwrite_keeps_an_existing_file(tmp_path):
    from fairseq.file_io import PathManager
    src, dst = save(tmp_path / "a.pt", 1.0), save(tmp_path / "b.pt", 2.0)
    before = dst.read_bytes()
    assert PathManager.copy(str(src), str(dst), overwrite=False) is False
    assert dst.read_bytes() == before


# ---- through fairseq's commands ----------------------------------------------------------------

@pytest.fixture(scope="module")
def saves(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    data, ckpt = make_toy_data(root), root / "ckpt"
    train = [data, "--user-dir", "fairseq_thor", "--cpu", "--task", "translation_thor", *MODEL,
             "--criterion", "thor_consistency", "--optimizer", "adam", "--lr", "0.003",
             "--max-tokens", "1000", "--save-dir", ckpt, "--log-format", "simple",
             "--no-epoch-checkpoints", "--save-interval-updates", "2", "--seed", "3"]
    run("fairseq-train", *train, "--max-update", "4")
    return {"data": data, "ckpt": ckpt, "train": train}


def damaged_copy(saves, tmp_path, damage):
    """A copy of the save folder whose checkpoint_last.pt is damaged by ``damage``."""
    folder = tmp_path / "ckpt"
    shutil.copytree(saves["ckpt"], folder)
    damage(folder / "checkpoint_last.pt")
    return folder


def newest_numbered(folder):
    """(path, epoch, updates) of the numbered save with the most updates."""
    saves = [(int(u), int(e), folder / f"checkpoint_{e}_{u}.pt") for e, u in
             (name[len("checkpoint_"):-len(".pt")].split("_") for name in os.listdir(folder)
              if name.count("_") == 2 and name.endswith(".pt"))]
    updates, epoch, path = max(saves)
    return path, epoch, updates


def assert_one_line_error(out, damaged, suggestion):
    lines = [line for line in out.strip().splitlines() if line.startswith("error: ")]
    assert "Traceback" not in out, out[-3000:]
    assert len(lines) == 1 and f"checkpoint {damaged} cannot be used" in lines[0], out[-3000:]
    assert f"use {suggestion} (the newest intact checkpoint beside it)" in lines[0]


@pytest.mark.cli
@pytest.mark.parametrize("damage", [flip_bytes_inside_largest_entry, truncate])
def test_generate_refuses_a_damaged_checkpoint_in_one_line(saves, tmp_path, damage):
    folder = damaged_copy(saves, tmp_path, damage)
    code, out = run("fairseq-generate", saves["data"], "--user-dir", "fairseq_thor", "--cpu",
                    "--task", "translation_thor", "--path", folder / "checkpoint_last.pt",
                    "--gen-subset", "test", "--beam", "2", check=False)
    assert code == 1
    assert_one_line_error(out, folder / "checkpoint_last.pt", newest_numbered(folder)[0])


@pytest.mark.cli
def test_resume_refuses_a_damaged_checkpoint_last_and_names_the_one_to_use(saves, tmp_path):
    folder = damaged_copy(saves, tmp_path, flip_bytes_inside_largest_entry)
    train = [str(folder) if str(a) == str(saves["ckpt"]) else a for a in saves["train"]]
    code, out = run("fairseq-train", *train, "--max-update", "6", check=False)
    newest, epoch, updates = newest_numbered(folder)
    assert code == 1 and updates == 4
    assert_one_line_error(out, folder / "checkpoint_last.pt", newest)
    # the suggested file resumes where the damaged last one was
    _, out = run("fairseq-train", *train, "--max-update", "6", "--restore-file", newest)
    assert f"Loaded checkpoint {newest} (epoch {epoch} @ 4 updates)" in out, out[-3000:]
    assert "num_updates 6" in out, out[-3000:]


@pytest.mark.cli
def test_export_refuses_a_damaged_checkpoint_in_one_line(saves, tmp_path):
    folder = damaged_copy(saves, tmp_path, truncate)
    code, out = run("fairseq-thor-export-dense", folder / "checkpoint_last.pt", "--out", tmp_path / "dense.pt",
                    check=False)
    assert code == 1 and not (tmp_path / "dense.pt").exists()
    assert_one_line_error(out, folder / "checkpoint_last.pt", newest_numbered(folder)[0])
