"""What the baseline routers (Switch, GShard top-2, hash) report to the criterion.

Each expert layer with a router keeps its last ``GateDecision``; after a forward pass the criterion
collects them: the load-balancing losses join the training loss (Switch Transformer, Fedus et al.
2021, eq. 4, scaled like the summed token loss), and the load, drop and entropy figures are logged.
THOR's stochastic layers keep no decision, so for THOR the auxiliary loss is exactly 0; they count
their training draws instead (rows per expert), and ``draw_balance_log`` turns those into the same
``expert_load_max`` figure: the largest expert's share of a layer's rows, averaged over layer calls
(1/E is perfect balance; batch routing gives 1 by design).
"""
from typing import Dict, List, Tuple

import torch
from fairseq import metrics
from torch import Tensor


def collect_decisions(model) -> List:
    decisions = []
    for module in model.modules():
        decision = getattr(module, "last_decision", None)
        if decision is not None:
            decisions.append(decision)
            module.last_decision = None  # each pass reports its own decisions once
    return decisions


def router_loss_and_log(model, sample_size) -> Tuple[Tensor, Dict[str, float]]:
    """(aux loss to add to the summed loss, logging entries) for the pass that just ran."""
    decisions = collect_decisions(model)
    if not decisions:
        return 0.0, {}
    aux = torch.stack([d.aux_loss for d in decisions]).mean()
    rows = sum(d.experts.size(0) for d in decisions)
    log = {
        "router_passes": 1,
        "aux_loss": float(aux.detach()),
        "expert_load_max": float(torch.stack([d.load.max() for d in decisions]).mean()),
        "dropped_rows": float(sum(int(d.dropped) for d in decisions)),
        "routed_rows": float(rows),
        "gate_entropy": float(torch.stack([d.entropy.float() for d in decisions]).mean()),
    }
    return aux * sample_size, log


def draw_balance_log(model) -> Dict[str, float]:
    """Logging entries for THOR's training draws since the last call (cleared as they are read)."""
    largest_shares = []
    for module in model.modules():
        counts = getattr(module, "draw_counts", None)
        if counts:
            largest_shares += [max(c) / sum(c) for c in counts if sum(c) > 0]
            module.draw_counts = None
    if not largest_shares:
        return {}
    return {"draw_layer_calls": float(len(largest_shares)), "draw_load_max": float(sum(largest_shares))}


def reduce_draw_balance(logging_outputs):
    calls = sum(log.get("draw_layer_calls", 0) for log in logging_outputs)
    if calls:
        largest = sum(log.get("draw_load_max", 0) for log in logging_outputs)
        metrics.log_scalar("expert_load_max", largest / calls, calls, round=4)


def reduce_router_metrics(logging_outputs):
    passes = sum(log.get("router_passes", 0) for log in logging_outputs)
    if passes == 0:
        return
    for key in ("aux_loss", "expert_load_max", "gate_entropy"):
        metrics.log_scalar(key, sum(log.get(key, 0) for log in logging_outputs) / passes, passes,
                           round=4)
    rows = sum(log.get("routed_rows", 0) for log in logging_outputs)
    dropped = sum(log.get("dropped_rows", 0) for log in logging_outputs)
    metrics.log_scalar("dropped", dropped / max(rows, 1), rows, round=4)  # fraction of tokens
