"""Baseline routers inside THOR's expert layers: Switch top-1, GShard top-2, hash (vs stochastic)."""
import re

import pytest
import torch
import torch.nn.functional as F

from conftest import build_model, make_dictionary, random_batch
from fairseq_thor.criterions.router_stats import collect_decisions, router_loss_and_log
from fairseq_thor.errors import ThorError
from fairseq_thor.modules.experts import ExpertLinear, routed
from fairseq_thor.modules.routing import Route, RouteKind, route_from_choices
from test_cli import NUM_TEST, hypotheses, make_toy_data, run

ROUTERS = ["switch", "gshard", "hash"]


def routed_model(router, *extra):
    torch.manual_seed(0)
    return build_model(extra=["--num-experts", "4", "--expert-router", router, *extra],
                       dictionary=make_dictionary())


def padded_batch():
    src, lengths, prev = random_batch(make_dictionary(), batch_size=3, src_len=6, tgt_len=5)
    src[0, :2] = 1  # left padding in the first sentence (fairseq pads sources on the left)
    lengths[0] = 4
    return src, lengths, prev


def test_gated_route_computes_weighted_sum_of_chosen_experts():
    torch.manual_seed(0)
    fc1, fc2 = ExpertLinear(3, 4, 8, dispatches=True), ExpertLinear(3, 8, 4, dispatches=False)
    x = torch.randn(5, 4)
    experts = torch.tensor([[0, 2], [1, -1], [-1, -1], [2, 0], [1, 2]])
    weights = torch.tensor([[0.7, 0.3], [1.0, 0.0], [0.0, 0.0], [0.4, 0.6], [0.5, 0.5]])
    route = Route(kind=RouteKind.GATED, decide=lambda rows: route_from_choices(experts, weights, 3))
    with routed(route, fc1, fc2):
        out = fc2(F.relu(fc1(x)))
    expected = torch.zeros(5, 4)
    for s in range(5):
        for e, w in zip(experts[s].tolist(), weights[s].tolist()):
            if e >= 0:
                h = F.relu(F.linear(x[s], fc1.weight[e], fc1.bias[e]))
                expected[s] += w * F.linear(h, fc2.weight[e], fc2.bias[e])
    torch.testing.assert_close(out, expected)
    assert torch.equal(out[2], torch.zeros(4))  # a dropped row contributes nothing


@pytest.mark.parametrize("router", ROUTERS)
def test_every_token_is_routed_or_counted_as_dropped(router):
    model = routed_model(router)
    src, lengths, prev = padded_batch()
    out = model(src, lengths, prev)[0]
    assert out.shape == (3, 5, len(make_dictionary()))
    decisions = collect_decisions(model)
    assert len(decisions) == 2  # the expert layers: encoder 0 and decoder 0
    encoder = decisions[0]
    assert encoder.experts.size(0) == 3 * 6 - 2  # padding takes no capacity
    kept = encoder.experts >= 0
    assert int(encoder.dropped) == int((~kept.any(dim=1)).sum())
    assert encoder.experts.size(1) == (2 if router == "gshard" else 1)


@pytest.mark.parametrize("router", ["switch", "gshard"])
def test_learned_gates_add_a_load_balancing_loss_with_gradient(router):
    model = routed_model(router)
    model(*padded_batch())
    aux, log = router_loss_and_log(model, sample_size=10)
    assert aux.item() > 0 and log["aux_loss"] > 0 and 0 < log["expert_load_max"] <= 1
    aux.backward()
    gate = model.encoder.layers[0].gate
    assert gate.wg.weight.grad is not None and gate.wg.weight.grad.abs().sum() > 0


def test_thor_and_hash_have_no_auxiliary_loss():
    thor = build_model(extra=["--num-experts", "4"])
    thor(*padded_batch())
    assert router_loss_and_log(thor, sample_size=10) == (0.0, {})
    hashed = routed_model("hash")
    hashed(*padded_batch())
    aux, log = router_loss_and_log(hashed, sample_size=10)
    assert float(aux) == 0 and not aux.requires_grad and log["gate_entropy"] == 0


def test_hash_routing_depends_on_the_token_only():
    model = routed_model("hash")
    table = model.encoder.layers[0].gate.table
    src, lengths, prev = padded_batch()
    model(src, lengths, prev)
    first = collect_decisions(model)[0].experts.squeeze(1)
    nonpad = src.t().reshape(-1)[src.t().reshape(-1) != 1]
    assert torch.equal(first, table[nonpad])
    assert torch.equal(routed_model("hash").encoder.layers[0].gate.table, table)  # rebuilt: same


def test_router_options_are_checked():
    with pytest.raises(SystemExit):
        routed_model("top3")
    for bad in ("0", "-1", "inf", "nan"):  # inf used to abort the process at the first step
        with pytest.raises(ThorError, match=r"--capacity-factor must be a finite number > 0 \(0 < F < inf\)"):
            routed_model("switch", "--capacity-factor", bad)
    for bad in ("0", "-1", "inf", "nan"):
        with pytest.raises(ValueError, match="--eval-capacity-factor must be a finite number > 0"):
            routed_model("gshard", "--eval-capacity-factor", bad)
    with pytest.raises(ValueError, match="--eval-capacity-factor must be a finite number > 0"):
        routed_model("switch").set_eval_capacity_factor(0.0)


