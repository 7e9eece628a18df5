"""A bank of E linear maps with batched weights, computing only the expert each row is routed to.

One THOR expert is an ordinary transformer FFN, ``fc2(act(fc1(x)))``. fairseq's layers build
``fc1`` and ``fc2`` through the hooks ``build_fc1`` / ``build_fc2`` and call them one after the
other, so a THOR layer swaps both for an ``ExpertLinear`` and lets fairseq's own ``forward`` run.

The two banks of one FFN split the work of a grouped route (rows going to different experts):
the *dispatching* bank (fc1) gathers the rows into expert order and returns them in that order;
activation, dropout and fairseq's optional FFN LayerNorm act row by row, so the permutation passes
through them untouched; the *combining* bank (fc2) puts the rows back in place. One gather and one
scatter per FFN, and each row costs exactly one expert's FLOPs, whatever E is.
"""
import math
from contextlib import contextmanager
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .routing import Route, RouteKind


class ExpertLinear(nn.Module):
    """E linear maps ``in_features -> out_features``: weight ``(E, out, in)``, bias ``(E, out)``.

    ``route`` must be set (see :func:`routed`) while the bank is called. ``dispatches`` is True
    for the first linear map of an FFN (fc1) and False for the last (fc2).
    """

    def __init__(self, num_experts: int, in_features: int, out_features: int, dispatches: bool):
        super().__init__()
        self.num_experts = num_experts
        self.in_features = in_features
        self.out_features = out_features
        self.dispatches = dispatches
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(num_experts, out_features))
        self.route: Optional[Route] = None
        self._merged_cache: Optional[Tuple[tuple, Tensor, Tensor]] = None
        self.reset_parameters()

    def reset_parameters(self):
        # Each expert is initialised exactly like a fresh nn.Linear (what fairseq's FFN uses).
        bound = 1.0 / math.sqrt(self.in_features)
        for e in range(self.num_experts):
            nn.init.kaiming_uniform_(self.weight[e], a=math.sqrt(5))
        nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, in={self.in_features}, out={self.out_features}"

    def forward(self, x: Tensor) -> Tensor:
        route = self.route
        if route is None:
            raise RuntimeError("ExpertLinear was called outside an expert layer's routing context")
        if route.kind is RouteKind.ONE:
            return F.linear(x, self.weight[route.expert], self.bias[route.expert])
        if route.kind is RouteKind.MERGED:
            return F.linear(x, *self._merged_weights())
        if route.kind is RouteKind.MEAN:
            return self._all_experts(x)
        if route.kind is RouteKind.GROUPED:
            return self._grouped(x, route)
        if route.kind is RouteKind.GATED:
            return self._gated(x, route)
        raise ValueError(f"unknown route kind {route.kind!r}")

    def _grouped(self, x: Tensor, route: Route) -> Tensor:
        rows = x.reshape(-1, self.in_features)  # (T*B) x C_in
        if self.dispatches:
            rows = rows.index_select(0, route.order)  # rows now in expert order
        out = self._per_expert(rows, route.counts)
        if not self.dispatches:
            out = out.index_select(0, route.restore)  # back to T x B order
        return out.view(*x.shape[:-1], self.out_features)

    def _per_expert(self, rows: Tensor, counts) -> Tensor:
        """Rows in expert order, ``counts[e]`` of them for expert e, each through its expert."""
        if len(counts) == self.num_experts and min(counts) == max(counts) > 0:
            # Equal shares (training's balanced draws whenever E divides the batch): one batched
            # matmul, whose gradient lands in the (E, out, in) weight directly.
            out = torch.baddbmm(self.bias.unsqueeze(1), rows.view(self.num_experts, counts[0], -1),
                                self.weight.transpose(1, 2))
            return out.view(-1, self.out_features)
        # unbind once: its backward stacks the E gradients into one tensor, where indexing
        # weight[e] per expert would allocate a full (E, out, in) zero gradient per expert
        weights, biases = self.weight.unbind(0), self.bias.unbind(0)
        outs = [F.linear(chunk, weights[e], biases[e])
                for e, chunk in enumerate(rows.split(counts)) if chunk.size(0) > 0]
        return torch.cat(outs) if outs else rows.new_zeros(0, self.out_features)

    def _gated(self, x: Tensor, route: Route) -> Tensor:
        """Routers with capacity, top-2 and combine weights (Switch, GShard, hash baselines).

        fc1 asks the router (``route.decide``) on its own input, fills the shared route in and
        returns the kept choices in expert order (K x rows); fc2 scales each by its weight and
        adds it back to its source row; rows with no kept choice get 0.
        """
        rows = x.reshape(-1, self.in_features)
        if self.dispatches:
            decided = route.decide(rows)
            route.order, route.weights, route.counts = decided.order, decided.weights, decided.counts
            route.source_shape = tuple(x.shape[:-1])
            return self._per_expert(rows.index_select(0, route.order), route.counts)
        out = self._per_expert(rows, route.counts) * route.weights.to(rows.dtype).unsqueeze(1)
        num_rows = math.prod(route.source_shape)
        combined = out.new_zeros(num_rows, self.out_features).index_add_(0, route.order, out)
        return combined.view(*route.source_shape, self.out_features)

    def _all_experts(self, x: Tensor) -> Tensor:
        # fc1: T x B x C -> E x T x B x F (every expert sees every row); fc2: E x ... -> mean.
        if self.dispatches:
            y = torch.einsum("...i,eoi->e...o", x, self.weight)
            return y + self.bias.view(self.num_experts, *([1] * (x.dim() - 1)), -1)
        y = torch.einsum("e...i,eoi->e...o", x, self.weight)
        y = y + self.bias.view(self.num_experts, *([1] * (x.dim() - 2)), -1)
        return y.mean(dim=0)

    def _merged_weights(self) -> Tuple[Tensor, Tensor]:
        if self.training or torch.is_grad_enabled():
            return self.weight.mean(dim=0), self.bias.mean(dim=0)
        # In decoding the same average is needed at every step: cache it until the weights change.
        key = (self.weight._version, self.bias._version, self.weight.data_ptr(), self.weight.dtype)
        if self._merged_cache is None or self._merged_cache[0] != key:
            self._merged_cache = (key, self.weight.mean(dim=0), self.bias.mean(dim=0))
        return self._merged_cache[1], self._merged_cache[2]


def expert_parameter_summary(model: nn.Module) -> Optional[str]:
    """One line on the model's expert banks (None without any), for the training log: fairseq's
    own ``num. expert model params`` counts only parameters tagged for expert parallelism, so it
    reads 0 for every one-process model."""
    banks = [m for m in model.modules() if isinstance(m, ExpertLinear)]
    if not banks:
        return None
    total = sum(p.numel() for bank in banks for p in bank.parameters())
    experts = sorted({bank.num_experts for bank in banks})
    per_expert = sum(p[0].numel() for bank in banks for p in (bank.weight, bank.bias))
    return (f"num. THOR expert FFN params: {total:,} in {len(banks) // 2} expert layers of "
            f"{'/'.join(map(str, experts))} experts ({per_expert:,} in one expert of every layer; "
            f"fairseq's 'num. expert model params' counts only expert-parallel shards)")


@contextmanager
def routed(route: Route, *banks: ExpertLinear):
    """Hand ``route`` to the expert banks of one FFN for the duration of one layer call."""
    for bank in banks:
        bank.route = route
    try:
        yield
    finally:
        for bank in banks:
            bank.route = None
