"""``--criterion moe_label_smoothed_cross_entropy``: one pass of label-smoothed CE plus the
routers' load-balancing loss; the criterion for the Switch / GShard / hash baselines.

THOR trains with ``thor_consistency`` (two stochastic passes); gated baselines are trained as in
their papers: one pass, cross-entropy + ``--moe-aux-loss-weight`` x the load-balancing loss. Logs
``aux_loss``, ``expert_load_max`` (largest expert share), ``dropped`` (fraction of tokens over
capacity) and ``gate_entropy``.
"""
from dataclasses import dataclass, field

from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
)

from .router_stats import reduce_router_metrics, router_loss_and_log

DEFAULT_AUX_LOSS_WEIGHT = 0.01  # Switch Transformer's alpha


@dataclass
class MoECrossEntropyConfig(LabelSmoothedCrossEntropyCriterionConfig):
    moe_aux_loss_weight: float = field(
        default=DEFAULT_AUX_LOSS_WEIGHT,
        metadata={"help": "weight of the routers' load-balancing loss (Switch: 0.01)"},
    )


@register_criterion("moe_label_smoothed_cross_entropy", dataclass=MoECrossEntropyConfig)
class MoECrossEntropyCriterion(LabelSmoothedCrossEntropyCriterion):
    def __init__(self, task, sentence_avg, label_smoothing, moe_aux_loss_weight,
                 ignore_prefix_size=0, report_accuracy=False):
        super().__init__(task, sentence_avg, label_smoothing,
                         ignore_prefix_size=ignore_prefix_size, report_accuracy=report_accuracy)
        if moe_aux_loss_weight < 0:
            raise ValueError(f"--moe-aux-loss-weight must be >= 0, got {moe_aux_loss_weight}")
        self.aux_weight = moe_aux_loss_weight

    def forward(self, model, sample, reduce=True):
        loss, sample_size, logging_output = super().forward(model, sample, reduce=reduce)
        aux, router_log = router_loss_and_log(model, sample_size)
        if model.training:
            loss = loss + self.aux_weight * aux
            logging_output["loss"] = loss.data
        logging_output.update(router_log)
        return loss, sample_size, logging_output

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        reduce_router_metrics(logging_outputs)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True  # router figures are logged as sums and averaged in reduce_router_metrics
