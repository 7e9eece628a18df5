"""The plugin on a CUDA device: each component gives the CPU fp32 result in fp32, fp16 and bf16.

Marked ``cuda`` and skipped where no CUDA device is there (the development machines and CI);
benchmarks/gpu/check.sh runs them on a GPU machine (``pytest -m cuda``). Expert draws come from
torch's CPU generator whatever the device (modules/routing.py), so seeding the same way replays
the same experts on both sides and the outputs must agree up to the precision's rounding.

``FAIRSEQ_THOR_TEST_DEVICE=cpu`` runs the same comparisons against a second CPU copy (the GPU
check's CPU rehearsal does), so this file cannot rot between GPU runs.
"""
import copy
import os

import pytest
import torch

from conftest import build_model, make_dictionary
from fairseq_thor.modules.consistency import symmetric_kl
from fairseq_thor.modules.two_pass_loss import two_pass_losses
from test_criterion import criterion, make_sample

DEVICE = os.environ.get("FAIRSEQ_THOR_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                 reason="needs a CUDA device")]

# largest |difference| allowed, relative to the largest |value| of the CPU fp32 result; the
# consistency term and gradients are small differences of large terms: ten times as much
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}
DIFFERENCE_TOLERANCE = {dtype: 10 * tol for dtype, tol in TOLERANCE.items()}
PRECISIONS = pytest.mark.parametrize("dtype", list(TOLERANCE), ids=["fp32", "fp16", "bf16"])


def assert_near(actual, expected, dtype, what, tolerance=TOLERANCE):
    actual, expected = actual.detach().float().cpu(), expected.detach().float().cpu()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values on {DEVICE}"
    scale = expected.abs().max().clamp_min(1e-6)
    error = ((actual - expected).abs().max() / scale).item()
    assert error <= tolerance[dtype], f"{what}: relative error {error:.2e} > {tolerance[dtype]:.0e}"


def on_device(model, dtype):
    return copy.deepcopy(model).to(device=DEVICE, dtype=dtype)


def device_batch(batch):
    return {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in batch.items()}


def logits(model, sample, seed):
    torch.manual_seed(seed)  # the same expert draws on both devices
    return model(**sample["net_input"])[0]


def model_and_sample(extra):
    dictionary = make_dictionary()
    torch.manual_seed(0)
    return build_model("thor_transformer", extra, dictionary=dictionary), make_sample(dictionary)


@PRECISIONS
@pytest.mark.parametrize("routing", ["batch", "sentence", "token"])
def test_training_routing_gives_the_cpu_output(routing, dtype):
    model, sample = model_and_sample(["--num-experts", "4", "--expert-routing", routing])
    gpu = on_device(model, dtype).train()  # copied before a forward leaves state on the model
    expected = logits(model.train(), sample, seed=5)
    assert_near(logits(gpu, {"net_input": device_batch(sample["net_input"])}, seed=5), expected, dtype,
                f"{routing} routing")


def assert_evaluation_matches_cpu(extra, dtype, what):
    model, sample = model_and_sample(["--num-experts", "4", *extra])
    gpu = on_device(model, dtype).eval()
    expected = logits(model.eval(), sample, seed=5)
    with torch.no_grad():
        actual = logits(gpu, {"net_input": device_batch(sample["net_input"])}, seed=5)
    assert_near(actual, expected, dtype, what)


@PRECISIONS
@pytest.mark.parametrize("routing", ["sentence", "token", "fixed", "mean", "merged"])
def test_inference_routing_gives_the_cpu_output(routing, dtype):
    assert_evaluation_matches_cpu(["--inference-routing", routing], dtype, f"{routing} inference")


@PRECISIONS
@pytest.mark.parametrize("router", ["switch", "gshard", "hash"])
def test_gated_routers_give_the_cpu_output(router, dtype):
    # evaluation mode: GShard samples its second expert in training, from a device-side sampler
    assert_evaluation_matches_cpu(["--expert-router", router], dtype, f"{router} router")


