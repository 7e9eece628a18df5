"""Expert parallelism: the experts of a THOR FFN spread over processes and reached through fairscale.

With W processes and E experts every process holds E/W experts of each expert layer
(``ExpertFFN`` modules), or, when W = k*E, one expert that k processes hold (``expert_groups``);
the rest of the model is replicated and trained data-parallel. fairscale's
``MOELayer`` moves the inputs (GShard, Lepikhin et al. 2020, Algorithm 2): the gate gives every row
an expert and a slot, an all-to-all sends each row to the process holding its expert, the local
experts run, and a second all-to-all brings the results home.

THOR has no gate network: its layer draws a balanced random permutation
(``routing.draw_balanced_experts``), and ``DecisionGate`` turns that draw (or a baseline router's
choices) into slots. all-to-all exchanges equally sized blocks, so every expert reserves the largest
number of rows any expert receives on any process (agreed with one all-reduce): THOR drops no row,
ranks with different batch sizes still exchange matching blocks, and the balanced draw keeps the
padding small.

``IndexDispatchMoE`` keeps fairscale's ``MOELayer`` (its all-to-all, its expert tagging, its
parameter names) but dispatches and combines with index copies instead of MOELayer's einsums over
an S x E x C mask, whose cost grows like the FFN's own at a few thousand tokens; and it exchanges
the activations in their own dtype (fp16/bf16 under mixed precision), not float32.
"""
from contextlib import contextmanager
from dataclasses import replace
from typing import Callable, List, Optional, Tuple

import torch
import torch.distributed as dist
from fairscale.nn.moe import MOELayer
from fairscale.nn.moe.moe_layer import _AllToAll
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import skip_init

from .expert_groups import expert_groups
from .experts import ExpertLinear
from .gate_decision import (
    GateDecision,
    decision_to_dispatch,
    decision_to_slots,
    expert_counts,
    make_decision,
)


class DecisionGate(nn.Module):
    """fairscale's gate contract ``rows -> (l_aux, combine_weights, dispatch_mask)`` around a
    ``GateDecision`` made just before the call (THOR's balanced draw, or a baseline router's).

    all-to-all exchanges equally sized blocks, so the capacity is the largest number of rows any
    expert receives on any process (one all-reduce): nothing beyond the router's own drops is lost.
    """

    def __init__(self, num_experts: int, group):
        super().__init__()
        self.num_experts = num_experts
        self.group = group
        self.decision: Optional[GateDecision] = None

    def capacity(self, rows: Tensor) -> int:
        decision = self.decision
        if decision is None or decision.experts.size(0) != rows.size(0):
            raise RuntimeError("DecisionGate needs a decision for every row")
        capacity = expert_counts(decision, self.num_experts).max().reshape(1).to(rows.device)
        dist.all_reduce(capacity, op=dist.ReduceOp.MAX, group=self.group)
        return int(capacity.item())

    def forward(self, rows: Tensor) -> Tuple[Tensor, Tensor, Tensor]:  # rows: S x C
        """fairscale's dense contract (MOELayer's own einsum path; kept to test against)."""
        combine, dispatch = decision_to_dispatch(self.decision, self.num_experts, self.capacity(rows))
        return self.decision.aux_loss, combine.to(rows.dtype), dispatch  # S x E x C each

    def slots(self, rows: Tensor) -> Tuple[Tensor, int, Tuple[Tensor, Tensor, Tensor]]:
        """``(l_aux, capacity, (rows, slots, weights))``: see ``decision_to_slots``."""
        capacity = self.capacity(rows)
        return self.decision.aux_loss, capacity, decision_to_slots(self.decision, self.num_experts, capacity)


class IndexDispatchMoE(MOELayer):
    """fairscale's ``MOELayer`` with index-based dispatch and combine (module docstring)."""

    def forward(self, *input: Tensor, **kwargs) -> Tensor:  # input: S x 1 x M, like MOELayer's
        (x,) = input
        d_model = x.size(-1)
        rows = x.reshape(-1, d_model)
        self.l_aux, capacity, (source, slots, weights) = self.gate.slots(rows)
        num_experts = self.world_size * self.num_local_experts
        # each kept choice's row in its expert's slot; empty slots stay 0 (what the mask gave)
        dispatched = rows.new_zeros(num_experts * capacity, d_model).index_copy(
            0, slots, rows.index_select(0, source))
        dispatched = _AllToAll.apply(self.group, dispatched.view(num_experts, capacity, d_model))
        dispatched = dispatched.reshape(self.world_size, self.num_local_experts, -1, d_model)
        outputs = torch.cat([expert(chunk) for chunk, expert in
                             zip(dispatched.chunk(self.num_local_experts, dim=1), self.experts)], dim=1)
        outputs = _AllToAll.apply(self.group, outputs).reshape(num_experts * capacity, d_model)
        picked = outputs.index_select(0, slots) * weights.to(outputs.dtype).unsqueeze(1)
        return rows.new_zeros(rows.shape).index_add(0, source, picked).reshape(x.shape)


def random_decision(experts: Tensor, num_experts: int, device: torch.device) -> GateDecision:
    """THOR's draw as a decision: one expert per row (``experts``, any shape), weight 1, no loss."""
    experts = experts.reshape(-1, 1).to(device)
    zero = torch.zeros((), device=device)
    return make_decision(experts, torch.ones(experts.shape, device=device), num_experts, zero, zero)


