"""Shared fixtures: tiny THOR models built through fairseq's own argument parsing."""
import argparse
import os

import pytest
import torch
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