def dropped_choices(model, training):
    """Choices the expert layers dropped in one pass over a padded batch, and all choices."""
    model.train(training)
    with torch.no_grad():
        model(*padded_batch())
    experts = [d.experts for d in collect_decisions(model)]
    return sum(int((e < 0).sum()) for e in experts), sum(e.numel() for e in experts)


@pytest.mark.parametrize("router", ROUTERS)
def test_evaluation_drops_no_token_unless_given_a_capacity(router):
    # experts with room for a quarter of their even share: training drops many tokens
    model = routed_model(router, "--capacity-factor", "0.25")
    gated = router != "hash"  # hash routing has no capacity at all
    assert (dropped_choices(model, training=True)[0] > 0) == gated
    dropped, routed = dropped_choices(model, training=False)
    assert dropped == 0 and routed > 0
    model.set_eval_capacity_factor(0.25)  # what --eval-capacity-factor does when decoding
    assert (dropped_choices(model, training=False)[0] > 0) == gated
    model.set_eval_capacity_factor(None)
    assert dropped_choices(model, training=False)[0] == 0
    built = routed_model(router, "--capacity-factor", "4", "--eval-capacity-factor", "0.25")
    assert dropped_choices(built, training=True)[0] == 0
    assert (dropped_choices(built, training=False)[0] > 0) == gated


@pytest.mark.cli
@pytest.mark.parametrize("router", ROUTERS)
def test_each_router_trains_and_decodes_through_the_cli(router, tmp_path_factory):
    root = tmp_path_factory.mktemp(router)
    data = make_toy_data(root)
    _, log = run("fairseq-train", data, "--user-dir", "fairseq_thor", "--cpu", "--task",
                 "translation_thor", "--arch", "thor_transformer_tiny", "--num-experts", "4",
                 "--expert-router", router, "--criterion", "moe_label_smoothed_cross_entropy",
                 "--label-smoothing", "0.1", "--optimizer", "adam", "--lr", "0.003",
                 "--max-tokens", "1000", "--max-update", "3", "--save-dir", root / "ckpt",
                 "--log-format", "simple", "--log-interval", "1", "--no-epoch-checkpoints")
    for key in ("aux_loss", "expert_load_max", "dropped", "gate_entropy"):
        assert f"| {key} " in log, key
    _, out = run("fairseq-generate", data, "--user-dir", "fairseq_thor", "--task", "translation_thor",
                 "--cpu", "--path", root / "ckpt" / "checkpoint_last.pt", "--gen-subset", "test",
                 "--beam", "2", "--max-len-b", "8")
    assert out.count("\nH-") == 13


# fairseq-generate with every learned gate's choices counted (the layers keep only the last
# decision, and decoding runs no criterion to log them)
COUNTING_GENERATE = """
from fairseq_cli.generate import cli_main
from fairseq_thor.modules.gates import SwitchGate, Top2Gate
tally = {"choices": 0, "dropped": 0}
def counted(forward):
    def counting_forward(self, x):
        decision = forward(self, x)
        tally["choices"] += decision.experts.numel()
        tally["dropped"] += int((decision.experts < 0).sum())
        return decision
    return counting_forward
for gate in (SwitchGate, Top2Gate):
    gate.forward = counted(gate.forward)
cli_main()
print("gate choices {choices} dropped {dropped}".format(**tally))
"""


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    return make_toy_data(tmp_path_factory.mktemp("eval_capacity"))


def generate_counting_drops(data, ckpt, *extra):
    _, out = run("python", "-c", COUNTING_GENERATE, data, "--user-dir", "fairseq_thor", "--cpu",
                 "--task", "translation_thor", "--path", ckpt, "--gen-subset", "test",
                 "--beam", "3", "--max-len-b", "8", *extra)
    assert len(hypotheses(out)) == NUM_TEST
    choices, dropped = map(int, re.search(r"^gate choices (\d+) dropped (\d+)$", out, re.M).groups())
    assert choices > 0
    return dropped


@pytest.mark.cli
@pytest.mark.parametrize("router", ["switch", "gshard"])
def test_a_small_training_capacity_drops_tokens_in_training_only(router, toy_data, tmp_path):
    ckpt = tmp_path / "checkpoint_last.pt"
    _, log = run("fairseq-train", toy_data, "--user-dir", "fairseq_thor", "--cpu", "--task",
                 "translation_thor", "--arch", "thor_transformer_tiny", "--num-experts", "4",
                 "--expert-router", router, "--capacity-factor", "0.25",
                 "--criterion", "moe_label_smoothed_cross_entropy", "--optimizer", "adam",
                 "--lr", "0.003", "--max-tokens", "1000", "--max-update", "2", "--save-dir", tmp_path,
                 "--log-format", "simple", "--log-interval", "1", "--no-epoch-checkpoints")
    train_drops = [float(x) for x in re.findall(r"train_inner .*, dropped=([\d.]+),", log)]
    assert len(train_drops) == 2 and min(train_drops) > 0.2, log[-3000:]
    assert re.search(r"valid on 'valid' subset .*\| dropped 0 \|", log), log[-3000:]
    assert generate_counting_drops(toy_data, ckpt) == 0  # beam search at the default: no cap
    assert generate_counting_drops(toy_data, ckpt, "--eval-capacity-factor", "0.25") > 0
    if router == "switch":  # the same setting through the checkpoint's config: the router plays no part
        assert generate_counting_drops(
            toy_data, ckpt, "--model-overrides", "{'eval_capacity_factor': 0.25}") > 0
