"""``fairseq-thor-export-dense IN --out OUT [--expert K|best|merged]``: a THOR checkpoint as a plain
fairseq transformer, to serve a model trained with experts at a dense model's cost.

What replaces each expert bank (``fc1``/``fc2`` of shape ``(E, ...)``):

* ``--expert K`` (default 0): expert K's weights. The result computes exactly what THOR computes
  with ``--inference-routing fixed --inference-expert K``; the consistency term trains every expert
  to agree with the others, so one expert keeps the model's quality (README, "Serving": every single
  expert decoded within a few tenths of BLEU of THOR's own random routing on the study's checkpoints).
* ``--expert best``: the expert with the lowest validation loss, measured on ``--data-dir``'s valid
  split (each expert's loss is printed);
* ``--expert merged``: the average of the experts' weights (``--inference-routing merged``). The
  experts' hidden units are not aligned with each other, so averaging them is not averaging
  functions: it lost 5.5 BLEU on make demo's model. Kept by name for comparison.

The file loads in stock fairseq with no ``--user-dir``:

* model, task and criterion names become fairseq's own (``translation_thor`` -> ``translation``,
  ``thor_consistency`` -> ``label_smoothed_cross_entropy``) and THOR-only options are dropped;
* the config is stored as plain dictionaries, not an ``argparse.Namespace``, so torch's safe loader
  reads it without the plugin's allow-list;
* optimizer state is dropped (it belongs to the expert parameters).

IN may be a one-process THOR checkpoint or any file of an expert-sharded one (CRC-checked); OUT is
written atomically. Models with a gate (``--expert-router switch|gshard|hash``) are refused: their
gate chooses between the experts, so no single expert nor their average is the model, and stock
fairseq could not load the gate's weights.
"""
import argparse
import dataclasses

from fairseq import checkpoint_utils
from fairseq.criterions.label_smoothed_cross_entropy import LabelSmoothedCrossEntropyCriterionConfig
from fairseq.models import ARCH_MODEL_REGISTRY
from fairseq.tasks.translation import TranslationConfig

from . import compat
from .distributed.consolidate import as_dict, load_any
from .errors import ThorError
from .expert_validation import expert_valid_losses

STOCK_TASKS = {"translation_thor": "translation",
               "translation_multi_simple_epoch_thor": "translation_multi_simple_epoch"}
THOR_TASK_OPTIONS = {"inference_routing", "inference_expert", "inference_level", "num_experts",
                     "consistency_alpha"}


MERGED, BEST = "merged", "best"


def dense_weights(model: dict, expert_tensors, expert) -> dict:
    """``model`` with every expert bank replaced by expert ``expert``'s weights, or by the experts'
    mean for ``"merged"``."""
    if expert == MERGED:
        return {k: (v.mean(dim=0) if k in expert_tensors else v) for k, v in model.items()}
    return {k: (v[expert].clone() if k in expert_tensors else v) for k, v in model.items()}


def parse_expert(value: str, num_experts: int):
    """``--expert``'s value: an expert index, ``best`` or ``merged``; anything else is refused with
    the valid choices."""
    if value in (MERGED, BEST):
        return value
    if value.isdigit() and int(value) < num_experts:
        return int(value)
    raise ThorError(f"--expert {value}: expected an expert index 0..{num_experts - 1}, 'best' (the lowest "
                    f"validation loss, needs --data-dir) or 'merged' (the experts' average)")


def dense_model_config(model_cfg) -> dict:
    cfg = as_dict(model_cfg)
    arch = cfg.get("arch", "thor_transformer")
    dense_arch = arch.replace("thor_transformer", "transformer", 1)
    if ARCH_MODEL_REGISTRY.get(dense_arch) is None or ARCH_MODEL_REGISTRY[dense_arch].__name__ != "TransformerModel":
        dense_arch = "transformer"  # every size option is stored explicitly, so the name is enough
    cfg.update(arch=dense_arch, _name=dense_arch)
    for thor_option in ("num_experts", "encoder_expert_layers", "decoder_expert_layers",
                        "encoder_expert_ffn_dim", "decoder_expert_ffn_dim", "expert_routing",
                        "inference_routing", "inference_expert", "expert_parallel",
                        "consistency_alpha"):
        cfg.pop(thor_option, None)
    return cfg


