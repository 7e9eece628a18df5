"""THOR's training loss for two passes, computed from the two passes' logits in one piece.

The loss of a THOR step is two label-smoothed cross-entropies plus the symmetric KL between the two
passes' predictions. Written with autograd (``log_softmax``, fairseq's ``label_smoothed_nll_loss``,
the KL), every step of it makes a new ``(tokens, vocab)`` tensor: log-probabilities, exps,
differences, the gradient of each term and their sums, about twenty in all. On a CPU such a tensor
(tens of MB) comes fresh from the operating system each time (glibc maps allocations this large
and unmaps them when freed), so its first write page-faults over every page: making the tensor
costs more than the arithmetic. Here the forward makes five of them (two log-probabilities reused
in place for the log-ratio and the probabilities, one exp, one temporary) and the backward two (the
gradients it returns, built in place), which halves the loss's share of a training step on CPU.

Gradients, with ``r = log p1 - log p2`` and KL rows ``k = 1/2 sum_v (p1 - p2) r``:
``dk/dlog p1 = 1/2 ((1 + r) p1 - p2)``, ``dk/dlog p2 = 1/2 ((1 - r) p2 - p1)``; the cross-entropy
terms give ``-onehot(target)`` (nll) and ``-1`` (smoothing); a gradient ``G`` on log-probabilities
becomes ``G - p * sum_v G`` on the logits (the log-softmax backward).
"""
from typing import NamedTuple

import torch
from fairseq.models import BaseFairseqModel, FairseqDecoder
from fairseq.models.transformer import TransformerModelBase
from torch import Tensor

# fairseq's definitions that end in a plain log_softmax of the decoder's output
_PLAIN_MODEL_PROBS = (BaseFairseqModel.get_normalized_probs, TransformerModelBase.get_normalized_probs)


class TwoPassLosses(NamedTuple):
    """Per-position terms, ``(N,)`` each, 0 at padding: nll and smoothing term of each pass, and
    the symmetric KL ``1/2 (KL(p1||p2) + KL(p2||p1))`` between them."""
    nll1: Tensor
    smooth1: Tensor
    nll2: Tensor
    smooth2: Tensor
    kl: Tensor


class _TwoPassLoss(torch.autograd.Function):
    """Logits ``(N, V)`` of two passes and targets ``(N,)`` -> the five per-row terms (unmasked)."""

    @staticmethod
    def forward(ctx, logits1: Tensor, logits2: Tensor, target: Tensor):
        # fp16/bf16 logits give fp32 log-probabilities (as fairseq's get_normalized_probs)
        dtype = torch.promote_types(torch.promote_types(logits1.dtype, logits2.dtype), torch.float32)
        lp1 = torch.log_softmax(logits1, dim=-1, dtype=dtype)
        lp2 = torch.log_softmax(logits2, dim=-1, dtype=dtype)
        index = target.unsqueeze(-1)
        nll1, nll2 = lp1.gather(-1, index).squeeze(-1).neg(), lp2.gather(-1, index).squeeze(-1).neg()
        smooth1, smooth2 = lp1.sum(-1).neg(), lp2.sum(-1).neg()
        p2 = lp2.exp()
        log_ratio = lp1.sub_(lp2)  # lp1's buffer now holds r; lp1 = lp2 + r
        p1 = lp2.add_(log_ratio).exp_()  # lp2's buffer now holds p1
        kl = torch.sub(p1, p2).mul_(log_ratio).sum(-1).mul_(0.5)
        ctx.save_for_backward(p1, p2, log_ratio, index)
        ctx.logit_dtypes = (logits1.dtype, logits2.dtype)
        return nll1, smooth1, nll2, smooth2, kl

    @staticmethod
    def backward(ctx, grad_nll1, grad_smooth1, grad_nll2, grad_smooth2, grad_kl):
        p1, p2, log_ratio, index = ctx.saved_tensors
        kl_scale = 0.5 * grad_kl.unsqueeze(-1)
        grads = [None, None, None]
        if ctx.needs_input_grad[0]:
            grads[0] = _logit_gradient(p1, p2, log_ratio, kl_scale, grad_nll1, grad_smooth1, index,
                                       ratio_sign=1.0)
            grads[0] = grads[0].to(ctx.logit_dtypes[0])
        if ctx.needs_input_grad[1]:
            # pass 2 is pass 1 with the roles swapped: r -> -r
            grads[1] = _logit_gradient(p2, p1, log_ratio, kl_scale, grad_nll2, grad_smooth2, index,
                                       ratio_sign=-1.0)
            grads[1] = grads[1].to(ctx.logit_dtypes[1])
        return tuple(grads)


def _logit_gradient(p: Tensor, other: Tensor, log_ratio: Tensor, kl_scale: Tensor, grad_nll: Tensor,
                    grad_smooth: Tensor, index: Tensor, ratio_sign: float) -> Tensor:
    """One pass's gradient on its logits, built in place in one new tensor:
    ``G = kl_scale ((1 + ratio_sign r) p - other) - grad_smooth - grad_nll onehot(target)`` on the
    log-probabilities (``ratio_sign`` is +1 for pass 1, -1 for pass 2), then ``G - p sum_v G``."""
    grad = torch.addcmul(p, log_ratio, p, value=ratio_sign)
    grad.sub_(other).mul_(kl_scale).sub_(grad_smooth.unsqueeze(-1))
    grad.scatter_add_(-1, index, grad_nll.unsqueeze(-1).neg())
    return grad.addcmul_(p, grad.sum(-1, keepdim=True), value=-1.0)


def two_pass_losses(logits1: Tensor, logits2: Tensor, target: Tensor, padding_idx: int) -> TwoPassLosses:
    """The terms of THOR's loss from two passes' logits ``(..., V)`` and the target ``(...)``,
    flattened to one row per position; padded positions are 0 and get no gradient."""
    vocab = logits1.size(-1)
    target = target.reshape(-1)
    rows = _TwoPassLoss.apply(logits1.reshape(-1, vocab), logits2.reshape(-1, vocab), target)
    keep = target.ne(padding_idx)
    return TwoPassLosses(*(torch.where(keep, term, 0.0) for term in rows))


def label_smoothed(nll: Tensor, smooth: Tensor, epsilon: float, vocab: int) -> Tensor:
    """fairseq's label-smoothed loss from its two terms (the weights of ``label_smoothed_nll_loss``)."""
    eps_i = epsilon / (vocab - 1)
    return (1.0 - epsilon - eps_i) * nll + eps_i * smooth


def log_probs_are_log_softmax(model) -> bool:
    """True when the model's log-probabilities are fairseq's log_softmax of its output logits (no
    adaptive softmax, no get_normalized_probs of its own): then the loss can start from the logits."""
    decoder = getattr(model, "decoder", None)
    return (isinstance(decoder, FairseqDecoder)
            and getattr(decoder, "adaptive_softmax", None) is None
            and type(model).get_normalized_probs in _PLAIN_MODEL_PROBS
            and type(model).get_normalized_probs_scriptable is BaseFairseqModel.get_normalized_probs_scriptable
            and type(decoder).get_normalized_probs is FairseqDecoder.get_normalized_probs
            and type(decoder).get_normalized_probs_scriptable is FairseqDecoder.get_normalized_probs_scriptable)
