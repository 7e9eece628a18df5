"""Shared fixtures: tiny THOR models built through fairseq's own argument parsing, and make demo's
toy corpus built once for the whole test run."""
import argparse
import glob
import os
import shutil
import subprocess
import sys

import pytest
import torch
from filelock import FileLock
from fairseq import options
from fairseq.data import Dictionary
from fairseq.models import ARCH_MODEL_REGISTRY

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import fairseq_thor  # noqa: E402,F401  (registers the plugin)

TINY = [
    "--encoder-layers", "2", "--decoder-layers", "2",
    "--encoder-embed-dim", "16", "--decoder-embed-dim", "16",
    "--encoder-ffn-embed-dim", "32", "--decoder-ffn-embed-dim", "32",
    "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
    "--dropout", "0", "--attention-dropout", "0", "--activation-dropout", "0",
]


def make_dictionary(num_symbols: int = 20) -> Dictionary:
    d = Dictionary()
    for i in range(num_symbols):
        d.add_symbol(f"w{i}")
    return d


class DictTask:
    """The two attributes a transformer's build_model reads from its task."""

    def __init__(self, dictionary):
        self.source_dictionary = dictionary
        self.target_dictionary = dictionary


def parse_model_args(arch: str, extra=()) -> argparse.Namespace:
    parser = options.get_training_parser()
    return options.parse_args_and_arch(
        parser, ["unused-data", "--arch", arch, "--user-dir", fairseq_thor.__path__[0], *TINY, *extra]
    )


def build_model(arch="thor_transformer", extra=(), dictionary=None):
    args = parse_model_args(arch, extra)
    return ARCH_MODEL_REGISTRY[arch].build_model(args, DictTask(dictionary or make_dictionary()))


@pytest.fixture
def dictionary():
    return make_dictionary()


def random_batch(dictionary, batch_size=3, src_len=5, tgt_len=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    low, high = dictionary.nspecial, len(dictionary)
    src = torch.randint(low, high, (batch_size, src_len), generator=g)
    src[:, -1] = dictionary.eos()
    prev = torch.randint(low, high, (batch_size, tgt_len), generator=g)
    prev[:, 0] = dictionary.eos()
    lengths = torch.full((batch_size,), src_len, dtype=torch.long)
    return src, lengths, prev


# make demo's knobs at toy size: the GPU check's CPU rehearsal's, less its training length (each test
# sets its own); the shared corpus below is built at its vocabulary, so the rehearsal can reuse it
sys.path.insert(0, os.path.join(REPO, "benchmarks", "gpu"))
import check_steps  # noqa: E402

TOY_DEMO = {k: v for k, v in check_steps.TOY_DEMO.items() if k not in ("MAX_UPDATE", "LOG_INTERVAL")}
needs_catalogs = pytest.mark.skipif(not glob.glob("/usr/share/locale/de/LC_MESSAGES/*.mo"),
                                    reason="needs German gettext catalogs (the demo's data)")


# What every pytest-xdist worker of this test run can read: each worker has its own basetemp, under
# one parent (set by the fixture below, before any test runs)
SHARED_TMP = {}


@pytest.fixture(scope="session", autouse=True)
def shared_tmp_dir(tmp_path_factory, worker_id):
    base = tmp_path_factory.getbasetemp()
    SHARED_TMP["dir"] = base if worker_id == "master" else base.parent
    return SHARED_TMP["dir"]


def built_once(name, build):
    """The folder ``name`` in SHARED_TMP, made by ``build(folder)`` once per test run and shared by
    every pytest-xdist worker: the first caller builds it under a lock, in a staging folder renamed
    into place, so the others find it whole or absent (a build that died half-way is started over)."""
    done = SHARED_TMP["dir"] / name
    with FileLock(f"{done}.lock"):
        if not done.exists():
            staging = SHARED_TMP["dir"] / f"{name}.staging"
            shutil.rmtree(staging, ignore_errors=True)  # left by a build that died half-way
            staging.mkdir()
            build(staging)
            staging.rename(done)
    return done


def build_demo_corpus(work):
    env = dict(os.environ, WORK=str(work), DATA_ONLY="1", **TOY_DEMO,
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    proc = subprocess.run(["bash", os.path.join(REPO, "examples", "demo", "run.sh")], cwd=REPO, env=env,
                          text=True, capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"corpus ready in {work} (DATA_ONLY=1)" in proc.stdout


@pytest.fixture(scope="session")
def demo_corpus(shared_tmp_dir):
    """examples/demo/run.sh's steps 1-3 (corpus, sentencepiece, fairseq-preprocess) at the toy
    vocabulary, run once and shared by every test that runs the demo: they copy it into their own
    WORK folder, and run.sh skips what is there. Building it is most of a toy demo's time (~1 min
    here)."""
    return built_once("demo-corpus", build_demo_corpus)
