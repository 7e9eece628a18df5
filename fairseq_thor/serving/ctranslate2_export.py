"""``fairseq-thor-export-ctranslate2 CKPT --data-dir BIN --out DIR``: a THOR model for CTranslate2.

CTranslate2 is how fairseq translation models are usually served (int8 on CPU, float16 on GPU). Its
own fairseq converter knows stock transformers only, and reads the model's config as an
``argparse.Namespace``. So the THOR checkpoint is first made a plain transformer exactly as
``fairseq-thor-export-dense`` does (``--expert K|best|merged``, default 0: one expert of every bank,
which is THOR's ``--inference-routing fixed``), its config is given the Namespace form the converter
expects (a temporary file, never the output), and CTranslate2's ``FairseqConverter`` writes the
model: no weight is mapped by hand here. Beside the model go the decode settings that make
CTranslate2 translate like ``fairseq-generate`` (``decode_settings.py``) and, with ``--spm``, the
sentencepiece model, so ``fairseq_thor.serving.translator`` needs nothing else.

The input is CRC-checked (one-process or any file of a sharded checkpoint), gated routers are refused
like the dense export refuses them, and the folder appears whole or not at all (written beside and
renamed). Needs ``pip install fairseq_thor[serve]`` (CTranslate2).
"""
import argparse
import os
import shutil
import tempfile
from argparse import Namespace

import torch

from .. import compat
from ..distributed.consolidate import as_dict, load_any
from ..errors import ThorError
from ..export_dense import BEST, export, parse_expert, refuse_gated_routers
from ..expert_validation import expert_valid_losses
from .decode_settings import DecodeSettings

QUANTIZATIONS = ["int8", "int8_float32", "int8_float16", "int8_bfloat16", "float16", "bfloat16", "float32"]


def converter_checkpoint(dense: dict) -> dict:
    """The dense export with its config as the single Namespace CTranslate2's converter reads
    (``checkpoint["args"]``): the model's options plus the task's, under fairseq's own names."""
    options = {**as_dict(dense["cfg"]["task"]), **as_dict(dense["cfg"]["model"])}
    options.update(task=dense["cfg"]["task"]["_name"], arch=dense["cfg"]["model"]["arch"])
    options.pop("_name", None)
    return {"args": Namespace(**options), "model": dense["model"]}


def require_ctranslate2():
    try:
        import ctranslate2  # noqa: F401
        from ctranslate2.converters import FairseqConverter
    except ImportError as e:
        raise ThorError(f"CTranslate2 is not installed ({e}); pip install 'fairseq_thor[serve]' "
                        f"(or pip install ctranslate2)")
    return FairseqConverter


def export_ctranslate2(checkpoint: str, data_dir: str, out: str, expert: str = "0", quantization: str = "float32",
                       spm: str = None, settings: DecodeSettings = None) -> dict:
    """Write the CTranslate2 model of ``checkpoint`` to the folder ``out``; return what was chosen."""
    FairseqConverter = require_ctranslate2()
    if os.path.exists(out):
        raise ThorError(f"--out {out} exists; give a new folder (the export never writes over a model)")
    if spm is not None and not os.path.isfile(spm):
        raise ThorError(f"--spm {spm}: no such file (the sentencepiece model the data was encoded with)")
    state, meta = load_any(checkpoint)  # CRC-checked, consolidated if sharded
    refuse_gated_routers(state["cfg"]["model"])
    chosen = parse_expert(expert, meta["num_experts"])
    losses = None
    if chosen == BEST:
        losses = expert_valid_losses(state, data_dir)
        chosen = min(range(len(losses)), key=lambda k: losses[k])
    dense = export(state, meta["expert_tensors"], chosen)
    model_cfg = dense["cfg"]["model"]
    task_cfg = dense["cfg"]["task"]
    settings = settings or DecodeSettings()
    settings.max_source_positions = int(model_cfg.get("max_source_positions") or settings.max_source_positions)
    settings.max_target_positions = int(model_cfg.get("max_target_positions") or settings.max_target_positions)
    settings.expert = str(chosen)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    partial = tempfile.mkdtemp(prefix=os.path.basename(out) + ".", suffix=".partial", dir=parent)
    try:
        source = os.path.join(partial, "fairseq-dense.pt")  # the converter's input, removed below
        torch.save(converter_checkpoint(dense), source)
        model_dir = os.path.join(partial, "model")
        FairseqConverter(source, data_dir, source_lang=task_cfg.get("source_lang"),
                         target_lang=task_cfg.get("target_lang")).convert(model_dir, quantization=quantization)
        os.remove(source)
        if spm is not None:
            settings.sentencepiece_model = os.path.basename(spm)
            shutil.copyfile(spm, os.path.join(model_dir, settings.sentencepiece_model))
        settings.write(model_dir)
        os.replace(model_dir, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return {"expert": chosen, "losses": losses, "quantization": quantization}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="fairseq-thor-export-ctranslate2", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="THOR checkpoint (one-process, or any file of a sharded one)")
    parser.add_argument("--data-dir", required=True, help="the fairseq-preprocess folder (dictionaries)")
    parser.add_argument("--out", required=True, help="the CTranslate2 model folder to create")
    parser.add_argument("--expert", default="0", help="K (default 0), best (lowest validation loss) or merged")
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default="float32",
                        help="weight type of the saved model (default float32; int8 for CPU serving)")
    parser.add_argument("--spm", help="the sentencepiece model of the data, copied beside the model")
    defaults = DecodeSettings()
    parser.add_argument("--beam", type=int, default=defaults.beam, help="default %(default)s")
    parser.add_argument("--lenpen", type=float, default=defaults.lenpen, help="default %(default)s")
    parser.add_argument("--max-len-a", type=float, default=defaults.max_len_a, help="default %(default)s")
    parser.add_argument("--max-len-b", type=int, default=defaults.max_len_b, help="default %(default)s")
    parser.add_argument("--min-len", type=int, default=defaults.min_len, help="default %(default)s")
    args = parser.parse_args(argv)
    if args.beam < 1:
        parser.error(f"--beam must be >= 1, got {args.beam}")
    compat.allow_fairseq_checkpoint_globals()
    settings = DecodeSettings(beam=args.beam, lenpen=args.lenpen, max_len_a=args.max_len_a, max_len_b=args.max_len_b,
                              min_len=args.min_len)
    done = export_ctranslate2(args.checkpoint, args.data_dir, args.out, args.expert, args.quantization,
                              args.spm, settings)
    losses = ("" if done["losses"] is None else " (validation nll per expert: " +
              ", ".join(f"{k}: {v:.4f}" for k, v in enumerate(done["losses"])) + ")")
    print(f"wrote {args.out}: CTranslate2 {args.quantization} model of expert {done['expert']}{losses}, "
          f"decode settings beam {settings.beam}, lenpen {settings.lenpen}, max length "
          f"{settings.max_len_a} x source + {settings.max_len_b}")


if __name__ == "__main__":
    main()
