"""``--criterion thor_consistency``: label-smoothed CE on two stochastic passes + alpha x symmetric KL.

In training the model runs twice on the same batch; each pass draws its own experts, so the two
predictions differ and the regulariser pulls them together. Evaluation (validation) uses a single
pass and is exactly fairseq's label-smoothed cross-entropy. Works with any translation task.

``--consistency-alpha-warmup-updates N`` ramps the weight from 0 to alpha over the first N updates
(the full weight slows early fitting; see the README). fairseq hands the update number to the
task's ``train_step``, not to the criterion, so the ramp needs a THOR task, which passes it on
(``set_num_updates``).

``--fuse-passes`` computes the two passes as one forward over the batch stacked with itself.

The loss is computed from the two passes' logits in one piece (modules/two_pass_loss: a few
vocabulary-sized tensors where the autograd composition makes about twenty); models whose
log-probabilities are not a log-softmax of their output (adaptive softmax) take the composed path.
"""
import math
from dataclasses import dataclass, field

import torch
from fairseq import metrics, utils
from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
    label_smoothed_nll_loss,
)

from ..errors import ThorError
from ..modules.consistency import symmetric_kl
from ..modules.two_pass_loss import label_smoothed, log_probs_are_log_softmax, two_pass_losses
from ..shared_flags import CONSISTENCY_ALPHA_HELP, DEFAULT_CONSISTENCY_ALPHA, add_dataclass_args_once
from .router_stats import collect_decisions, draw_balance_log, reduce_draw_balance


def consistency_weight(alpha: float, warmup_updates: int, num_updates: int) -> float:
    """The weight of the KL term at update ``num_updates`` (0 for the first update):
    ``alpha * min(1, num_updates / warmup_updates)``, or ``alpha`` when ``warmup_updates`` is 0."""
    if warmup_updates == 0:
        return alpha
    return alpha * min(1.0, num_updates / warmup_updates)


def check_schedule(alpha, warmup_updates) -> None:
    """Refuse a weight or warm-up fairseq's parser lets through (``nan``, ``inf``) or a caller passes."""
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 <= alpha < math.inf:
        raise ThorError(f"--consistency-alpha must be >= 0 and finite (0 <= A < inf), got {alpha}")
    if not isinstance(warmup_updates, int) or isinstance(warmup_updates, bool) or warmup_updates < 0:
        raise ThorError("--consistency-alpha-warmup-updates must be a whole number of updates >= 0 "
                         f"(0 = no warm-up), got {warmup_updates!r}")




@dataclass
class ThorConsistencyConfig(LabelSmoothedCrossEntropyCriterionConfig):
    consistency_alpha: float = field(
        default=DEFAULT_CONSISTENCY_ALPHA, metadata={"help": CONSISTENCY_ALPHA_HELP}
    )
    fuse_passes: bool = field(
        default=False,
        metadata={"help": "run the two stochastic passes as one forward over the batch stacked with "
                          "itself (R-Drop's trick): the same objective, since each copy of a sentence "
                          "draws its own experts and dropout; fewer, larger operations. Needs "
                          "--expert-routing sentence or token, and no --expert-parallel"},
    )
    consistency_alpha_warmup_updates: int = field(
        default=0,
        metadata={"help": "ramp the consistency weight linearly from 0 at the first update to "
                          "--consistency-alpha at update N, then keep it (weight = alpha * "
                          "min(1, update / N)); 0 uses --consistency-alpha from the start. Needs "
                          "--task translation_thor or translation_multi_simple_epoch_thor"},
    )


FUSABLE_ROUTING = ("sentence", "token")


def check_fusable(model):
    """Fusing is the same objective only where each copy of a sentence draws on its own."""
    args = getattr(model, "args", None)
    routing = getattr(args, "expert_routing", "sentence")
    if getattr(args, "expert_parallel", False):
        raise ThorError("--fuse-passes is not available with --expert-parallel: its balanced draw "
                        "over the stacked batch would tie the two copies' experts together")
    if getattr(args, "num_experts", 1) > 1 and routing not in FUSABLE_ROUTING:
        raise ThorError(f"--fuse-passes needs --expert-routing sentence or token, got {routing}: one "
                        f"draw per batch would give both copies the same expert, so the passes "
                        f"would no longer differ; drop --fuse-passes")


def two_fused_passes(model, sample):
    """Both stochastic passes from one forward over the batch stacked with itself, split back
    into two ``net_output`` tuples (logits first, the rest shared: the criterion reads logits)."""
    check_fusable(model)
    batch = sample["target"].size(0)
    stacked = {k: torch.cat([v, v]) if torch.is_tensor(v) and v.dim() > 0 and v.size(0) == batch else v
               for k, v in sample["net_input"].items()}
    logits, extra = model(**stacked)[:2]
    return [(logits[:batch], extra), (logits[batch:], extra)]


