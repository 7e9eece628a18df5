"""``--task translation_thor``: fairseq's bilingual translation task plus THOR's decoding flags.

* ``--inference-routing`` / ``--inference-expert`` choose how experts are used by
  ``fairseq-generate``, ``fairseq-interactive``, ``fairseq-validate`` and BLEU validation
  (those commands get no ``--arch``, so the model's own flags are not parsed there).
* Commands written for the reference implementation keep working: ``--inference-level`` (0 token,
  1 sentence), ``--num-experts`` (checked against the checkpoint) and ``--consistency-alpha``
  (used by the THOR criterion in training, accepted and unused when decoding).
* Every sentence of a validation or test split is evaluated: fairseq's ``batch_by_size`` drops a
  final batch whose size is not a multiple of ``--required-batch-size-multiple`` (default 8), so
  outside training this task asks for a multiple of 1.
BLEU validation is fairseq's (``--eval-bleu``, ``--eval-bleu-remove-bpe sentencepiece``, ...).
"""
from dataclasses import dataclass, field
from typing import Optional

from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask

from ..criterions.thor_consistency import CONSISTENCY_ALPHA_HELP, DEFAULT_CONSISTENCY_ALPHA
from ..models.thor_transformer import ThorTransformerModel
from ..modules.routing import InferenceRoutingChoice
from ..shared_flags import add_dataclass_args_once

INFERENCE_LEVELS = {0: "token", 1: "sentence"}  # the reference code's --inference-level


@dataclass
class ThorTranslationConfig(TranslationConfig):
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
    num_experts: Optional[int] = field(
        default=None,
        metadata={"help": "experts per expert layer; when decoding, must match the checkpoint"},
    )
    consistency_alpha: float = field(
        default=DEFAULT_CONSISTENCY_ALPHA,
        metadata={"help": CONSISTENCY_ALPHA_HELP + " (read by --criterion thor_consistency)"},
    )


@register_task("translation_thor", dataclass=ThorTranslationConfig)
class ThorTranslationTask(TranslationTask):
    cfg: ThorTranslationConfig

    @classmethod
    def add_args(cls, parser):
        # the model (in training) and the criterion also register some of these flags
        add_dataclass_args_once(parser, ThorTranslationConfig())

    def inference_routing(self) -> Optional[str]:
        """The routing asked for by this task's flags, or None to keep the model's."""
        level = self.cfg.inference_level
        if level is not None and level not in INFERENCE_LEVELS:
            raise ValueError(f"--inference-level must be 0 (token) or 1 (sentence), got {level}")
        by_level = INFERENCE_LEVELS.get(level)
        routing = self.cfg.inference_routing
        routing = None if routing is None else str(routing)
        if by_level is not None and routing is not None and by_level != routing:
            raise ValueError(
                f"--inference-level {level} means '{by_level}' routing but --inference-routing "
                f"is '{routing}'; give one of them"
            )
        return routing or by_level

    def build_model(self, cfg, from_checkpoint=False):
        wanted_experts = self.cfg.num_experts
        found_experts = getattr(cfg, "num_experts", None)
        if wanted_experts is not None and found_experts is not None and wanted_experts != found_experts:
            raise ValueError(
                f"--num-experts {wanted_experts} does not match the model, which has "
                f"{found_experts} experts; drop --num-experts or pass {found_experts}"
            )
        model = super().build_model(cfg, from_checkpoint)
        routing, expert = self.inference_routing(), self.cfg.inference_expert
        if routing is not None or expert is not None:
            if not isinstance(model, ThorTransformerModel):
                raise ValueError("--inference-routing / --inference-expert need a thor_transformer model")
            model.set_inference_routing(routing or model.args.inference_routing,
                                        model.args.inference_expert if expert is None else expert)
        return model

    def get_batch_iterator(self, dataset, **kwargs):
        if dataset is not self.datasets.get(self.cfg.train_subset):
            kwargs["required_batch_size_multiple"] = 1  # evaluate every sentence (see docstring)
        return super().get_batch_iterator(dataset, **kwargs)
