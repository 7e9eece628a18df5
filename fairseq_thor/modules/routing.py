"""Who goes where: random expert assignment for THOR's stochastic expert layers.

THOR (Zuo et al., ICLR 2022, arXiv 2110.04260) has no gate: every input is sent to an expert drawn
uniformly at random, in training and at inference. This file turns a routing *mode* into a ``Route``,
the plan an expert bank follows for one forward pass of one layer:

* ``batch``    one expert for the whole mini-batch (the reference implementation's training mode);
* ``sentence`` one expert per sentence, shared by all its tokens;
* ``path``     one expert per sentence, the same in every expert layer (inference only): the
               THOR tasks batch sentences by that expert, so each batch computes one expert's
               FFN per layer and decoding costs what a dense model's does, for any E;
* ``token``    one expert per token;
* ``fixed``    always expert ``k`` (inference only: evaluate a single expert);
* ``mean``     every expert runs and their outputs are averaged (inference only, costs E FFNs);
* ``merged``   the experts' weights are averaged into one FFN (inference only, costs one FFN).

Draws use torch's CPU generator only, which fairseq seeds and which activation checkpointing
saves and restores, so recomputation and reruns replay the same experts. Drawing on the CPU also
means the per-expert row counts are known without a device synchronisation.
"""
from dataclasses import dataclass
from enum import Enum
from typing import Callable, List, Optional

import torch
from fairseq.dataclass import ChoiceEnum
from torch import Tensor

from ..errors import ThorError

TRAIN_ROUTING = ["batch", "sentence", "token"]
INFERENCE_ROUTING = ["sentence", "token", "batch", "fixed", "mean", "merged", "path"]
InferenceRoutingChoice = ChoiceEnum(INFERENCE_ROUTING)

# The modes whose draw is made once per sentence and then kept for the whole sequence; in
# incremental decoding that draw is stored per hypothesis and follows beam reordering.
PER_SENTENCE_MODES = ("batch", "sentence", "path")
# ``path`` draws each sentence's expert once for all layers: from this salt instead of the layer's
PATH_SALT = (1 << 40) + 1


class RouteKind(str, Enum):
    """How an expert bank computes its rows (a ``str`` Enum: ``RouteKind.ONE == "one"``)."""

    ONE = "one"          # every row through one expert
    GROUPED = "grouped"  # rows gathered by expert, each group through its expert, put back
    MEAN = "mean"        # every expert on every row, outputs averaged
    MERGED = "merged"    # one FFN with the experts' weights averaged
    GATED = "gated"      # a learned or hashed router decides (baselines)


@dataclass
class Route:
    """How an expert bank computes one flattened ``(N, C)`` input (``N = T * B`` rows).

    kind ``one``: every row uses ``expert``. kind ``grouped``: rows are reordered by ``order`` so
    each expert's rows are contiguous (``counts[e]`` rows for expert e), and ``restore`` undoes
    the reordering. kind ``mean`` / ``merged``: see the module docstring.
    """

    kind: RouteKind
    expert: int = 0
    order: Optional[Tensor] = None
    restore: Optional[Tensor] = None
    counts: Optional[List[int]] = None
    # kind ``gated`` (learned or hashed routers, for comparison with THOR): ``decide`` turns the
    # FFN input rows into the choices; ``order`` then lists the source row of every kept choice
    # in expert order (a row may appear twice with top-2, or not at all when dropped) and
    # ``weights`` the combine weight of each.
    decide: Optional[Callable[[Tensor], "Route"]] = None
    weights: Optional[Tensor] = None
    source_shape: Optional[tuple] = None

    def __post_init__(self):
        self.kind = RouteKind(self.kind)  # a plain string is accepted; an unknown one is refused here


def route_from_choices(experts: Tensor, weights: Tensor, num_experts: int,
                       rows: Optional[Tensor] = None) -> Route:
    """A ``gated`` route from a router's choices: ``experts`` / ``weights`` are ``(S, K)``, expert
    -1 meaning dropped; ``rows`` (S,) maps choice rows to input rows (default: the identity)."""
    kept = experts >= 0
    source = torch.arange(experts.size(0), device=experts.device) if rows is None else rows
    source = source.unsqueeze(1).expand_as(experts)[kept]
    chosen = experts[kept]
    order = torch.argsort(chosen, stable=True)
    return Route(kind=RouteKind.GATED, order=source[order], weights=weights[kept][order],
                 counts=torch.bincount(chosen, minlength=num_experts).tolist())