@PRECISIONS
def test_symmetric_kl_gives_the_cpu_value_and_gradient(dtype):
    g = torch.Generator().manual_seed(0)
    lp1, lp2 = (torch.randn(6, 50, generator=g).mul(3).log_softmax(-1) for _ in range(2))
    pad = torch.tensor([False, False, True, False, False, True])
    cpu = [t.clone().requires_grad_() for t in (lp1, lp2)]
    expected = symmetric_kl(*cpu, pad)
    expected.backward()
    gpu = [t.to(DEVICE, dtype).requires_grad_() for t in (lp1, lp2)]
    actual = symmetric_kl(*gpu, pad.to(DEVICE))
    assert actual.dtype == torch.float32  # half-precision inputs are upcast
    actual.backward()
    assert_near(actual, expected, dtype, "symmetric KL")
    for got, want in zip(gpu, cpu):
        assert_near(got.grad, want.grad, dtype, "symmetric KL gradient", DIFFERENCE_TOLERANCE)


@PRECISIONS
def test_two_pass_loss_gives_the_cpu_terms_and_logit_gradients(dtype):
    g = torch.Generator().manual_seed(0)
    z1, z2 = (torch.randn(6, 50, generator=g).mul(3) for _ in range(2))
    target = torch.randint(2, 50, (6,), generator=g)
    target[[2, 5]] = 1  # padding
    weights = torch.rand(5, 6, generator=g)  # a different weight on each term and row

    def run(logits, tgt):
        terms = two_pass_losses(*logits, tgt, padding_idx=1)
        sum((w.to(t.device) * t).sum() for w, t in zip(weights, terms)).backward()
        return terms

    cpu = [z.clone().requires_grad_() for z in (z1, z2)]
    expected = run(cpu, target)
    gpu = [z.to(DEVICE, dtype).requires_grad_() for z in (z1, z2)]
    actual = run(gpu, target.to(DEVICE))
    for name, got, want in zip(expected._fields, actual, expected):
        assert got.dtype == torch.float32  # half-precision logits give fp32 terms
        assert_near(got, want, dtype, f"two-pass loss {name}",
                    DIFFERENCE_TOLERANCE if name == "kl" else TOLERANCE)
    for got, want in zip(gpu, cpu):
        assert got.grad.dtype == dtype
        assert_near(got.grad, want.grad, dtype, "two-pass loss logit gradient", DIFFERENCE_TOLERANCE)


@PRECISIONS
@pytest.mark.parametrize("fuse_passes", [False, True], ids=["two-calls", "fused"])
def test_consistency_criterion_gives_the_cpu_loss_and_gradients(dtype, fuse_passes):
    model, sample = model_and_sample(["--num-experts", "4", "--expert-routing", "token"])
    crit = criterion(make_dictionary(), 2.5)
    crit.fuse_passes = fuse_passes
    gpu = on_device(model, dtype).train()
    model.train()
    torch.manual_seed(7)
    loss, _, log = crit(model, sample)
    loss.backward()
    torch.manual_seed(7)
    gpu_sample = dict(sample, net_input=device_batch(sample["net_input"]), target=sample["target"].to(DEVICE))
    gpu_loss, _, gpu_log = crit(gpu, gpu_sample)
    gpu_loss.backward()
    assert log["consistency"] > 0
    assert_near(gpu_loss, loss, dtype, "loss")
    assert_near(gpu_log["consistency"], log["consistency"], dtype, "consistency", DIFFERENCE_TOLERANCE)
    # one vector, one scale: some gradients are zero in exact arithmetic (the key projection's
    # bias) and only rounding noise on either side, so a per-parameter relative error means nothing
    pairs = [(q.grad, p.grad) for p, q in zip(model.parameters(), gpu.parameters()) if p.grad is not None]
    assert_near(torch.cat([a.float().flatten().cpu() for a, _ in pairs]),
                torch.cat([b.flatten() for _, b in pairs]), dtype, "gradients", DIFFERENCE_TOLERANCE)
