"""THOR's decoding flags on a task, and how a task applies them to the model it builds.

Shared by ``translation_thor`` and ``translation_multi_simple_epoch_thor``: ``fairseq-generate``,
``-interactive`` and ``-validate`` get no ``--arch``, so the model's own inference flags are not
parsed there and the task carries them (as the reference implementation's task did).
"""
from dataclasses import dataclass, field
from typing import Callable, Optional

from fairseq.dataclass import FairseqDataclass

from ..errors import ThorError
from ..modules.routing import InferenceRoutingChoice
from ..shared_flags import CONSISTENCY_ALPHA_HELP, DEFAULT_CONSISTENCY_ALPHA

INFERENCE_LEVELS = {0: "token", 1: "sentence"}  # the reference code's --inference-level


@dataclass
class ThorTaskFlags(FairseqDataclass):
    inference_routing: Optional[InferenceRoutingChoice] = field(
        default=None,
        metadata={"help": "how experts are used when evaluating/decoding a THOR model "
                          "(default: the checkpoint's setting, 'sentence' unless changed)"},
    )
    inference_expert: Optional[int] = field(
        default=None, metadata={"help": "expert used by --inference-routing fixed (default 0)"}
    )
    inference_level: Optional[int] = field(
        default=None,
        metadata={"help": "reference-code spelling of --inference-routing: 0 token, 1 sentence"},
    )
    eval_capacity_factor: Optional[float] = field(
        default=None,
        metadata={"help": "switch/gshard models: capacity factor when evaluating/decoding "
                          "(default: the checkpoint's setting, no cap unless changed)"},
    )
    num_experts: Optional[int] = field(
        default=None,
        metadata={"help": "experts per expert layer; when decoding, must match the checkpoint"},
    )
    consistency_alpha: float = field(
        default=DEFAULT_CONSISTENCY_ALPHA,
        metadata={"help": CONSISTENCY_ALPHA_HELP + " (read by --criterion thor_consistency)"},
    )


def requested_inference_routing(flags) -> Optional[str]:
    """The routing asked for by ``--inference-routing``/``--inference-level``, or None."""
    level = flags.inference_level
    if level is not None and level not in INFERENCE_LEVELS:
        raise ThorError(f"--inference-level must be 0 (token) or 1 (sentence), got {level}")
    by_level = INFERENCE_LEVELS.get(level)
    routing = None if flags.inference_routing is None else str(flags.inference_routing)
    if by_level is not None and routing is not None and by_level != routing:
        raise ThorError(
            f"--inference-level {level} means '{by_level}' routing but --inference-routing "
            f"is '{routing}'; give one of them"
        )
    return routing or by_level


def build_with_thor_flags(flags, model_cfg, build: Callable[[], object]):
    """Refuse a ``--num-experts`` that disagrees with the model, build it with ``build()``, then
    apply ``--inference-routing``/``--inference-level``/``--inference-expert`` and
    ``--eval-capacity-factor``."""
    wanted, found = flags.num_experts, getattr(model_cfg, "num_experts", None)
    if wanted is not None and found is not None and wanted != found:
        raise ThorError(f"--num-experts {wanted} does not match the model, which has {found} "
                         f"experts; drop --num-experts or pass {found}")
    model = build()
    routing, expert = requested_inference_routing(flags), flags.inference_expert
    if routing is not None or expert is not None:
        if not hasattr(model, "set_inference_routing"):  # thor_transformer's, asked of the model
            raise ThorError("--inference-routing / --inference-expert need a thor_transformer model")
        model.set_inference_routing(routing or model.args.inference_routing,
                                    model.args.inference_expert if expert is None else expert)
    if flags.eval_capacity_factor is not None:
        if not hasattr(model, "set_eval_capacity_factor"):
            raise ThorError("--eval-capacity-factor needs a thor_transformer model")
        model.set_eval_capacity_factor(flags.eval_capacity_factor)
    return model
