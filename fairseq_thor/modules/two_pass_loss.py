"""THOR's training loss for two passes, computed from the two passes' logits in one piece.

The loss of a THOR step is two label-smoothed cross-entropies plus the symmetric KL between the two
passes' predictions. Written with autograd (``log_softmax``, fairseq's ``label_smoothed_nll_loss``,
the KL), every step of it makes a new ``(tokens, vocab)`` tensor: log-probabilities, exps,
differences, the gradient of each term and their sums, about twenty in all, each written and read
back from memory. On a CPU such a tensor (tens of MB) even comes fresh from the operating system
each time (glibc maps allocations this large and unmaps them when freed), so its first write
page-faults over every page: making the tensor costs more than the arithmetic.

Here the work goes by blocks of rows small enough to stay in the CPU's cache (all rows at once on
a GPU), and nothing vocabulary-sized is kept between forward and backward: the forward returns five
numbers per row, the backward recomputes each block's probabilities from the logits (which are
alive anyway) and writes the two logit gradients, the only vocabulary-sized tensors it makes. On 2
CPU cores at 1,280 tokens x 8,000 words that is 78 ms for forward and backward, against 220 ms
for the autograd composition; on a GPU it saves the memory of the saved probabilities.

Gradients, with ``r = log p1 - log p2`` and KL rows ``k = 1/2 sum_v (p1 - p2) r``:
``dk/dlog p1 = 1/2 ((1 + r) p1 - p2)``, ``dk/dlog p2 = 1/2 ((1 - r) p2 - p1)``; the cross-entropy
terms give ``-onehot(target)`` (nll) and ``-1`` (smoothing); a gradient ``G`` on log-probabilities
becomes ``G - p sum_v G`` on the logits (the log-softmax backward).
"""
from typing import Iterator, NamedTuple, Tuple

import torch
from fairseq.models import BaseFairseqModel, FairseqDecoder
from fairseq.models.transformer import TransformerModelBase
from torch import Tensor

# fairseq's definitions that end in a plain log_softmax of the decoder's output
_PLAIN_MODEL_PROBS = (BaseFairseqModel.get_normalized_probs, TransformerModelBase.get_normalized_probs)

# bytes of one fp32 block of rows on a CPU: a few such blocks fit in a core's L2 cache
CPU_BLOCK_BYTES = 1 << 19


class TwoPassLosses(NamedTuple):
    """Per-position terms, ``(N,)`` each, 0 at padding: nll and smoothing term of each pass, and
    the symmetric KL ``1/2 (KL(p1||p2) + KL(p2||p1))`` between them."""
    nll1: Tensor
    smooth1: Tensor
    nll2: Tensor
    smooth2: Tensor
    kl: Tensor


def _row_blocks(logits: Tensor) -> Iterator[Tuple[int, int]]:
    rows, vocab = logits.shape
    step = rows if logits.device.type != "cpu" else CPU_BLOCK_BYTES // (4 * vocab)
    step = max(1, step)  # one row even where a row is larger than a block, or there are none
    for start in range(0, rows, step):
        yield start, min(start + step, rows)


