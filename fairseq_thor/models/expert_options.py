"""THOR's model options: how many experts, which layers carry them, how inputs are routed.

The options live on the model (``fairseq-train --arch thor_*`` parses them) and are saved with the
checkpoint. The inference options can be changed at decoding time through the task flags of
``translation_thor`` or ``--model-overrides``.
"""
import argparse
import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import FrozenSet, Optional

from omegaconf import OmegaConf, open_dict

from ..errors import ThorError
from ..modules.routing import INFERENCE_ROUTING, TRAIN_ROUTING

# "stochastic" is THOR. The others are the baselines THOR is compared with (Zuo et al., Sec. 5):
# Switch top-1 and GShard top-2 learned gates (load-balancing loss, capacity) and hash routing.
ROUTERS = ["stochastic", "switch", "gshard", "hash"]

# Defaults shared by every THOR architecture. E = 2, experts in every other layer and
# sentence-level inference follow the paper's IWSLT setting; training routing is per sentence,
# which gives every expert gradient from every batch (the reference draws one expert per batch,
# still available as --expert-routing batch).
DEFAULT_NUM_EXPERTS = 2
DEFAULT_EXPERT_LAYERS = "alternate"
DEFAULT_TRAIN_ROUTING = "sentence"
DEFAULT_INFERENCE_ROUTING = "sentence"

EXPERT_LAYERS_HELP = (
    "which layers carry experts: 'alternate' (0, 2, 4, ...: every other layer starting with the "
    "first, as in the paper), 'all', 'none', 'every-N' (0, N, 2N, ...) or a comma-separated list "
    "of 0-based layer indices such as '1,3'"
)
EVAL_CAPACITY_HELP = (
    "switch/gshard: the --capacity-factor used when evaluating and decoding (validation, "
    "fairseq-generate/-interactive/-validate); default: no cap, so no token is dropped outside "
    "training"
)


def add_expert_args(parser: argparse.ArgumentParser):
    """Model flags. Defaults are set by the architecture functions (fairseq's legacy pattern)."""
    group = parser.add_argument_group("THOR experts")
    group.add_argument("--num-experts", type=int, metavar="E",
                       help=f"experts per expert layer, E >= 1; E = 1 is a dense transformer "
                            f"(default {DEFAULT_NUM_EXPERTS})")
    group.add_argument("--encoder-expert-layers", metavar="SPEC",
                       help=f"encoder {EXPERT_LAYERS_HELP} (default {DEFAULT_EXPERT_LAYERS})")
    group.add_argument("--decoder-expert-layers", metavar="SPEC",
                       help=f"decoder {EXPERT_LAYERS_HELP} (default {DEFAULT_EXPERT_LAYERS})")
    group.add_argument("--encoder-expert-ffn-dim", type=int, metavar="N",
                       help="hidden width of each encoder expert FFN "
                            "(default: --encoder-ffn-embed-dim)")
    group.add_argument("--decoder-expert-ffn-dim", type=int, metavar="N",
                       help="hidden width of each decoder expert FFN "
                            "(default: --decoder-ffn-embed-dim)")
    group.add_argument("--expert-routing", choices=TRAIN_ROUTING,
                       help="how experts are drawn in training: one per batch, per sentence or "
                            f"per token (default {DEFAULT_TRAIN_ROUTING})")
    group.add_argument("--expert-router", choices=ROUTERS,
                       help="who picks the expert: 'stochastic' (THOR, random), or the baselines "
                            "'switch' (learned top-1 gate), 'gshard' (learned top-2 gate, "
                            "fairscale's), 'hash' (fixed token id -> expert); gated routers add "
                            "their load-balancing loss through the criterion (default stochastic)")
    group.add_argument("--capacity-factor", type=float, metavar="F",
                       help="switch/gshard: each expert takes at most F x (its even share) of the "
                            "tokens, the rest are dropped (residual only); applies in training "
                            "(default 1.0)")
    group.add_argument("--eval-capacity-factor", type=float, metavar="F", help=EVAL_CAPACITY_HELP)
    group.add_argument("--expert-parallel", action="store_true", default=None,
                       help="shard the experts of every expert layer over the W training processes "
                            "(E/W each, exchanged with fairscale's all-to-all MOELayer); needs "
                            "fairseq-thor-train, --ddp-backend legacy_ddp and W dividing "
                            "--num-experts. Checkpoints are saved per rank; consolidate them with "
                            "fairseq-thor-consolidate to decode on one device")
    add_inference_args(group)


