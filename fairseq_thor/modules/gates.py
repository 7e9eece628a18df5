"""Gated Mixture-of-Experts routers, the baselines THOR's random routing is compared with.

THOR (Zuo et al., ICLR 2022, §3) claims that a trained gate routes no better than a random one. To
test that on the same expert layers, three classic routers return a :class:`GateDecision`:

* :class:`SwitchGate`  top-1 with capacity and a load-balancing loss (Switch Transformer, Fedus et
  al. 2021, arXiv 2101.03961);
* :class:`Top2Gate`    top-2 with a sampled second expert (GShard, Lepikhin et al. 2020,
  arXiv 2006.16668), computed by fairscale's ``top2gating``;
* :class:`HashGate`    a fixed random table token id -> expert, nothing learned (Hash Layers,
  Roller et al. 2021, arXiv 2106.04426).

Routers see flattened rows ``(S, M)``; strip padding tokens first, or they take capacity and count
in the load-balancing loss. When an expert is over capacity in training, *which* rows it drops is
random: the rows queue in a fresh random order at every call. Queuing in row order (fairscale's and
Switch's "first come, first served") would be biased here, because our rows are time-major
(position 0 of every sentence, then position 1, ...): late positions were dropped two to three
times as often as early ones (measured on a Switch decoder at capacity 1.0: 16% of the first third
of positions, 33-56% of the last two thirds), so the model never learned its sentence ends with
the FFN that decoding gives them, and beam search ran on to twice the reference length. The
learned gates drop rows over capacity in training only, unless
given an evaluation capacity: in validation and decoding a full expert would silently zero a
token's FFN, and a beam step's few rows overflow easily (DeepSpeed's ``eval_capacity_factor`` and
fairseq's MoE ``moe_eval_capacity_token_fraction`` separate the two the same way). Gate logits
and softmax are computed in float32 whatever the model's dtype (Switch §2.4, "selective
precision": the router's exponentials are where bf16/fp16 break).
"""
import math
from contextlib import contextmanager, nullcontext
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from fairscale.nn.moe.top2gate import gumbel_map, top2gating
from torch import Tensor, nn

from ..errors import ThorError
from .gate_decision import (
    GateDecision,
    load_balancing_loss,
    make_decision,
    mean_entropy,
    rows_taken,
)


class _LearnedGate(nn.Module):
    """A bias-free linear map model_dim -> num_experts, initialised as Switch does (§2.4).

    Truncated normal with std ``sqrt(0.1 / model_dim)``, about a third of ``nn.Linear``'s default
    variance: initial logits are small, so early routing is close to uniform and no expert is
    starved before the load-balancing loss has had a chance to act. Both learned gates share it so
    that the comparison differs only in the routing rule.
    """

    def __init__(self, model_dim: int, num_experts: int, capacity_factor: float = 1.0,
                 eval_capacity_factor: Optional[float] = None, random_drop_order: bool = True):
        super().__init__()
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor  # None: no cap outside training
        # training queues rows for capacity in a random order (see the module docstring); an
        # evaluation cap keeps row order, so decoding stays deterministic
        self.random_drop_order = random_drop_order
        self.wg = nn.Linear(model_dim, num_experts, bias=False)
        std = math.sqrt(0.1 / model_dim)
        nn.init.trunc_normal_(self.wg.weight, std=std, a=-2 * std, b=2 * std)

    def forward(self, x: Tensor) -> GateDecision:
        if not (self.training and self.random_drop_order):
            return self.decide(x)
        order = torch.randperm(x.size(0), device=x.device)
        decision = self.decide(x.index_select(0, order))
        return rows_taken(decision, torch.argsort(order))  # back to the callers' row order

    def decide(self, x: Tensor) -> GateDecision:
        """The decision for rows ``x``, capacity filled in row order."""
        raise NotImplementedError

    def logits(self, x: Tensor) -> Tensor:
        return F.linear(x.float(), self.wg.weight.float())  # S x E, float32

    def share(self, num_rows: int) -> Optional[int]:
        """``ceil(F * S / E)``, an expert's even share of S rows times the capacity factor F of
        the current mode (``capacity_factor`` in training, ``eval_capacity_factor`` otherwise);
        None when evaluating without a cap."""
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        return None if factor is None else math.ceil(factor * num_rows / self.num_experts)

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, capacity_factor={self.capacity_factor}, "
                f"eval_capacity_factor={self.eval_capacity_factor}")