class _TwoPassLoss(torch.autograd.Function):
    """Logits ``(N, V)`` of two passes and targets ``(N,)`` -> the five per-row terms (unmasked)."""

    @staticmethod
    def forward(ctx, logits1: Tensor, logits2: Tensor, target: Tensor):
        # fp16/bf16 logits give fp32 log-probabilities (as fairseq's get_normalized_probs)
        dtype = torch.promote_types(torch.promote_types(logits1.dtype, logits2.dtype), torch.float32)
        index = target.unsqueeze(-1)
        terms = [logits1.new_empty(logits1.size(0), dtype=dtype) for _ in range(5)]
        nll1, smooth1, nll2, smooth2, kl = terms
        for lo, hi in _row_blocks(logits1):
            lp1 = torch.log_softmax(logits1[lo:hi], dim=-1, dtype=dtype)
            lp2 = torch.log_softmax(logits2[lo:hi], dim=-1, dtype=dtype)
            nll1[lo:hi] = lp1.gather(-1, index[lo:hi]).squeeze(-1)
            nll2[lo:hi] = lp2.gather(-1, index[lo:hi]).squeeze(-1)
            smooth1[lo:hi], smooth2[lo:hi] = lp1.sum(-1), lp2.sum(-1)
            log_ratio = lp1 - lp2
            kl[lo:hi] = lp1.exp_().sub_(lp2.exp_()).mul_(log_ratio).sum(-1)
        for term in (nll1, smooth1, nll2, smooth2):
            term.neg_()
        kl.mul_(0.5)
        ctx.save_for_backward(logits1, logits2, index)
        ctx.dtype = dtype
        return nll1, smooth1, nll2, smooth2, kl

    @staticmethod
    def backward(ctx, grad_nll1, grad_smooth1, grad_nll2, grad_smooth2, grad_kl):
        logits1, logits2, index = ctx.saved_tensors
        wanted = ctx.needs_input_grad[:2]
        kl_scale = 0.5 * grad_kl.unsqueeze(-1)
        grad1 = torch.empty_like(logits1) if wanted[0] else None
        grad2 = torch.empty_like(logits2) if wanted[1] else None
        for lo, hi in _row_blocks(logits1):
            lp1 = torch.log_softmax(logits1[lo:hi], dim=-1, dtype=ctx.dtype)
            lp2 = torch.log_softmax(logits2[lo:hi], dim=-1, dtype=ctx.dtype)
            log_ratio = lp1 - lp2
            p1, p2 = lp1.exp_(), lp2.exp_()
            rows = slice(lo, hi)
            if wanted[0]:
                _logit_gradient(grad1[rows], p1, p2, log_ratio, kl_scale[rows], grad_nll1[rows],
                                grad_smooth1[rows], index[rows], ratio_sign=1.0)
            if wanted[1]:  # pass 2 is pass 1 with the roles swapped: r -> -r
                _logit_gradient(grad2[rows], p2, p1, log_ratio, kl_scale[rows], grad_nll2[rows],
                                grad_smooth2[rows], index[rows], ratio_sign=-1.0)
        return grad1, grad2, None


def _logit_gradient(out: Tensor, p: Tensor, other: Tensor, log_ratio: Tensor, kl_scale: Tensor,
                    grad_nll: Tensor, grad_smooth: Tensor, index: Tensor, ratio_sign: float) -> None:
    """One pass's gradient on its logits for a block of rows, written into ``out``:
    ``G = kl_scale ((1 + ratio_sign r) p - other) - grad_smooth - grad_nll onehot(target)`` on the
    log-probabilities (``ratio_sign`` is +1 for pass 1, -1 for pass 2), then ``G - p sum_v G``."""
    grad = out if out.dtype == p.dtype else torch.empty_like(p)
    torch.addcmul(p, log_ratio, p, value=ratio_sign, out=grad)
    grad.sub_(other).mul_(kl_scale).sub_(grad_smooth.unsqueeze(-1))
    grad.scatter_add_(-1, index, grad_nll.unsqueeze(-1).neg())
    grad.addcmul_(p, grad.sum(-1, keepdim=True), value=-1.0)
    if grad is not out:  # fp16/bf16 logits get their gradient in their own dtype
        out.copy_(grad)


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
    adaptive softmax, no get_normalized_probs of its own): then the loss can start from the logits.

    Asks the bound methods, not the model's class: in distributed training the criterion gets
    fairseq's wrapper, which forwards these attributes to the model inside."""
    decoder = getattr(model, "decoder", None)
    return (isinstance(decoder, FairseqDecoder)
            and getattr(decoder, "adaptive_softmax", None) is None
            and _function(model, "get_normalized_probs") in _PLAIN_MODEL_PROBS
            and _function(model, "get_normalized_probs_scriptable") is BaseFairseqModel.get_normalized_probs_scriptable
            and _function(decoder, "get_normalized_probs") is FairseqDecoder.get_normalized_probs
            and _function(decoder, "get_normalized_probs_scriptable") is FairseqDecoder.get_normalized_probs_scriptable)


def _function(obj, name: str):
    """The function behind ``obj.name`` when it is a method (None for anything else)."""
    return getattr(getattr(obj, name, None), "__func__", None)
