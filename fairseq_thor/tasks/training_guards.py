"""Checks on a training command that fairseq does not make, shared by the THOR tasks.

* **A finished run stays finished.** fairseq checks ``--max-update`` only *after* an update, so
  rerunning a command whose ``checkpoint_last.pt`` already reached it trains one more update and
  overwrites ``checkpoint_last``/``_best``. The task stops before that update instead, leaving every
  checkpoint byte for byte as it was.
* **Half precision needs CUDA.** ``--fp16``/``--bf16`` without a GPU (or with ``--cpu``) fail deep
  inside torch or fairseq; refuse them when the model is built.
* **The consistency term needs its criterion.** The reference implementation computed THOR's
  consistency loss in the task, so its commands read ``--criterion label_smoothed_cross_entropy
  --consistency-alpha 5``. Here the term belongs to ``--criterion thor_consistency``, and such a
  command would silently train without it: refuse it, naming the criterion to use.
* ``--fuse-passes`` where the copies would share a draw is refused before training starts.
* The training log counts the expert FFN parameters (fairseq's own count reads 0 outside expert
  parallelism).
"""
import logging
import sys

import torch

from ..criterions.thor_consistency import ThorConsistencyCriterion, check_fusable
from ..errors import ThorError
from ..modules.experts import expert_parameter_summary
from ..shared_flags import DEFAULT_CONSISTENCY_ALPHA

logger = logging.getLogger(__name__)


def refuse_half_precision_without_cuda(args):
    """``args``: the training command's flags (fairseq's namespace for legacy models)."""
    for flag in ("fp16", "bf16"):
        if not getattr(args, flag, False):
            continue
        if getattr(args, "cpu", False):
            raise ThorError(f"--{flag} needs a CUDA device but the command has --cpu; drop --{flag} "
                            f"to train in float32 on the CPU")
        if not torch.cuda.is_available():
            raise ThorError(f"--{flag} needs a CUDA device and torch sees none; drop --{flag} to "
                            f"train in float32 on the CPU")


def consistency_alpha_given(task_flags) -> bool:
    """Whether the command set ``--consistency-alpha`` (a value other than the default, or the flag
    itself: fairseq's parsed config does not say whether a default was typed)."""
    alpha = getattr(task_flags, "consistency_alpha", DEFAULT_CONSISTENCY_ALPHA)
    return alpha != DEFAULT_CONSISTENCY_ALPHA or any(
        a == "--consistency-alpha" or a.startswith("--consistency-alpha=") for a in sys.argv)


def trains_stochastic_experts(model) -> bool:
    args = getattr(model, "args", None)
    return (getattr(args, "num_experts", 1) > 1
            and (getattr(args, "expert_router", None) or "stochastic") == "stochastic")


class TrainingGuards:
    """Task mixin: the checks above, at model and criterion building and before each update."""

    _max_update = 0  # 0: fairseq's "no bound"
    _model_for_checks = None

    def build_model(self, cfg, from_checkpoint=False):
        if not from_checkpoint:  # a training command (decoding rebuilds from the checkpoint)
            refuse_half_precision_without_cuda(cfg)
            self._max_update = getattr(cfg, "max_update", 0) or 0
        model = super().build_model(cfg, from_checkpoint)
        self._model_for_checks = model
        summary = None if from_checkpoint else expert_parameter_summary(model)
        if summary:
            logger.info(summary)
        return model

    def build_criterion(self, cfg, *args, **kwargs):  # legacy tasks take no from_checkpoint
        criterion = super().build_criterion(cfg, *args, **kwargs)
        task_flags = getattr(self, "cfg", None) or getattr(self, "args", None)
        if (not isinstance(criterion, ThorConsistencyCriterion)
                and trains_stochastic_experts(self._model_for_checks)
                and consistency_alpha_given(task_flags)):
            name = getattr(cfg, "_name", None) or getattr(cfg, "criterion", None) or type(criterion).__name__
            raise ThorError(
                f"--consistency-alpha is set but --criterion {name} does not use it, so THOR would "
                f"train without its consistency term; use --criterion thor_consistency (the "
                f"reference code computed the term in the task, here the criterion does)")
        if getattr(criterion, "fuse_passes", False) and self._model_for_checks is not None:
            check_fusable(self._model_for_checks)  # before training, not at the first step
        return criterion

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        if 0 < self._max_update <= update_num:
            logger.info(f"training already finished: the checkpoint is at update {update_num} and "
                        f"--max-update is {self._max_update}; nothing to do (raise --max-update to "
                        f"train further)")
            raise SystemExit(0)  # before the update, so no checkpoint is written
        return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)
