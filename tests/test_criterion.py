"""thor_consistency: two stochastic passes, CE on both + alpha x symmetric KL; one pass in eval."""

import pytest
import torch
from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss

from conftest import DictTask, build_model, random_batch
from fairseq_thor.criterions.thor_consistency import ThorConsistencyCriterion
from fairseq_thor.errors import ThorError
from fairseq_thor.modules.consistency import symmetric_kl


def make_sample(dictionary):
    src, lengths, prev = random_batch(dictionary, batch_size=3, tgt_len=4)
    target = torch.cat([prev[:, 1:], torch.full((3, 1), dictionary.eos())], dim=1)
    target[0, -2:] = dictionary.pad()  # padding that must not count
    ntokens = int(target.ne(dictionary.pad()).sum())
    return {"net_input": {"src_tokens": src, "src_lengths": lengths, "prev_output_tokens": prev},
            "target": target, "ntokens": ntokens}


def criterion(dictionary, alpha, smoothing=0.1):
    return ThorConsistencyCriterion(DictTask(dictionary), sentence_avg=False,
                                    label_smoothing=smoothing, consistency_alpha=alpha)


@pytest.mark.parametrize("alpha", [0.0, 2.5])
def test_training_loss_is_two_cross_entropies_plus_alpha_kl(dictionary, alpha):
    torch.manual_seed(0)
    model = build_model("thor_transformer", ["--num-experts", "4", "--expert-routing", "token"],
                        dictionary=dictionary).train()
    sample = make_sample(dictionary)
    crit = criterion(dictionary, alpha)
    torch.manual_seed(3)
    loss, sample_size, log = crit(model, sample)

    torch.manual_seed(3)  # replay the same two passes by hand
    pad = dictionary.pad()
    lps = [model.get_normalized_probs(model(**sample["net_input"]), log_probs=True).view(-1, len(dictionary))
           for _ in range(2)]
    target = sample["target"].view(-1)
    ces = [label_smoothed_nll_loss(lp, target, 0.1, ignore_index=pad)[0] for lp in lps]
    kl = symmetric_kl(lps[0], lps[1], target.eq(pad))
    assert kl.item() > 0, "token routing must make the two passes differ"
    torch.testing.assert_close(loss, ces[0] + ces[1] + alpha * kl)
    torch.testing.assert_close(log["consistency"], kl.data)
    assert sample_size == sample["ntokens"]


def test_gradient_flows_through_the_consistency_term(dictionary):
    torch.manual_seed(0)
    model = build_model("thor_transformer", ["--num-experts", "2", "--expert-routing", "token"],
                        dictionary=dictionary).train()
    sample = make_sample(dictionary)
    torch.manual_seed(1)
    criterion(dictionary, 0.0)(model, sample)[0].backward()
    without = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch.manual_seed(1)
    criterion(dictionary, 10.0)(model, sample)[0].backward()
    assert any(not torch.allclose(a, p.grad) for a, p in zip(without, model.parameters()))


def test_validation_is_a_single_pass_of_label_smoothed_ce(dictionary):
    torch.manual_seed(0)
    model = build_model("thor_transformer", ["--inference-routing", "fixed"], dictionary=dictionary).eval()
    sample = make_sample(dictionary)
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    loss, _, log = criterion(dictionary, 5.0)(model, sample)
    assert len(calls) == 1 and "consistency" not in log
    lp = model.get_normalized_probs(model(**sample["net_input"]), log_probs=True).view(-1, len(dictionary))
    expected = label_smoothed_nll_loss(lp, sample["target"].view(-1), 0.1, ignore_index=dictionary.pad())[0]
    torch.testing.assert_close(loss, expected)


def test_negative_alpha_is_refused(dictionary):
    with pytest.raises(ValueError, match="--consistency-alpha must be >= 0"):
        criterion(dictionary, -1.0)


def test_works_with_a_dense_model_and_logs_consistency(dictionary):
    model = build_model("transformer", dictionary=dictionary).train()
    loss, _, log = criterion(dictionary, 1.0)(model, make_sample(dictionary))
    assert torch.isfinite(loss) and "consistency" in log