class SwitchGate(_LearnedGate):
    """Top-1 routing (Switch Transformer): each row goes to its most probable expert, weighted by
    that probability (the weight is what trains the gate), and an expert takes at most
    ``share(S)`` rows, first come first served in queue order; the rest are dropped and keep only the
    residual (without an evaluation cap, S rows: none). ``aux_loss`` is Switch's
    ``E * sum_e f_e * P_e``.
    """

    def decide(self, x: Tensor) -> GateDecision:
        probs = F.softmax(self.logits(x), dim=1)  # S x E
        weight, expert = probs.max(dim=1)  # S
        share = self.share(x.size(0))
        capacity = x.size(0) if share is None else share
        # each row's place in its expert's queue: 0 for the expert's first row, 1 for the next, ...
        place = (F.one_hot(expert, self.num_experts).cumsum(dim=0) - 1).gather(1, expert[:, None])
        kept = place.squeeze(1) < capacity
        return make_decision(
            torch.where(kept, expert, -1).unsqueeze(1),  # S x 1
            (weight * kept).unsqueeze(1),
            self.num_experts,
            load_balancing_loss(probs, expert),
            mean_entropy(probs),
        )


@contextmanager
def _without_gumbel_noise(device: torch.device):
    """Make fairscale's ``top2gating`` pick the second-best expert instead of sampling it.

    fairscale always draws the second expert by the Gumbel-max trick, from a sampler it caches per
    device in the module-level dict ``gumbel_map``; GShard samples only in training. Swapping in a
    sampler of zeros for the call is the one hook that changes this without re-writing the
    function (checked with fairscale 0.4.13). Not thread-safe: fairseq calls gates from one thread.
    """
    previous = gumbel_map.get(device)
    gumbel_map[device] = lambda shape: torch.zeros(shape, device=device)
    try:
        yield
    finally:
        if previous is None:
            del gumbel_map[device]
        else:
            gumbel_map[device] = previous


def _pad_for_capacity(logits: Tensor, share: int) -> Tensor:
    """Logits ``(S', E')`` with ``S' = share * E'``, so that fairscale's capacity ``2 S' / E'`` is
    ``2 * share``, whose top-left ``(S, E)`` block routes exactly as top-2 with that capacity on
    the real rows alone.

    fairscale asserts ``S % E == 0``. Appending rows alone is not enough: its slots are filled by
    all first choices, then all second choices (``locations2 += sum(mask1)``), so a padding row's
    first choice would sit in front of every real second choice for its expert and could push one
    out. Padding rows therefore put their first choice on an extra, dummy expert column that real
    rows never choose (logit -inf); their second choice (probability 0, so never dispatched) comes
    after every real choice. Dummy columns also let ``S'`` reach any capacity without changing E.
    """
    num_rows, num_experts = logits.shape
    if num_rows == share * num_experts:
        return logits  # fairscale's own case
    width = max(num_experts + 1, math.ceil(num_rows / share))  # E'
    padded = logits.new_full((share * width, width), float("-inf"))  # S' x E'
    padded[:num_rows, :num_experts] = logits
    padded[num_rows:, num_experts] = 0.0
    return padded


def _top2_without_capacity(logits: Tensor, probs: Tensor) -> Tuple[Tensor, Tensor]:
    """What ``top2gating`` returns without noise when no expert can fill up: every row keeps its
    best and second-best expert, weighted by their probabilities renormalised to sum to 1.

    Computed directly: once every expert must make room for all S rows, fairscale's dispatch
    tensors hold about (S E)^2 / 2 entries, which a large validation batch cannot afford.
    """
    first = probs.argmax(dim=1, keepdim=True)  # S x 1, as fairscale takes them
    second = logits.scatter(1, first, float("-inf")).argmax(dim=1, keepdim=True)
    experts = torch.cat([first, second], dim=1)  # S x 2
    gates = probs.gather(1, experts)
    return experts, gates / gates.sum(dim=1, keepdim=True).clamp(min=torch.finfo(gates.dtype).eps)