def add_inference_args(group, default=None):
    """The inference flags, shared by the model and the ``translation_thor`` task."""
    group.add_argument("--inference-routing", choices=INFERENCE_ROUTING, default=default,
                       help="how experts are used in evaluation and decoding: a random expert "
                            "per sentence or per token (or one per batch), a fixed expert "
                            "(--inference-expert), the mean of all experts' outputs (E times the "
                            "FFN cost), one FFN with the experts' weights averaged, or 'path': "
                            "a random expert per sentence shared by every layer, with batches "
                            "grouped by it so decoding costs one FFN per layer for any E "
                            f"(default {DEFAULT_INFERENCE_ROUTING})")
    group.add_argument("--inference-expert", type=int, metavar="K", default=default,
                       help="the expert used by --inference-routing fixed, 0 <= K < E (default 0)")


# Every THOR model option and its default, in one place: the argparse flags above, checkpoints from
# before an option existed and hydra configs (which skip argparse) are all completed from here.
EXPERT_DEFAULTS = {
    "num_experts": DEFAULT_NUM_EXPERTS,
    "encoder_expert_layers": DEFAULT_EXPERT_LAYERS,
    "decoder_expert_layers": DEFAULT_EXPERT_LAYERS,
    "encoder_expert_ffn_dim": None,
    "decoder_expert_ffn_dim": None,
    "expert_routing": DEFAULT_TRAIN_ROUTING,
    "inference_routing": DEFAULT_INFERENCE_ROUTING,
    "inference_expert": 0,
    "expert_parallel": False,
    "expert_router": "stochastic",
    "capacity_factor": 1.0,
    "eval_capacity_factor": None,  # no cap: evaluation drops no token
}


def set_expert_defaults(args):
    """Fill THOR defaults the fairseq way: keep what the user (or the checkpoint) set. Under
    fairseq-hydra-train an architecture function gets an omegaconf DictConfig: opened for it."""
    with open_dict(args) if OmegaConf.is_config(args) else nullcontext():
        for name, default in EXPERT_DEFAULTS.items():
            if getattr(args, name, None) is None:
                setattr(args, name, default)


def as_namespace(args) -> argparse.Namespace:
    """The model options as the Namespace fairseq-train gives: fairseq-hydra-train gives a
    DictConfig, from which ``TransformerConfig.from_namespace`` would drop every option it does not
    declare (THOR's), as it reads the extra options of a Namespace only."""
    if OmegaConf.is_config(args):
        return argparse.Namespace(**OmegaConf.to_container(args, resolve=True))
    return args


def parse_expert_layers(spec: str, num_layers: int, option: str) -> FrozenSet[int]:
    """Turn an expert-layer SPEC into the set of 0-based layer indices; errors name ``option``."""
    spec = str(spec).strip().lower()
    if not spec.strip(", "):  # "" would otherwise mean "no expert layer" without saying so
        raise ThorError(f"{option} is empty; {EXPERT_LAYERS_HELP} ('none' for no expert layer)")
    if spec == "alternate":
        return frozenset(range(0, num_layers, 2))
    if spec == "all":
        return frozenset(range(num_layers))
    if spec == "none":
        return frozenset()
    if spec.startswith("every-"):
        step = spec[len("every-"):]
        if not step.isdigit() or int(step) < 1:
            raise ThorError(f"{option} {spec!r}: 'every-N' needs a positive integer N")
        return frozenset(range(0, num_layers, int(step)))
    try:
        indices = [int(tok) for tok in spec.split(",") if tok.strip()]
    except ValueError:
        raise ThorError(f"{option} {spec!r} is not valid; {EXPERT_LAYERS_HELP}") from None
    bad = [i for i in indices if not 0 <= i < num_layers]
    if bad:
        raise ThorError(
            f"{option} {spec!r}: layer index {bad[0]} is out of range; the model has "
            f"{num_layers} layers, so valid indices are 0..{num_layers - 1}"
        )
    return frozenset(indices)


