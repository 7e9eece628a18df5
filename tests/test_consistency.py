"""The symmetric KL of THOR's consistency regulariser."""
import math

import torch

from fairseq_thor.modules.consistency import symmetric_kl


def test_zero_for_identical_distributions():
    lp = torch.randn(6, 10).log_softmax(-1)
    assert symmetric_kl(lp, lp).abs().item() < 1e-6


def test_symmetric_and_positive():
    torch.manual_seed(0)
    p, q = torch.randn(6, 10).log_softmax(-1), torch.randn(6, 10).log_softmax(-1)
    a, b = symmetric_kl(p, q), symmetric_kl(q, p)
    torch.testing.assert_close(a, b)
    assert a.item() > 0


def test_matches_hand_computation():
    p = torch.tensor([[0.5, 0.25, 0.25]])
    q = torch.tensor([[0.25, 0.25, 0.5]])
    kl_pq = 0.5 * math.log(2) + 0.25 * math.log(0.5)
    kl_qp = 0.25 * math.log(0.5) + 0.5 * math.log(2)
    got = symmetric_kl(p.log(), q.log())
    assert abs(got.item() - 0.5 * (kl_pq + kl_qp)) < 1e-6


def test_ignores_padding_positions():
    torch.manual_seed(0)
    p, q = torch.randn(4, 10).log_softmax(-1), torch.randn(4, 10).log_softmax(-1)
    pad = torch.tensor([False, True, False, True])
    masked = symmetric_kl(p, q, pad)
    torch.testing.assert_close(masked, symmetric_kl(p[~pad], q[~pad]))
    assert masked < symmetric_kl(p, q)


def test_computed_in_fp32_from_half_inputs():
    torch.manual_seed(0)
    p = torch.randn(4, 50).log_softmax(-1)
    q = torch.randn(4, 50).log_softmax(-1)
    got = symmetric_kl(p.to(torch.bfloat16), q.to(torch.bfloat16), reduce=False)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()


def test_gradient_matches_finite_differences():
    torch.manual_seed(0)
    p = torch.randn(5, 7, dtype=torch.double).log_softmax(-1).requires_grad_()
    q = torch.randn(5, 7, dtype=torch.double).log_softmax(-1).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: symmetric_kl(a, b, reduce=False), (p, q))


def test_equals_two_kl_div_calls():
    import torch.nn.functional as F

    torch.manual_seed(1)
    p, q = torch.randn(6, 11).log_softmax(-1), torch.randn(6, 11).log_softmax(-1)
    expected = 0.5 * (F.kl_div(q, p, log_target=True, reduction="sum")
                      + F.kl_div(p, q, log_target=True, reduction="sum"))
    torch.testing.assert_close(symmetric_kl(p, q), expected)