def draw_sentence_experts(mode: str, num_experts: int, batch_size: int) -> Tensor:
    """One expert id per sentence (CPU long tensor of shape ``(B,)``) for a per-sentence mode."""
    if mode == "path":
        # a layer on its own cannot draw what every layer must share: the draw is keyed by id
        raise ThorError(
            "--inference-routing path needs the sentence ids: decode through --task "
            "translation_thor (fairseq-generate, -interactive, -validate), or call the model's "
            "set_sentence_keys(ids) first")
    if mode == "batch":
        return torch.randint(num_experts, (1,)).expand(batch_size).contiguous()
    if mode == "sentence":
        return torch.randint(num_experts, (batch_size,))
    raise ValueError(f"mode {mode!r} is not drawn per sentence")


def keyed_sentence_experts(keys: Tensor, salt: int, seed: int, num_experts: int) -> Tensor:
    """One expert per sentence from ``(seed, salt, sentence id)`` alone (CPU long ``(B,)``).

    At inference the draw is keyed instead of taken from torch's generator, so a sentence gets the
    same experts whatever else is in its batch, in whatever order: decoding is reproducible from
    ``--seed`` whatever the batch size. ``salt`` tells layers apart. Every expert is equally
    likely (splitmix64 mixing; the modulo bias is below 1e-17).
    """
    base = _splitmix64(_splitmix64(seed) ^ salt)
    return torch.tensor([_splitmix64(base ^ key) % num_experts for key in keys.tolist()], dtype=torch.long)


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """Steele et al.'s SplitMix64 finaliser: a bijection of 64-bit ints with strong avalanche."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def draw_token_experts(num_experts: int, seq_len: int, batch_size: int) -> Tensor:
    """One expert id per token, shaped like the layer input: ``(T, B)``."""
    return torch.randint(num_experts, (seq_len, batch_size))


def draw_balanced_experts(mode: str, num_experts: int, seq_len: int, batch_size: int) -> Tensor:
    """Expert ids shaped ``(T, B)`` from a balanced random permutation (expert parallelism).

    Across processes every expert must reserve room for the largest share it can receive, so the
    draw is balanced instead of independent: slots ``0, 1, ..., E-1, 0, 1, ...`` (starting at a
    random expert) are shuffled over the sentences (``sentence``) or tokens (``token``). Every expert
    then gets the same number of sentences or tokens, give or take one, and each input is still
    equally likely to land on any expert. ``batch`` sends the whole batch to one random expert.
    """
    if mode == "batch":
        return torch.randint(num_experts, (1, 1)).expand(seq_len, batch_size)
    if mode == "sentence":
        return _balanced_slots(num_experts, batch_size).expand(seq_len, batch_size)
    if mode == "token":
        return _balanced_slots(num_experts, seq_len * batch_size).view(seq_len, batch_size)
    raise ValueError(f"mode {mode!r} has no balanced draw; valid: batch, sentence, token")


def _balanced_slots(num_experts: int, n: int) -> Tensor:
    start = torch.randint(num_experts, (1,))
    return ((torch.arange(n) + start) % num_experts)[torch.randperm(n)]


def route_from_assignment(assignment: Tensor, num_experts: int, device: torch.device) -> Route:
    """Build a ``Route`` from expert ids laid out like the flattened ``T x B`` rows."""
    flat = assignment.reshape(-1).cpu()
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    used = [e for e, c in enumerate(counts) if c > 0]
    if len(used) == 1:  # a single expert needs no gather/scatter
        return Route(kind=RouteKind.ONE, expert=used[0])
    order = torch.argsort(flat, stable=True)
    restore = torch.empty_like(order)
    restore[order] = torch.arange(order.numel())
    return Route(
        kind=RouteKind.GROUPED,
        order=order.to(device, non_blocking=True),
        restore=restore.to(device, non_blocking=True),
        counts=counts,
    )


def make_route(
    mode: str,
    num_experts: int,
    seq_len: int,
    batch_size: int,
    device: torch.device,
    fixed_expert: int = 0,
    sentence_experts: Optional[Tensor] = None,
) -> Route:
    """The route for one layer call of shape ``T x B``.

    ``sentence_experts`` (``(B,)``) replays an earlier per-sentence draw, as incremental decoding
    does at every step after the first; otherwise per-sentence modes draw afresh.
    """
    if mode == "fixed":
        return Route(kind=RouteKind.ONE, expert=fixed_expert)
    if mode in ("mean", "merged"):
        return Route(kind=RouteKind(mode))
    if mode == "token":
        return route_from_assignment(
            draw_token_experts(num_experts, seq_len, batch_size), num_experts, device
        )
    if mode in PER_SENTENCE_MODES:
        if sentence_experts is None:
            sentence_experts = draw_sentence_experts(mode, num_experts, batch_size)
        return route_from_assignment(
            sentence_experts.cpu().expand(seq_len, batch_size), num_experts, device
        )
    raise ValueError(f"unknown routing mode {mode!r}; valid: {sorted(set(INFERENCE_ROUTING))}")
