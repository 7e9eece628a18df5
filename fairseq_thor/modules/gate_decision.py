"""What a gated Mixture-of-Experts router decides, and how it becomes fairscale's dispatch tensors.

THOR (Zuo et al., ICLR 2022) argues that a learned gate routes no better than a random draw. To test
that claim side by side, the gated routers in ``gates.py`` (Switch top-1, GShard top-2, hash) all
return one ``GateDecision``: per row (token), K expert ids and combine weights, with ``-1`` / ``0``
for a choice dropped because its expert was full. The expert layer decides how to compute it; for
fairscale's ``MOELayer`` (GShard's Algorithm 2) :func:`decision_to_dispatch` builds the
``(l_aux, combine_weights, dispatch_mask)`` gate contract, whose einsum legend is
``s`` rows, ``e`` experts, ``c`` capacity slots per expert, ``m`` model dim.
"""
from dataclasses import dataclass, replace
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class GateDecision:
    """Where each of S flattened rows (tokens) goes; K choices per row (1: top-1, hash; 2: top-2).

    ``experts`` (S, K) long: expert id of each choice, -1 where it was dropped (over capacity).
    ``weights`` (S, K) float32: combine weight of each choice, 0 where dropped.
    ``aux_loss`` scalar float32: load-balancing loss, differentiable w.r.t. the gate's parameters;
    a zero tensor (requires_grad False) for routers without one.
    ``load`` (E,) float32: fraction of kept choices per expert, sums to 1 (for logging).
    ``dropped`` scalar long: rows with no kept choice at all (FFN output 0, residual only).
    ``entropy`` scalar float32: mean entropy (nats) of the gate's softmax over experts; 0 for hash.
    """

    experts: Tensor
    weights: Tensor
    aux_loss: Tensor
    load: Tensor
    dropped: Tensor
    entropy: Tensor


def rows_taken(decision: GateDecision, index: Tensor) -> GateDecision:
    """The decision for rows ``index`` of the rows it was made for (a reordering keeps every
    aggregate: load, drops, entropy and the loss do not depend on row order)."""
    return replace(decision, experts=decision.experts.index_select(0, index),
                   weights=decision.weights.index_select(0, index))


def make_decision(
    experts: Tensor, weights: Tensor, num_experts: int, aux_loss: Tensor, entropy: Tensor
) -> GateDecision:
    """Fill in the logging fields (``load``, ``dropped``) from the choices a router made."""
    kept = experts >= 0  # S x K
    counts = torch.bincount(experts[kept], minlength=num_experts).float()
    return GateDecision(
        experts=experts,
        weights=weights.float(),
        aux_loss=aux_loss,
        load=counts / counts.sum().clamp(min=1.0),
        dropped=(~kept.any(dim=1)).sum(),
        entropy=entropy,
    )


def load_balancing_loss(probs: Tensor, first_choice: Tensor) -> Tensor:
    """Switch Transformer's auxiliary loss (Fedus et al. 2021, eq. 4): ``E * sum_e f_e * P_e``.

    ``probs`` (S, E) is the gate's softmax, ``first_choice`` (S,) each row's argmax expert;
    ``f_e`` is the fraction of rows whose first choice is e (counted before capacity drops, and not
    differentiable), ``P_e`` the mean probability of e (differentiable, so the gradient pushes
    probability mass off over-used experts). It is 1 when routing is perfectly balanced and grows to
    E when every row goes to one expert. GShard's l_aux (fairscale's ``mean(me * ce)``) is the same
    quantity divided by E**2; both gates use this scale so one loss weight serves both.
    """
    num_experts = probs.size(1)
    fraction = torch.bincount(first_choice, minlength=num_experts).float() / first_choice.numel()
    return num_experts * (fraction * probs.float().mean(dim=0)).sum()


def mean_entropy(probs: Tensor) -> Tensor:
    """Mean over rows of the entropy (nats) of each row's gate distribution; log(E) when uniform."""
    return torch.special.entr(probs.detach().float()).sum(dim=1).mean()


def expert_counts(decision: GateDecision, num_experts: int) -> Tensor:
    """Kept choices per expert, ``(E,)`` long: callers all-reduce its max to agree on a capacity."""
    experts = decision.experts
    return torch.bincount(experts[experts >= 0], minlength=num_experts)


def decision_to_slots(decision: GateDecision, num_experts: int, capacity: int) -> Tuple[Tensor, Tensor, Tensor]:
    """``(rows, slots, weights)`` of the kept choices: choice i sends row ``rows[i]`` to slot
    ``slots[i] = expert * capacity + place`` of an ``(E * capacity)``-row buffer, and its output comes
    back scaled by ``weights[i]``.

    Each kept choice takes the next free slot of its expert, in row order (row 0's choices, then
    row 1's, ...); dropped choices (expert -1) have no slot. The caller sizes ``capacity`` (e.g. the
    max of :func:`expert_counts` over processes, so that all-to-all buffers match); too small raises.
    """
    experts, weights = decision.experts, decision.weights
    num_rows, choices = experts.shape
    flat = experts.reshape(-1)  # (S*K,) in row order
    kept = flat >= 0
    one_hot = F.one_hot(flat.clamp(min=0), num_experts) * kept.unsqueeze(1)  # (S*K) x E
    counts = one_hot.sum(dim=0)
    if counts.numel() and int(counts.max()) > capacity:
        raise ValueError(
            f"capacity {capacity} is too small: experts receive {counts.tolist()} kept choices"
        )
    place = (one_hot.cumsum(dim=0) - 1).gather(1, flat.clamp(min=0).unsqueeze(1)).squeeze(1)
    row = torch.arange(num_rows, device=experts.device).repeat_interleave(choices)
    return row[kept], (flat * capacity + place)[kept], weights.reshape(-1)[kept]


def decision_to_dispatch(
    decision: GateDecision, num_experts: int, capacity: int
) -> Tuple[Tensor, Tensor]:
    """``(combine_weights (S,E,C) float, dispatch_mask (S,E,C) bool)`` for fairscale's ``MOELayer``.

    The dense form of :func:`decision_to_slots`: ``einsum("sec,sm->ecm")`` packs every expert's rows
    into its first slots and ``einsum("sec,ecm->sm")`` gives each row back
    ``sum_k weight_k * expert_k(x)``; dropped rows combine to 0. ``combine_weights`` has the
    decision's float32 dtype: with fp16 experts, cast it before the combining einsum.
    """
    rows, slots, weights = decision_to_slots(decision, num_experts, capacity)
    num_rows = decision.experts.size(0)
    index = (rows, slots // capacity, slots % capacity)
    shape = (num_rows, num_experts, capacity)
    combine = decision.weights.new_zeros(shape).index_put(index, weights)
    dispatch = torch.zeros(shape, dtype=torch.bool, device=rows.device).index_put(
        index, torch.ones((), dtype=torch.bool, device=rows.device)
    )
    return combine, dispatch