class ExpertFFN(nn.Module):
    """One expert on its own process: fc1 -> activation -> dropout -> fc2, as fairseq's FFN.

    MOELayer hands it ``W x 1 x C x M``: C rows (some of them padding) from each of W processes.
    """

    def __init__(self, fc1: ExpertLinear, fc2: ExpertLinear, expert: int, activation_fn: Callable,
                 activation_dropout: nn.Module):
        super().__init__()
        # skip_init: the weights come from the full banks, and drawing fresh ones would shift
        # the RNG stream away from a one-process model's
        self.fc1 = skip_init(nn.Linear, fc1.in_features, fc1.out_features)
        self.fc2 = skip_init(nn.Linear, fc2.in_features, fc2.out_features)
        with torch.no_grad():
            for linear, bank in ((self.fc1, fc1), (self.fc2, fc2)):
                linear.weight.copy_(bank.weight[expert])
                linear.bias.copy_(bank.bias[expert])
        self.activation_fn = activation_fn
        self.activation_dropout = activation_dropout

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype  # the exchange runs in the activations' dtype; the expert in its weights'
        h = self.activation_dropout(self.activation_fn(self.fc1(x.to(self.fc1.weight.dtype))))
        return self.fc2(h).to(dtype)


class ExpertParallelFFN(nn.Module):
    """The whole expert FFN of a fairseq layer, run through fairscale's MOELayer.

    It sits in the layer's ``fc1`` slot; the layer's own activation, activation dropout and
    ``fc2`` become identities, because the experts apply them on their own processes.
    ``fc1`` / ``fc2`` arrive holding all E experts (so initialisation matches a one-process model
    with the same seed); this process keeps the E/S experts of its shard (``expert_groups``:
    S = min(W, E) ranks per expert group, shard = rank mod S).
    """

    def __init__(self, fc1: ExpertLinear, fc2: ExpertLinear, activation_fn: Callable,
                 activation_dropout: nn.Module):
        super().__init__()
        num_experts = fc1.num_experts
        self.groups = expert_groups(num_experts)
        self.num_experts = num_experts
        self.num_local = num_experts // self.groups.num_shards
        first = self.groups.shard * self.num_local
        local = nn.ModuleList(
            ExpertFFN(fc1, fc2, e, activation_fn, activation_dropout)
            for e in range(first, first + self.num_local)
        )
        # MOELayer tags every expert parameter with `expert = True`: fairseq's legacy_ddp then
        # leaves their gradients alone (the trainer reduces them over the replica group)
        self.moe = IndexDispatchMoE(DecisionGate(num_experts, self.groups.expert_group), local,
                                    self.groups.expert_group)
        self.decide: Optional[Callable[[Tensor], GateDecision]] = None

    def forward(self, x: Tensor) -> Tensor:  # T x B x C
        if self.decide is None:
            raise RuntimeError("ExpertParallelFFN was called outside its layer's routing context")
        rows = x.reshape(-1, x.size(-1))  # exchanged in its own dtype (fp16/bf16 stay half)
        decision = self.decide(rows)
        # fairscale's own MOELayer.forward (benchmarks/expert_parallel.py --dispatch einsum)
        # wants an (s, t, m) input whose s is a multiple of the local expert count: feed it
        # S x 1 x C rows, padded with rows that go nowhere (expert -1)
        pad = -rows.size(0) % self.num_local
        if pad:
            rows = torch.cat([rows, rows.new_zeros(pad, rows.size(1))])
            decision = replace(decision, experts=F.pad(decision.experts, (0, 0, 0, pad), value=-1),
                               weights=F.pad(decision.weights, (0, 0, 0, pad)))
        self.moe.gate.decision = decision
        try:
            out = self.moe(rows.unsqueeze(1))
        finally:
            self.moe.gate.decision = None
        return out[: x.size(0) * x.size(1)].view(x.shape).to(x.dtype)

    @contextmanager
    def decided_by(self, decide: Callable[[Tensor], GateDecision]):
        """Route the next call: ``decide`` maps the S x C input rows to a decision for each."""
        self.decide = decide
        try:
            yield
        finally:
            self.decide = None


def expert_parameter_names(model: nn.Module) -> List[Tuple[str, List[str]]]:
    """For every expert tensor of a one-process THOR model, the names of its slices here.

    A one-process layer keeps a whole bank of E experts per tensor (``<layer>.fc1.weight``:
    E x F x C). An expert-parallel process keeps E/S of them, one ``nn.Linear`` each:
    ``<layer>.fc1.moe.experts.<j>.fc1.weight`` holds expert ``shard * E/S + j`` (see
    ``expert_groups``). Every other parameter has the same name in both.
    """
    names = []
    for name, module in model.named_modules():
        if isinstance(module, ExpertParallelFFN):
            layer = name[: -len("fc1")]
            for fc in ("fc1", "fc2"):
                for tensor in ("weight", "bias"):
                    local = [f"{name}.moe.experts.{j}.{fc}.{tensor}" for j in range(module.num_local)]
                    names.append((f"{layer}{fc}.{tensor}", local))
    return names
