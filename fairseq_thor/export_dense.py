"""``fairseq-thor-export-dense IN --out OUT``: a THOR checkpoint as a plain fairseq transformer.

Each expert bank is replaced by the average of its experts' weights (what ``--inference-routing
merged`` computes), so the result is an ordinary ``transformer`` with the same sizes, for tools that
only know dense transformers. The file loads in stock fairseq with no ``--user-dir``:

* model, task and criterion names become fairseq's own (``translation_thor`` -> ``translation``,
  ``thor_consistency`` -> ``label_smoothed_cross_entropy``) and THOR-only options are dropped;
* the config is stored as plain dictionaries, not an ``argparse.Namespace``, so torch's safe loader
  reads it without the plugin's allow-list;
* optimizer state is dropped (it belongs to the expert parameters).

IN may be a one-process THOR checkpoint or any file of an expert-sharded one. Models with a gate
(``--expert-router switch|gshard|hash``) are refused: their gate chooses between the experts, so
the average is not the model, and stock fairseq could not load the gate's weights.
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

STOCK_TASKS = {"translation_thor": "translation",
               "translation_multi_simple_epoch_thor": "translation_multi_simple_epoch"}
THOR_TASK_OPTIONS = {"inference_routing", "inference_expert", "inference_level", "num_experts",
                     "consistency_alpha"}


def merged_model(model: dict, expert_tensors) -> dict:
    return {k: (v.mean(dim=0) if k in expert_tensors else v) for k, v in model.items()}


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


def export(state: dict, expert_tensors) -> dict:
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
        "model": merged_model(state["model"], set(expert_tensors)),
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
    args = parser.parse_args(argv)
    compat.allow_fairseq_checkpoint_globals()
    state, meta = load_any(args.checkpoint)
    dense = export(state, meta["expert_tensors"])
    checkpoint_utils.torch_persistent_save(dense, args.out)
    print(f"wrote {args.out}: arch {dense['cfg']['model']['arch']}, "
          f"{len(meta['expert_tensors']) // 2} expert banks of {meta['num_experts']} merged")


if __name__ == "__main__":
    main()