@register_criterion("thor_consistency", dataclass=ThorConsistencyConfig)
class ThorConsistencyCriterion(LabelSmoothedCrossEntropyCriterion):
    def __init__(self, task, sentence_avg, label_smoothing, consistency_alpha,
                 consistency_alpha_warmup_updates=0, fuse_passes=False, ignore_prefix_size=0,
                 report_accuracy=False):
        super().__init__(task, sentence_avg, label_smoothing,
                         ignore_prefix_size=ignore_prefix_size, report_accuracy=report_accuracy)
        check_schedule(consistency_alpha, consistency_alpha_warmup_updates)
        self.alpha = consistency_alpha
        self.warmup_updates = consistency_alpha_warmup_updates
        self.fuse_passes = fuse_passes
        self.num_updates = None  # set by the task before each training step

    def set_num_updates(self, num_updates: int):
        """fairseq's update number (the trainer's count, restored on resume), from the task."""
        self.num_updates = num_updates

    def current_alpha(self) -> float:
        if self.warmup_updates and self.num_updates is None:
            raise ThorError(
                "--consistency-alpha-warmup-updates needs the update number, which fairseq gives the "
                "task, not the criterion: train with --task translation_thor or "
                "translation_multi_simple_epoch_thor (they pass it on)")
        return consistency_weight(self.alpha, self.warmup_updates, self.num_updates or 0)

    @classmethod
    def add_args(cls, parser):
        # translation_thor also accepts --consistency-alpha (see shared_flags)
        add_dataclass_args_once(parser, ThorConsistencyConfig())

    def forward(self, model, sample, reduce=True):
        if not model.training:
            return super().forward(model, sample, reduce=reduce)

        passes = two_fused_passes(model, sample) if self.fuse_passes else [
            model(**sample["net_input"]) for _ in range(2)]
        if collect_decisions(model):
            raise ThorError("--criterion thor_consistency trains THOR's stochastic router; train "
                             "--expert-router switch/gshard/hash with "
                             "--criterion moe_label_smoothed_cross_entropy (adds their aux loss)")
        if log_probs_are_log_softmax(model):
            losses, nll_losses, consistency = self.terms_from_logits(model, passes, sample, reduce)
        else:
            losses, nll_losses, consistency = self.terms_from_log_probs(model, passes, sample, reduce)
        alpha = self.current_alpha()
        loss = losses[0] + losses[1] + alpha * consistency

        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        logging_output = {
            "loss": loss.data,
            "nll_loss": (0.5 * (nll_losses[0] + nll_losses[1])).data,  # per pass, like dense
            "consistency": consistency.data,
            # x ntokens: logging outputs are summed over micro-batches and workers
            "consistency_alpha": alpha * sample["ntokens"],
            "ntokens": sample["ntokens"],
            "nsentences": sample["target"].size(0),
            "sample_size": sample_size,
            **draw_balance_log(model),  # expert_load_max of THOR's draws
        }
        if self.report_accuracy:
            n_correct, total = self.compute_accuracy(model, passes[0], sample)
            logging_output["n_correct"] = utils.item(n_correct.data)
            logging_output["total"] = utils.item(total.data)
        return loss, sample_size, logging_output

    def terms_from_logits(self, model, passes, sample, reduce):
        """The two label-smoothed CEs (and their nll parts) and the consistency, computed in one
        piece from the logits (see modules/two_pass_loss: a fraction of the memory traffic)."""
        target = model.get_targets(sample, passes[0])
        logits = [net_output[0] for net_output in passes]
        if self.ignore_prefix_size > 0:
            target = target[:, self.ignore_prefix_size:]
            logits = [lg[:, self.ignore_prefix_size:, :] for lg in logits]
        terms = two_pass_losses(logits[0], logits[1], target, self.padding_idx)
        vocab = logits[0].size(-1)
        finish = (lambda t: t.sum()) if reduce else (lambda t: t.unsqueeze(-1))  # fairseq's shapes
        losses = [finish(label_smoothed(nll, smooth, self.eps, vocab))
                  for nll, smooth in ((terms.nll1, terms.smooth1), (terms.nll2, terms.smooth2))]
        return losses, [finish(terms.nll1), finish(terms.nll2)], finish(terms.kl)

    def terms_from_log_probs(self, model, passes, sample, reduce):
        """The same terms from the model's log-probabilities, for models whose log-probabilities
        are not a log-softmax of their output (adaptive softmax, a custom get_normalized_probs)."""
        lprobs, losses, nll_losses = [], [], []
        for net_output in passes:
            lp, target = self.get_lprobs_and_target(model, net_output, sample)  # (N, V), (N,)
            loss, nll_loss = label_smoothed_nll_loss(
                lp, target, self.eps, ignore_index=self.padding_idx, reduce=reduce
            )
            lprobs.append(lp)
            losses.append(loss)
            nll_losses.append(nll_loss)
        consistency = symmetric_kl(lprobs[0], lprobs[1], target.eq(self.padding_idx), reduce=reduce)
        if not reduce:
            consistency = consistency.view_as(losses[0])
        return losses, nll_losses, consistency

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        reduce_draw_balance(logging_outputs)
        if any("consistency" in log for log in logging_outputs):
            consistency = sum(log.get("consistency", 0) for log in logging_outputs)
            ntokens = sum(log.get("ntokens", 0) for log in logging_outputs)
            # symmetric KL per target token, in bits like fairseq's losses
            metrics.log_scalar("consistency", consistency / ntokens / math.log(2), ntokens, round=4)
            if ntokens > 0:  # the weight the KL term had (ramps under a warm-up)
                alpha = sum(log.get("consistency_alpha", 0) for log in logging_outputs)
                metrics.log_scalar("consistency_alpha", alpha / ntokens, ntokens, round=4)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
