"""``--criterion thor_consistency``: label-smoothed CE on two stochastic passes + alpha x symmetric KL.

In training the model runs twice on the same batch; each pass draws its own experts, so the two
predictions differ and the regulariser pulls them together. Evaluation (validation) uses a single
pass and is exactly fairseq's label-smoothed cross-entropy. Works with any translation task.
"""
import math
from dataclasses import dataclass, field

from fairseq import metrics, utils
from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
    label_smoothed_nll_loss,
)

from ..modules.consistency import symmetric_kl
from .router_stats import collect_decisions
from ..shared_flags import add_dataclass_args_once

# Measured on the demo's budget (see README): the paper's alpha = 5 slows fitting in short runs.
DEFAULT_CONSISTENCY_ALPHA = 1.0
CONSISTENCY_ALPHA_HELP = (
    "weight of the symmetric KL between the two stochastic passes (THOR's consistency "
    "regulariser); 0 trains on the two cross-entropies alone (the paper uses 5 for IWSLT)"
)


@dataclass
class ThorConsistencyConfig(LabelSmoothedCrossEntropyCriterionConfig):
    consistency_alpha: float = field(
        default=DEFAULT_CONSISTENCY_ALPHA, metadata={"help": CONSISTENCY_ALPHA_HELP}
    )


@register_criterion("thor_consistency", dataclass=ThorConsistencyConfig)
class ThorConsistencyCriterion(LabelSmoothedCrossEntropyCriterion):
    def __init__(self, task, sentence_avg, label_smoothing, consistency_alpha,
                 ignore_prefix_size=0, report_accuracy=False):
        super().__init__(task, sentence_avg, label_smoothing,
                         ignore_prefix_size=ignore_prefix_size, report_accuracy=report_accuracy)
        if consistency_alpha is None or consistency_alpha < 0:
            raise ValueError(f"--consistency-alpha must be >= 0, got {consistency_alpha}")
        self.alpha = consistency_alpha

    @classmethod
    def add_args(cls, parser):
        # translation_thor also accepts --consistency-alpha (see shared_flags)
        add_dataclass_args_once(parser, ThorConsistencyConfig())

    def forward(self, model, sample, reduce=True):
        if not model.training:
            return super().forward(model, sample, reduce=reduce)

        passes = [model(**sample["net_input"]) for _ in range(2)]
        if collect_decisions(model):
            raise ValueError("--criterion thor_consistency trains THOR's stochastic router; train "
                             "--expert-router switch/gshard/hash with "
                             "--criterion moe_label_smoothed_cross_entropy (adds their aux loss)")
        lprobs, losses, nll_losses = [], [], []
        for net_output in passes:
            lp, target = self.get_lprobs_and_target(model, net_output, sample)  # (N, V), (N,)
            loss, nll_loss = label_smoothed_nll_loss(
                lp, target, self.eps, ignore_index=self.padding_idx, reduce=reduce
            )
            lprobs.append(lp)
            losses.append(loss)
            nll_losses.append(nll_loss)
        pad_mask = target.eq(self.padding_idx)
        consistency = symmetric_kl(lprobs[0], lprobs[1], pad_mask, reduce=reduce)
        if not reduce:
            consistency = consistency.view_as(losses[0])
        loss = losses[0] + losses[1] + self.alpha * consistency

        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        logging_output = {
            "loss": loss.data,
            "nll_loss": (0.5 * (nll_losses[0] + nll_losses[1])).data,  # per pass, like dense
            "consistency": consistency.data,
            "ntokens": sample["ntokens"],
            "nsentences": sample["target"].size(0),
            "sample_size": sample_size,
        }
        if self.report_accuracy:
            n_correct, total = self.compute_accuracy(model, passes[0], sample)
            logging_output["n_correct"] = utils.item(n_correct.data)
            logging_output["total"] = utils.item(total.data)
        return loss, sample_size, logging_output

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        if any("consistency" in log for log in logging_outputs):
            consistency = sum(log.get("consistency", 0) for log in logging_outputs)
            ntokens = sum(log.get("ntokens", 0) for log in logging_outputs)
            # symmetric KL per target token, in bits like fairseq's losses
            metrics.log_scalar("consistency", consistency / ntokens / math.log(2), ntokens, round=4)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