def test_bf16_model_gets_fp32_consistency_without_overflow(dictionary):
    # what --bf16/--fp16 training relies on: log-probs come back in fp32 and the KL stays finite
    torch.manual_seed(0)
    model = build_model("thor_transformer", ["--num-experts", "4", "--expert-routing", "token"],
                        dictionary=dictionary).to(torch.bfloat16).train()
    loss, _, log = criterion(dictionary, 5.0)(model, make_sample(dictionary))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert log["consistency"].dtype == torch.float32 and log["consistency"] > 0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ---- --fuse-passes: one forward over the batch stacked with itself ------------------------------

class RecordedDraws:
    """Stand-in for routing's random draws: records them (``mode='record'``), or replays them
    so that a fused forward sees, in every layer call, pass 1's draws followed by pass 2's."""

    def __init__(self, monkeypatch):
        from fairseq_thor.modules import routing
        self.real_sentence, self.real_token = routing.draw_sentence_experts, routing.draw_token_experts
        self.calls, self.replay = [], None
        monkeypatch.setattr(routing, "draw_sentence_experts", self.sentence)
        monkeypatch.setattr(routing, "draw_token_experts", self.token)

    def _next(self, fresh, stack):
        if self.replay is None:
            self.calls.append(fresh())
            return self.calls[-1]
        i = self.replay
        self.replay += 1
        per_pass = len(self.calls) // 2
        return stack(self.calls[i], self.calls[i + per_pass])

    def sentence(self, mode, num_experts, batch_size):
        return self._next(lambda: self.real_sentence(mode, num_experts, batch_size),
                          lambda a, b: torch.cat([a, b]))

    def token(self, num_experts, seq_len, batch_size):
        return self._next(lambda: self.real_token(num_experts, seq_len, batch_size),
                          lambda a, b: torch.cat([a, b], dim=1))


@pytest.mark.parametrize("routing", ["sentence", "token"])
def test_fused_passes_give_the_two_call_loss_and_gradients(dictionary, monkeypatch, routing):
    draws = RecordedDraws(monkeypatch)
    torch.manual_seed(0)
    model = build_model("thor_transformer", ["--num-experts", "4", "--expert-routing", routing],
                        dictionary=dictionary).train()  # conftest's TINY: dropout 0
    sample = make_sample(dictionary)
    two_calls = criterion(dictionary, 2.5)
    loss, _, log = two_calls(model, sample)
    loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert log["consistency"] > 0  # the passes differ: the equality below is not trivial
    model.zero_grad()

    draws.replay = 0
    fused = ThorConsistencyCriterion(DictTask(dictionary), sentence_avg=False, label_smoothing=0.1,
                                     consistency_alpha=2.5, fuse_passes=True)
    fused_loss, _, fused_log = fused(model, sample)
    fused_loss.backward()
    assert draws.replay == len(draws.calls) // 2  # one fused layer call per two recorded ones
    torch.testing.assert_close(fused_loss, loss)
    torch.testing.assert_close(fused_log["consistency"], log["consistency"])
    for name, grad in expected.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, msg=name)


def test_fusing_is_refused_where_the_copies_would_share_a_draw(dictionary):
    model = build_model("thor_transformer", ["--num-experts", "4", "--expert-routing", "batch"],
                        dictionary=dictionary).train()
    fused = ThorConsistencyCriterion(DictTask(dictionary), sentence_avg=False, label_smoothing=0.1,
                                     consistency_alpha=1.0, fuse_passes=True)
    with pytest.raises(ThorError, match="--fuse-passes needs --expert-routing sentence or token, got batch"):
        fused(model, make_sample(dictionary))


# ---- expert load of THOR's draws ------------------------------------------------------------------

@pytest.mark.parametrize("routing", ["batch", "sentence", "token"])
def test_the_largest_expert_share_of_the_draws_is_logged(dictionary, routing):
    from fairseq import metrics

    torch.manual_seed(0)
    model = build_model("thor_transformer", ["--num-experts", "4", "--expert-routing", routing],
                        dictionary=dictionary).train()
    _, _, log = criterion(dictionary, 1.0)(model, make_sample(dictionary))
    layer_calls = 2 * 2  # conftest's TINY: 2+2 layers, experts in every other one; two passes
    assert log["draw_layer_calls"] == layer_calls
    mean_share = log["draw_load_max"] / layer_calls
    if routing == "batch":
        assert mean_share == 1.0  # one expert per batch, by design
    else:
        assert 0.25 <= mean_share < 1.0
    assert all(getattr(m, "draw_counts", None) is None for m in model.modules())  # read once
    with metrics.aggregate() as agg:
        ThorConsistencyCriterion.reduce_metrics([log, log])
    assert agg.get_smoothed_values()["expert_load_max"] == pytest.approx(round(mean_share, 4))
    model.eval()
    with torch.no_grad():
        model(**make_sample(dictionary)["net_input"])
    assert all(getattr(m, "draw_counts", None) is None for m in model.modules())  # evaluation: not counted


