"""THOR's consistency regulariser: symmetric KL between two stochastic predictions.

THOR trains with two forward passes that route inputs to different random experts and adds
``alpha * 1/2 * (KL(p1 || p2) + KL(p2 || p1))`` to the two cross-entropies, so every expert learns
from the others' predictions and the experts agree at inference (Zuo et al., 2022, eq. 2).
"""
from typing import Optional

import torch.nn.functional as F
from torch import Tensor


def symmetric_kl(lprobs1: Tensor, lprobs2: Tensor, pad_mask: Optional[Tensor] = None,
                 reduce: bool = True) -> Tensor:
    """``1/2 (KL(p1||p2) + KL(p2||p1))`` from log-probabilities ``(..., V)``.

    Computed in fp32 from log-probabilities (never ``log(softmax)``, which underflows to -inf under
    fp16/bf16). ``pad_mask`` (``...``, True at padding) zeroes padded positions. Returns the sum
    over positions, or the per-position values with ``reduce=False``.
    """
    lp1, lp2 = lprobs1.float(), lprobs2.float()
    # F.kl_div(input=log q, target=log p, log_target=True) = sum p (log p - log q) = KL(p || q)
    kl_12 = F.kl_div(lp2, lp1, log_target=True, reduction="none").sum(-1)
    kl_21 = F.kl_div(lp1, lp2, log_target=True, reduction="none").sum(-1)
    kl = 0.5 * (kl_12 + kl_21)
    if pad_mask is not None:
        kl = kl.masked_fill(pad_mask, 0.0)
    return kl.sum() if reduce else kl
