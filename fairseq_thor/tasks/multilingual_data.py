"""Data-side pieces of the multilingual THOR task: which direction each evaluation row belongs
to, and errors that name the option when ``--lang-pairs`` asks for languages that are not there."""
import os
from argparse import Namespace

import torch
from fairseq import utils
from fairseq.data import ConcatDataset
from fairseq.data.multilingual.multilingual_data_manager import MultilingualDatasetManager
from fairseq.file_io import PathManager

from ..errors import ThorError


class DirectionTaggedDataset(ConcatDataset):
    """fairseq's concatenation of per-direction eval sets whose batches name each row's direction.

    Items get their global index as ``id`` (unique across directions) and a collated batch gets
    ``lang_pair``: for each row, the index of the dataset it came from (= its ``--lang-pairs`` index).
    Sizes, order and batching are ConcatDataset's.
    """

    def __getitem__(self, idx):
        return dict(super().__getitem__(idx), id=idx)

    def collater(self, samples, **extra_args):
        batch = super().collater(samples, **extra_args)
        if "id" in batch:  # an empty list of samples collates to {}
            batch["lang_pair"] = torch.tensor(
                [self._get_dataset_and_sample_index(i)[0] for i in batch["id"].tolist()])
        return batch


def check_languages(args: Namespace):
    """Name the option when a requested language has no dictionary or is not in --langs.

    fairseq would fail later with a missing-file error or "contains languages that are not in the
    language dictionary" without saying which flag to change.
    """
    if args.lang_pairs is None:
        return  # fairseq says "--lang-pairs is required"
    pairs = args.lang_pairs.split(",") if isinstance(args.lang_pairs, str) else list(args.lang_pairs)
    for pair in pairs:
        if len(pair.split("-")) != 2 or not all(pair.split("-")):
            raise ThorError(f"--lang-pairs: '{pair}' is not of the form SRC-TGT")
    pair_langs = sorted({lang for pair in pairs for lang in pair.split("-")})
    if args.source_lang is not None or args.target_lang is not None:  # decoding one direction
        if args.source_lang is None or args.target_lang is None:
            raise ThorError("--source-lang and --target-lang must be given together")
        wanted = {"--source-lang": [args.source_lang], "--target-lang": [args.target_lang]}
    else:
        wanted = {"--lang-pairs": pair_langs}

    if args.langs or args.lang_dict:
        known, listing = MultilingualDatasetManager.load_langs(args), "--langs" if args.langs else "--lang-dict"
    else:  # fairseq infers the language list (and so the language-token ids) from --lang-pairs
        known, listing = pair_langs, "--lang-pairs"
    for option, langs in wanted.items():
        missing = [lang for lang in langs if lang not in known]
        if missing:
            raise ThorError(f"{option} names {', '.join(missing)}, which {listing} does not list "
                             f"(languages: {', '.join(known)}); add it there or fix {option}")

    if args.source_dict or args.target_dict or args.fixed_dictionary:
        return
    data = utils.split_paths(args.data)[0]
    for option, langs in wanted.items():
        for lang in langs:
            path = os.path.join(data, f"dict.{lang}.txt")
            if not PathManager.exists(path):
                raise ThorError(f"{option} names language '{lang}' but its dictionary {path} does "
                                 f"not exist; preprocess that language into {data} or fix {option}")