# ---- the loss from logits (modules/two_pass_loss) and from log-probabilities agree -------------

@pytest.mark.parametrize("reduce,prefix", [(True, 0), (False, 0), (True, 1)])
def test_loss_from_logits_equals_the_loss_from_log_probabilities(dictionary, monkeypatch, reduce, prefix):
    """Same draws, two ways to the loss: the criterion's own (from the logits in one piece) and
    the log-probability path it keeps for other models; loss, logged terms and every gradient."""
    torch.manual_seed(0)
    model = build_model("thor_transformer", ["--num-experts", "4", "--expert-routing", "token"],
                        dictionary=dictionary).train()
    sample = make_sample(dictionary)
    crit = ThorConsistencyCriterion(DictTask(dictionary), sentence_avg=False, label_smoothing=0.1,
                                    consistency_alpha=2.5, ignore_prefix_size=prefix)
    results = []
    for from_logits in (True, False):
        monkeypatch.setattr("fairseq_thor.criterions.thor_consistency.log_probs_are_log_softmax",
                            lambda model, v=from_logits: v)
        model.zero_grad()
        torch.manual_seed(7)
        loss, _, log = crit(model, sample, reduce=reduce)
        loss.sum().backward()
        results.append((loss, log, [p.grad.clone() for p in model.parameters()]))
    (loss_a, log_a, grads_a), (loss_b, log_b, grads_b) = results
    assert loss_a.shape == loss_b.shape
    torch.testing.assert_close(loss_a, loss_b)
    for key in ("nll_loss", "consistency"):
        torch.testing.assert_close(log_a[key], log_b[key])
    assert log_a["consistency"].sum() > 0
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("alpha", [1.0, 5.0])
def test_on_a_dense_model_it_is_fairseqs_rdrop_objective(dictionary, alpha):
    """The quality study's `rdropf` row (dense + thor_consistency) stands for R-Drop: with the passes
    fused, both criteria run the same stacked forward, so under one seed they see the same dropout
    masks and must give fairseq's loss, sample size and gradients exactly (unfused, the two passes
    draw their masks apart: the same objective in distribution)."""
    from fairseq.criterions.label_smoothed_cross_entropy_with_rdrop import (
        RdropLabelSmoothedCrossEntropyCriterion)

    torch.manual_seed(0)
    model = build_model("transformer", ["--dropout", "0.3", "--attention-dropout", "0.2"],
                        dictionary=dictionary).train()
    sample = make_sample(dictionary)
    ours = ThorConsistencyCriterion(DictTask(dictionary), sentence_avg=False, label_smoothing=0.1,
                                    consistency_alpha=alpha, fuse_passes=True)
    fairseqs = RdropLabelSmoothedCrossEntropyCriterion(DictTask(dictionary), sentence_avg=False,
                                                        label_smoothing=0.1, rdrop_alpha=alpha)

    def run(crit):
        torch.manual_seed(1)
        model.zero_grad()
        loss, sample_size, _ = crit(model, {**sample, "net_input": dict(sample["net_input"])})
        loss.backward()
        return loss.detach(), sample_size, [p.grad.clone() for p in model.parameters()]

    (ours_loss, ours_size, ours_grads), (their_loss, their_size, their_grads) = run(ours), run(fairseqs)
    assert ours_size == their_size == sample["ntokens"]
    torch.testing.assert_close(ours_loss, their_loss, rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(ours_grads, their_grads):
        # the two sum the same terms in another order: in float32 that moves an entry near zero by
        # ~1e-6 on some CPUs (seen on AVX2 only), so the floor scales with the tensor; a wrong term
        # (alpha, a missing KL direction) moves entries by a sizeable share of the largest
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6 + 1e-4 * theirs.abs().max().item())
    torch.manual_seed(2)  # a different mask draw gives a different loss: the masks above were shared
    assert not torch.allclose(ours(model, sample)[0], their_loss)
