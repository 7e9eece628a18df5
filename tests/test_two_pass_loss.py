"""THOR's loss computed from the two passes' logits in one piece (modules/two_pass_loss) equals the
autograd composition it replaces: log_softmax, fairseq's label_smoothed_nll_loss, symmetric KL."""
import pytest
import torch
from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss
from fairseq.distributed import ModuleProxyWrapper

from conftest import build_model
from fairseq_thor.modules import two_pass_loss
from fairseq_thor.modules.consistency import symmetric_kl
from fairseq_thor.modules.two_pass_loss import label_smoothed, log_probs_are_log_softmax, two_pass_losses

PAD = 1


def logits_and_target(rows=7, vocab=11, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    z1 = (3 * torch.randn(rows, vocab, generator=g, dtype=dtype)).requires_grad_()
    z2 = (3 * torch.randn(rows, vocab, generator=g, dtype=dtype)).requires_grad_()
    target = torch.randint(2, vocab, (rows,), generator=g)
    target[[1, rows - 2]] = PAD
    return z1, z2, target


def composed_terms(z1, z2, target):
    """The reference: the per-position terms as fairseq and symmetric_kl compute them."""
    lps = [z.float().log_softmax(-1) for z in (z1, z2)]
    pad = target.eq(PAD)
    terms = []
    for lp in lps:
        nll = -lp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        smooth = -lp.sum(-1)
        terms += [nll.masked_fill(pad, 0.0), smooth.masked_fill(pad, 0.0)]
    return terms + [symmetric_kl(lps[0], lps[1], pad, reduce=False)]


BLOCKS = pytest.mark.parametrize("block_rows", [None, 1, 2, 3], ids=["one-block", "1-row", "2-rows", "3-rows"])


def blocks_of(monkeypatch, block_rows, vocab=11):
    """Work in blocks of ``block_rows`` rows (the CPU blocking, at a size the test can see)."""
    if block_rows is not None:
        monkeypatch.setattr(two_pass_loss, "CPU_BLOCK_BYTES", 4 * vocab * block_rows)


@BLOCKS
def test_terms_equal_the_composition_and_padding_is_zero(monkeypatch, block_rows):
    blocks_of(monkeypatch, block_rows)
    z1, z2, target = logits_and_target()
    got = two_pass_losses(z1, z2, target, PAD)
    for a, b in zip(got, composed_terms(z1, z2, target)):
        torch.testing.assert_close(a, b)
    assert all(term[target.eq(PAD)].eq(0).all() for term in got)
    assert got.kl[target.ne(PAD)].gt(0).all() and got.nll1.gt(0).sum() == 5


@BLOCKS
@pytest.mark.parametrize("weights", [(1.0, 0.3, 2.0, 0.7, 5.0), (0.0, 0.0, 0.0, 0.0, 1.0), (1.0, 1.0, 0.0, 0.0, 0.0)])
def test_logit_gradients_equal_the_composition(monkeypatch, block_rows, weights):
    blocks_of(monkeypatch, block_rows)
    z1, z2, target = logits_and_target(seed=1)
    g = torch.Generator().manual_seed(2)
    # per-row weights on every term, as reduce=False hands them back
    row_weights = [w * torch.rand(target.numel(), generator=g) for w in weights]

    def grads(terms):
        total = sum((w * t).sum() for w, t in zip(row_weights, terms))
        return torch.autograd.grad(total, (z1, z2))

    for a, b in zip(grads(two_pass_losses(z1, z2, target, PAD)), grads(composed_terms(z1, z2, target))):
        torch.testing.assert_close(a, b)
        assert a[target.eq(PAD)].eq(0).all()


def test_gradient_matches_finite_differences(monkeypatch):
    blocks_of(monkeypatch, 2, vocab=6)
    z1, z2, target = logits_and_target(rows=5, vocab=6, dtype=torch.double, seed=3)
    assert torch.autograd.gradcheck(lambda a, b: two_pass_losses(a, b, target, PAD), (z1, z2))


def test_half_precision_logits_give_fp32_terms_and_gradients_of_their_own_dtype(monkeypatch):
    blocks_of(monkeypatch, 4, vocab=50)
    z1, z2, target = logits_and_target(rows=6, vocab=50, seed=4)
    h1, h2 = (z.detach().to(torch.bfloat16).requires_grad_() for z in (z1, z2))
    terms = two_pass_losses(h1, h2, target, PAD)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in terms)
    for a, b in zip(terms, composed_terms(h1.detach(), h2.detach(), target)):
        torch.testing.assert_close(a, b)
    sum(t.sum() for t in terms).backward()
    assert h1.grad.dtype == torch.bfloat16 and torch.isfinite(h1.grad.float()).all()


def test_label_smoothed_is_fairseqs_combination():
    z1, _, target = logits_and_target(seed=5)
    lp = z1.log_softmax(-1)
    expected, expected_nll = label_smoothed_nll_loss(lp, target, 0.1, ignore_index=PAD)
    terms = two_pass_losses(z1, z1, target, PAD)
    torch.testing.assert_close(label_smoothed(terms.nll1.sum(), terms.smooth1.sum(), 0.1, 11), expected)
    torch.testing.assert_close(terms.nll1.sum(), expected_nll)


def test_leading_dimensions_are_flattened():
    z1, z2, target = logits_and_target(rows=6)
    flat = two_pass_losses(z1, z2, target, PAD)
    shaped = two_pass_losses(z1.view(2, 3, -1), z2.view(2, 3, -1), target.view(2, 3), PAD)
    for a, b in zip(flat, shaped):
        torch.testing.assert_close(a, b)


def test_plain_log_softmax_is_recognised_and_anything_else_is_not(dictionary):
    thor = build_model("thor_transformer", ["--num-experts", "2"], dictionary=dictionary)
    dense = build_model("transformer", dictionary=dictionary)
    assert log_probs_are_log_softmax(thor) and log_probs_are_log_softmax(dense)

    class DataParallel(torch.nn.Module):  # what fairseq's distributed wrappers look like
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert log_probs_are_log_softmax(ModuleProxyWrapper(DataParallel(thor)))

    class OwnProbs(type(thor)):
        def get_normalized_probs(self, net_output, log_probs, sample=None):
            return super().get_normalized_probs(net_output, log_probs, sample)

    thor.__class__ = OwnProbs
    assert not log_probs_are_log_softmax(thor)
    dense.decoder.adaptive_softmax = torch.nn.Identity()
    assert not log_probs_are_log_softmax(dense)
    own = build_model("thor_transformer", ["--num-experts", "2"], dictionary=dictionary)
    own.get_normalized_probs = lambda *a, **k: None  # an instance's own function
    assert not log_probs_are_log_softmax(own)


def test_cpu_rows_go_in_cache_sized_blocks_that_cover_every_row():
    blocks = list(two_pass_loss._row_blocks(torch.empty(1000, 8000)))
    assert blocks[0] == (0, 16) and blocks[-1] == (992, 1000)  # 16 rows x 8,000 x 4 bytes = 512 KiB
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))


def test_an_empty_batch_gives_empty_terms_and_gradients():
    z1, z2, target = (torch.zeros(0, 11, requires_grad=True), torch.zeros(0, 11, requires_grad=True),
                      torch.zeros(0, dtype=torch.long))
    terms = two_pass_losses(z1, z2, target, PAD)
    assert all(t.shape == (0,) for t in terms)
    sum(t.sum() for t in terms).backward()
    assert z1.grad.shape == (0, 11)