@dataclass(frozen=True)
class ExpertSpec:
    """What an expert layer needs to know; one per encoder or decoder."""

    num_experts: int
    layers: FrozenSet[int]
    ffn_dim: Optional[int]
    train_routing: str
    inference_routing: str
    inference_expert: int
    expert_parallel: bool = False
    router: str = "stochastic"
    capacity_factor: float = 1.0
    eval_capacity_factor: Optional[float] = None
    vocab_size: int = 0  # hash routing's table size, set by the encoder/decoder

    @classmethod
    def from_cfg(cls, cfg, side: str) -> "ExpertSpec":
        """Read ``side`` ('encoder' or 'decoder') options from a fairseq model config."""
        validate_expert_args(cfg)
        num_layers = getattr(cfg, side).layers
        return cls(
            num_experts=cfg.num_experts,
            layers=parse_expert_layers(
                getattr(cfg, f"{side}_expert_layers"), num_layers, f"--{side}-expert-layers"
            ),
            ffn_dim=getattr(cfg, f"{side}_expert_ffn_dim"),
            train_routing=cfg.expert_routing,
            inference_routing=cfg.inference_routing,
            inference_expert=cfg.inference_expert,
            expert_parallel=bool(getattr(cfg, "expert_parallel", False)),
            router=getattr(cfg, "expert_router", None) or "stochastic",
            capacity_factor=_unless_none(getattr(cfg, "capacity_factor", None), 1.0),
            eval_capacity_factor=getattr(cfg, "eval_capacity_factor", None),
        )

    def has_experts(self, layer_index: int) -> bool:
        return self.num_experts > 1 and layer_index in self.layers


def _unless_none(value, default):
    return default if value is None else value


def validate_expert_args(cfg):
    """Clear errors for impossible THOR settings, naming the flag and what is valid."""
    if cfg.num_experts < 1:
        raise ThorError(f"--num-experts must be >= 1 (1 gives a dense transformer), got {cfg.num_experts}")
    for side in ("encoder", "decoder"):
        dim = getattr(cfg, f"{side}_expert_ffn_dim")
        if dim is not None and dim < 1:
            raise ThorError(f"--{side}-expert-ffn-dim must be a positive width, got {dim}")
        if dim is not None and cfg.num_experts == 1:
            raise ThorError(
                f"--{side}-expert-ffn-dim needs --num-experts > 1; a one-expert model is dense, "
                f"so set --{side}-ffn-embed-dim instead"
            )
    router = getattr(cfg, "expert_router", None) or "stochastic"
    if router not in ROUTERS:
        raise ThorError(f"--expert-router {router!r}; valid: {', '.join(ROUTERS)}")
    validate_capacity_factor("--capacity-factor", getattr(cfg, "capacity_factor", None))
    validate_eval_capacity_factor(getattr(cfg, "eval_capacity_factor", None))
    if getattr(cfg, "expert_parallel", False) and cfg.num_experts < 2:
        raise ThorError("--expert-parallel needs --num-experts >= 2 (a one-expert model is dense)")
    if cfg.expert_routing not in TRAIN_ROUTING:
        raise ThorError(f"--expert-routing {cfg.expert_routing!r}; valid: {', '.join(TRAIN_ROUTING)}")
    validate_inference(cfg)


def validate_capacity_factor(option: str, factor: Optional[float], unset: str = ""):
    """A capacity factor is a finite number > 0 (None: the flag is unset)."""
    if factor is not None and not (math.isfinite(factor) and factor > 0):
        raise ThorError(f"{option} must be a finite number > 0 (0 < F < inf), got {factor}{unset}")


def validate_eval_capacity_factor(factor: Optional[float]):
    validate_capacity_factor("--eval-capacity-factor", factor,
                             "; leave it unset to drop no token when evaluating")


def validate_inference(cfg):
    """``cfg``: anything with num_experts, inference_routing and inference_expert."""
    if cfg.inference_routing not in INFERENCE_ROUTING:
        raise ThorError(
            f"--inference-routing {cfg.inference_routing!r}; valid: {', '.join(INFERENCE_ROUTING)}"
        )
    if not 0 <= cfg.inference_expert < cfg.num_experts:
        raise ThorError(
            f"--inference-expert {cfg.inference_expert} is out of range for a model with "
            f"{cfg.num_experts} experts; valid: 0..{cfg.num_experts - 1}"
        )
    if getattr(cfg, "expert_parallel", False) and cfg.inference_routing in ("mean", "merged", "path"):
        raise ThorError(
            f"--inference-routing {cfg.inference_routing} needs every expert in one process; an "
            f"--expert-parallel model validates with sentence, token, batch or fixed routing. "
            f"Consolidate the checkpoint (fairseq-thor-consolidate) to decode with it"
        )