def stock_section(section, name_map, known_fields=None, drop=()):
    cfg = as_dict(section)
    name = name_map.get(cfg.get("_name"), cfg.get("_name"))
    cfg["_name"] = name
    if known_fields is not None:
        cfg = {k: v for k, v in cfg.items() if k in known_fields or k == "_name"}
    return {k: v for k, v in cfg.items() if k not in drop}


def refuse_gated_routers(model_cfg):
    router = as_dict(model_cfg).get("expert_router") or "stochastic"
    if router != "stochastic":
        raise ThorError(
            f"this checkpoint is a --expert-router {router} model: its gate chooses between the "
            f"experts, so averaging them would not give the model, and stock fairseq cannot load "
            f"the gate. fairseq-thor-export-dense exports THOR (stochastic router) models only; "
            f"decode a {router} model with --user-dir fairseq_thor")


def export(state: dict, expert_tensors, expert=0) -> dict:
    """The dense checkpoint of ``state`` with ``expert`` (an index or ``"merged"``) in place of
    every expert bank."""
    refuse_gated_routers(state["cfg"]["model"])
    cfg = dict(state["cfg"])
    cfg["model"] = dense_model_config(cfg["model"])
    task = as_dict(cfg["task"])
    if task.get("_name") == "translation_thor":
        fields = {f.name for f in dataclasses.fields(TranslationConfig)}
        cfg["task"] = stock_section(task, STOCK_TASKS, fields)
    else:
        cfg["task"] = stock_section(task, STOCK_TASKS, drop=THOR_TASK_OPTIONS)
    criterion = as_dict(cfg.get("criterion"))
    if criterion.get("_name") == "thor_consistency":
        fields = {f.name for f in dataclasses.fields(LabelSmoothedCrossEntropyCriterionConfig)}
        cfg["criterion"] = stock_section(criterion, {"thor_consistency": "label_smoothed_cross_entropy"},
                                         fields)
    return {
        "args": None,
        "cfg": cfg,
        "model": dense_weights(state["model"], set(expert_tensors), expert),
        "optimizer_history": [{k: v for k, v in h.items() if k != "optimizer_state"}
                              for h in state.get("optimizer_history", [])],
        "extra_state": {k: v for k, v in state.get("extra_state", {}).items()
                        if k in ("epoch", "val_loss", "best")},
    }


def main(argv=None):
    parser = argparse.ArgumentParser(prog="fairseq-thor-export-dense", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="THOR checkpoint (one-process, or any file of a sharded one)")
    parser.add_argument("--out", required=True, help="the dense fairseq transformer checkpoint to write")
    parser.add_argument("--expert", default="0",
                        help="K (expert K of every bank; default 0), best (lowest validation loss on "
                             "--data-dir) or merged (the experts' average)")
    parser.add_argument("--data-dir", help="binarized data whose valid split --expert best scores")
    args = parser.parse_args(argv)
    compat.allow_fairseq_checkpoint_globals()
    state, meta = load_any(args.checkpoint)
    refuse_gated_routers(state["cfg"]["model"])
    expert = parse_expert(args.expert, meta["num_experts"])
    chosen = ""
    if expert == BEST:
        if not args.data_dir:
            raise ThorError("--expert best scores each expert on a validation split: give --data-dir "
                            "(the fairseq-preprocess folder the model was trained on)")
        losses = expert_valid_losses(state, args.data_dir)
        expert = min(range(len(losses)), key=lambda k: losses[k])
        chosen = (" (validation nll per expert: " + ", ".join(f"{k}: {loss:.4f}" for k, loss in enumerate(losses))
                  + ")")
    dense = export(state, meta["expert_tensors"], expert)
    checkpoint_utils.torch_persistent_save(dense, args.out)  # atomic: temporary file, then rename
    what = "the experts' average" if expert == MERGED else f"expert {expert}"
    layers = sum(1 for name in meta["expert_tensors"] if name.endswith("fc1.weight"))
    print(f"wrote {args.out}: arch {dense['cfg']['model']['arch']}, {what} in each of {layers} expert "
          f"layers ({meta['num_experts']} experts){chosen}")


if __name__ == "__main__":
    main()