class Top2Gate(_LearnedGate):
    """Top-2 routing (GShard) through fairscale's ``top2gating``: the first expert is the argmax,
    the second is sampled from the remaining softmax (Gumbel-max) in training and is the
    second-best in eval mode, each expert takes ``2 * share(S)`` choices (first choices before
    second ones; fairscale's capacity ``2S/E`` is always even), and a row's kept weights are
    renormalised to sum to 1. In eval mode without a cap every choice is kept.

    Any S works (see :func:`_pad_for_capacity`). fairscale's ``l_aux`` is replaced by Switch's
    loss, which is the same quantity times E**2 (see :func:`load_balancing_loss`). Memory is
    fairscale's O(S' E' C): GShard bounds it by routing groups of a few thousand tokens at a time.
    """

    def __init__(self, model_dim: int, num_experts: int, capacity_factor: float = 1.0,
                 eval_capacity_factor: Optional[float] = None, random_drop_order: bool = True):
        if num_experts < 2:
            raise ThorError(f"top-2 routing needs at least 2 experts, got {num_experts}")
        super().__init__(model_dim, num_experts, capacity_factor, eval_capacity_factor,
                         random_drop_order)

    def decide(self, x: Tensor) -> GateDecision:
        logits = self.logits(x)  # S x E
        share = self.share(x.size(0))
        if share is None:
            probs = F.softmax(logits, dim=1)
            experts, weights = _top2_without_capacity(logits, probs)
        else:
            probs, experts, weights = self._top2_with_capacity(logits, share)
        aux_loss = load_balancing_loss(probs, probs.argmax(dim=1))
        return make_decision(experts, weights, self.num_experts, aux_loss, mean_entropy(probs))

    def _top2_with_capacity(self, logits: Tensor, share: int) -> Tuple[Tensor, Tensor, Tensor]:
        """``(probs (S, E), experts (S, 2), weights (S, 2))`` from fairscale's ``top2gating``."""
        num_rows, num_experts = logits.shape
        padded = _pad_for_capacity(logits, share)  # S' x E'
        noise = nullcontext() if self.training else _without_gumbel_noise(padded.device)
        with noise:
            _, combine, dispatch = top2gating(padded)  # S' x E' x C each
        # the same softmax and argmax fairscale took, so `first` is its first choice bit for bit
        probs = F.softmax(padded, dim=1, dtype=torch.float)[:num_rows, :num_experts]  # S x E
        first = probs.argmax(dim=1, keepdim=True)  # S x 1
        kept = dispatch[:num_rows, :num_experts].any(dim=2)  # S x E: experts that took the row
        weight = combine[:num_rows, :num_experts].sum(dim=2)  # S x E, 0 where not kept
        others = kept.scatter(1, first, False)  # at most one expert: the kept second choice
        second = others.long().argmax(dim=1, keepdim=True)
        experts = torch.cat(
            [
                torch.where(kept.gather(1, first), first, -1),
                torch.where(others.any(dim=1, keepdim=True), second, -1),
            ],
            dim=1,
        )  # S x 2
        weights = torch.cat(
            [weight.gather(1, first), weight.gather(1, second) * (experts[:, 1:] >= 0)], dim=1
        )  # S x 2
        return probs, experts, weights


class HashGate(nn.Module):
    """Hash routing (Roller et al. 2021): token id -> expert through a fixed random table.

    Nothing is learned, so there is no load-balancing loss and no capacity, hence no drop in
    training or evaluation: every row goes to one expert with weight 1. The table comes from a
    private ``torch.Generator(seed)``, so building the gate leaves the global RNG (and thus
    fairseq's seeded stream) untouched and every process builds the same table; it is a buffer, so
    checkpoints carry it. ``forward`` takes token ids of any shape and routes them flattened,
    ``(S,)``.
    """

    def __init__(self, num_experts: int, vocab_size: int, seed: int = 0):
        super().__init__()
        self.num_experts = num_experts
        generator = torch.Generator().manual_seed(seed)
        table = torch.randint(num_experts, (vocab_size,), generator=generator)  # vocab -> expert
        self.register_buffer("table", table)

    def forward(self, token_ids: Tensor) -> GateDecision:
        experts = self.table[token_ids.reshape(-1)].unsqueeze(1)  # S x 1
        weights = torch.ones(experts.shape, device=experts.device)
        zero = torch.zeros((), device=experts.device)
        return make_decision(experts, weights, self.num_experts, zero, zero.clone())

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, vocab={self.table.numel()}"
