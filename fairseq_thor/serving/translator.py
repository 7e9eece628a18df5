"""Translate with a CTranslate2 export the way ``fairseq-generate`` would decode it.

    from fairseq_thor.serving.translator import Translator
    Translator("model-ct2").translate(["Datei nicht gefunden"])     # -> ["File not found"]

    python -m fairseq_thor.serving.translator model-ct2 < input.txt  # one sentence per line

The folder is what ``fairseq-thor-export-ctranslate2`` wrote: the model, ``fairseq_decoding.json``
(beam, length penalty, length limit: see ``decode_settings.py``) and, when it was given, the
sentencepiece model. Sentences are encoded with it, decoded with those settings, and the pieces
joined back into text; without a sentencepiece model the input is taken as space-separated tokens.
Each sentence gets fairseq's length limit for its own length (sentences of equal length are decoded
together). A source longer than the model's positions is refused, not cut (as the THOR task does).
"""
import argparse
import os
import sys
from collections import defaultdict
from typing import Dict, List, Optional

from ..errors import ThorError
from .decode_settings import DecodeSettings


class Translator:
    def __init__(self, model_dir: str, device: str = "cpu", compute_type: str = "default", threads: int = 1,
                 max_batch_size: int = 64, intra_threads: int = 1):
        try:
            import ctranslate2
        except ImportError as e:
            raise ThorError(f"CTranslate2 is not installed ({e}); pip install 'fairseq_thor[serve]'")
        if not os.path.isfile(os.path.join(model_dir, "model.bin")):
            raise ThorError(f"{model_dir} is not a CTranslate2 model folder (no model.bin); write one with "
                            f"fairseq-thor-export-ctranslate2")
        self.settings = DecodeSettings.read(model_dir)
        if threads < 1 or intra_threads < 0:
            raise ThorError(f"threads must be >= 1 and intra_threads >= 0 (got {threads}, {intra_threads})")
        # threads = batches decoded in parallel, each with intra_threads threads. For throughput this
        # beats threads inside one batch: on 2 CPU cores, int8, beam 5, two parallel batches of one
        # thread decoded 2.3x the sentences/s of one thread, one batch of two threads 0.45x
        # (benchmarks/serving.py; README "Serving")
        self.model = ctranslate2.Translator(model_dir, device=device, compute_type=compute_type,
                                            inter_threads=threads, intra_threads=intra_threads)
        self.max_batch_size = max_batch_size
        self.spm = None
        if self.settings.sentencepiece_model:
            import sentencepiece

            self.spm = sentencepiece.SentencePieceProcessor(
                model_file=os.path.join(model_dir, self.settings.sentencepiece_model))

    def translate_tokens(self, sources: List[List[str]]) -> List[List[str]]:
        """Target tokens for each source (tokens without EOS: the model adds it)."""
        too_long = [i for i, s in enumerate(sources) if len(s) + 1 > self.settings.max_source_positions]
        if too_long:
            raise ThorError(f"source {too_long[0]} has {len(sources[too_long[0]])} tokens, more than the "
                            f"model's {self.settings.max_source_positions - 1} (+ EOS); shorten or split it")
        by_limit: Dict[int, List[int]] = defaultdict(list)
        for i, source in enumerate(sources):
            by_limit[self.settings.max_decoding_length(len(source))].append(i)
        # every group is queued before any is awaited, so parallel translators work on several
        pending = [(indices, self.model.translate_batch(
            [sources[i] for i in indices], beam_size=self.settings.beam, length_penalty=self.settings.lenpen,
            max_decoding_length=limit, min_decoding_length=self.settings.min_len, max_input_length=0,
            max_batch_size=self.max_batch_size, asynchronous=True)) for limit, indices in by_limit.items()]
        out: List[Optional[List[str]]] = [None] * len(sources)
        for indices, results in pending:
            for i, result in zip(indices, results):
                out[i] = result.result().hypotheses[0]
        return out

    def translate(self, sentences: List[str]) -> List[str]:
        if self.spm is None:
            return [" ".join(t) for t in self.translate_tokens([s.split() for s in sentences])]
        pieces = self.translate_tokens([self.spm.encode(s, out_type=str) for s in sentences])
        # what fairseq's --remove-bpe sentencepiece does with the pieces
        return ["".join(p).replace("\u2581", " ").strip() for p in pieces]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compute-type", default="default", help="CTranslate2's (e.g. int8, float16)")
    parser.add_argument("--threads", type=int, default=1, help="batches decoded in parallel (default 1)")
    parser.add_argument("--intra-threads", type=int, default=1,
                        help="threads inside each batch (default 1; 0: CTranslate2's default)")
    args = parser.parse_args(argv)
    translator = Translator(args.model_dir, args.device, args.compute_type, args.threads,
                            intra_threads=args.intra_threads)
    lines = [line.rstrip("\n") for line in sys.stdin]
    for hypothesis in translator.translate(lines):
        print(hypothesis)


if __name__ == "__main__":
    main()
