"""Gated routers (Switch, GShard top-2, hash) keep their GateDecision contract, and the contract
turns into fairscale MOELayer dispatch tensors that give every row back its weighted experts."""
import math

import pytest
import torch
from fairscale.nn.moe.top2gate import gumbel_map, top2gating

from fairseq_thor.modules.gate_decision import (
    decision_to_dispatch,
    expert_counts,
    load_balancing_loss,
)
from fairseq_thor.modules.gates import HashGate, SwitchGate, Top2Gate


def set_gate(gate, weight):
    with torch.no_grad():
        gate.wg.weight.copy_(weight)
    return gate


def peaked_rows(first, second, num_experts):
    """Rows whose top choice is ``first[s]`` and runner-up ``second[s]``, by margins (100, 50)
    far beyond the reach of Gumbel noise, so train and eval routing agree."""
    logits = torch.zeros(len(first), num_experts)
    logits[torch.arange(len(first)), first] = 100.0
    logits[torch.arange(len(first)), second] = 50.0
    return logits


def identity_gate(gate_cls, num_experts, **kwargs):
    """A gate with model_dim == E whose logits are its input rows."""
    return set_gate(gate_cls(num_experts, num_experts, **kwargs), torch.eye(num_experts))


def check_contract(decision, num_experts, capacity=None):
    experts, weights = decision.experts, decision.weights
    assert experts.dtype == torch.long and weights.dtype == torch.float32
    assert experts.shape == weights.shape and experts.dim() == 2
    assert decision.aux_loss.shape == () and decision.aux_loss.dtype == torch.float32
    assert decision.entropy.shape == () and decision.entropy.dtype == torch.float32
    assert decision.dropped.shape == () and decision.dropped.dtype == torch.long
    assert decision.load.shape == (num_experts,) and decision.load.dtype == torch.float32
    assert ((experts >= -1) & (experts < num_experts)).all()
    kept = experts >= 0
    assert (weights[~kept] == 0).all() and (weights[kept] > 0).all()
    assert int(decision.dropped) == int((~kept.any(dim=1)).sum())
    counts = torch.bincount(experts[kept], minlength=num_experts)
    assert torch.equal(expert_counts(decision, num_experts), counts)
    assert torch.allclose(decision.load, counts.float() / counts.sum())
    assert decision.load.sum().item() == pytest.approx(1.0)
    if capacity is not None:
        assert counts.max() <= capacity
    for row in experts.tolist():  # a row never picks the same expert twice
        chosen = [e for e in row if e >= 0]
        assert len(chosen) == len(set(chosen))


@pytest.mark.parametrize("num_rows", [12, 7, 1])
def test_learned_gates_keep_the_contract(num_rows):
    torch.manual_seed(0)
    x = torch.randn(num_rows, 8)
    for gate, choices, capacity in [  # capacity in training; evaluation has none by default
        (SwitchGate(8, 4), 1, math.ceil(num_rows / 4)),
        (SwitchGate(8, 4, capacity_factor=0.5), 1, math.ceil(0.5 * num_rows / 4)),
        (Top2Gate(8, 4), 2, 2 * math.ceil(num_rows / 4)),
        (Top2Gate(8, 3, capacity_factor=0.5), 2, 2 * math.ceil(0.5 * num_rows / 3)),
    ]:
        for training in (True, False):
            decision = gate.train(training)(x)
            assert decision.experts.shape == (num_rows, choices)
            check_contract(decision, gate.num_experts, capacity if training else None)


def test_hash_gate_keeps_the_contract():
    gate = HashGate(num_experts=4, vocab_size=50)
    tokens = torch.randint(50, (3, 5))
    decision = gate(tokens)
    check_contract(decision, 4)
    assert torch.equal(decision.experts.squeeze(1), gate.table[tokens.reshape(-1)])
    assert (decision.weights == 1).all() and int(decision.dropped) == 0
    assert float(decision.entropy) == 0 and float(decision.aux_loss) == 0
    assert decision.aux_loss.grad_fn is None and not decision.aux_loss.requires_grad


def test_switch_drops_exactly_the_rows_beyond_capacity():
    # 6 rows over 3 experts: capacity ceil(6 / 3) = 2; expert 0 is wanted by rows 0, 1, 3, 4
    wanted = torch.tensor([0, 0, 1, 0, 0, 2])
    gate = identity_gate(SwitchGate, 3, random_drop_order=False)  # rows queue in row order
    decision = gate(5.0 * torch.nn.functional.one_hot(wanted, 3).float())
    assert decision.experts.squeeze(1).tolist() == [0, 0, 1, -1, -1, 2]
    assert int(decision.dropped) == 2
    top = torch.softmax(torch.tensor([5.0, 0.0, 0.0]), 0)[0]
    assert torch.allclose(decision.weights.squeeze(1), top * torch.tensor([1.0, 1, 1, 0, 0, 1]))
    assert torch.allclose(decision.load, torch.tensor([0.5, 0.25, 0.25]))


def test_switch_aux_loss_is_the_formula_and_trains_the_gate():
    torch.manual_seed(1)
    gate = SwitchGate(6, 3)
    x = torch.randn(10, 6)
    decision = gate(x)
    probs = torch.softmax(x @ gate.wg.weight.detach().T, dim=1).tolist()
    first = [max(range(3), key=row.__getitem__) for row in probs]
    by_hand = 3 * sum(
        first.count(e) / 10 * sum(row[e] for row in probs) / 10 for e in range(3)
    )
    assert decision.aux_loss.item() == pytest.approx(by_hand, rel=1e-5)
    decision.aux_loss.backward()
    assert gate.wg.weight.grad.abs().sum() > 0


def test_load_balancing_loss_is_one_when_balanced_and_grows_with_skew():
    uniform = torch.full((8, 4), 0.25)
    assert load_balancing_loss(uniform, torch.zeros(8, dtype=torch.long)).item() == pytest.approx(1)
    assert load_balancing_loss(uniform, torch.arange(8) % 4).item() == pytest.approx(1)
    skewed = torch.tensor([[0.97, 0.01, 0.01, 0.01]]).expand(8, 4)
    assert load_balancing_loss(skewed, torch.zeros(8, dtype=torch.long)).item() == pytest.approx(
        4 * 0.97
    )


@pytest.mark.parametrize("gate_cls", [SwitchGate, Top2Gate])
def test_entropy_of_a_uniform_gate_is_log_e(gate_cls):
    x = torch.randn(8, 5)
    gate = set_gate(gate_cls(5, 4), torch.zeros(4, 5))
    assert gate(x).entropy.item() == pytest.approx(math.log(4))
    peaked = set_gate(gate_cls(5, 4), 10 * torch.eye(4, 5))
    assert peaked(torch.eye(5)[:4].repeat(2, 1)).entropy.item() < 0.1


def test_top2_matches_fairscale_when_rows_divide_evenly():
    gate = Top2Gate(8, 4, random_drop_order=False)  # fairscale queues rows in row order
    x = torch.randn(12, 8)
    torch.manual_seed(3)
    decision = gate(x)
    torch.manual_seed(3)  # the same Gumbel draw
    l_aux, combine, _ = top2gating(gate.logits(x))
    weights = torch.zeros(12, 4).scatter_add(
        1, decision.experts.clamp(min=0), decision.weights
    )  # S x E
    assert torch.allclose(weights, combine.sum(dim=2))
    assert decision.aux_loss.item() == pytest.approx(16 * l_aux.item(), rel=1e-5)


def gshard_top2(probs, capacity):
    """Reference GShard top-2 (second choice = runner-up): first choices fill each expert's
    slots in row order, then second choices queue behind all first choices of that expert."""
    ranked = probs.argsort(dim=1, descending=True).tolist()  # S lists of experts, best first
    queue = [0] * probs.size(1)
    experts = [[-1, -1] for _ in ranked]
    for k in (0, 1):
        for s, row in enumerate(ranked):
            if queue[row[k]] < capacity:
                experts[s][k] = row[k]
            queue[row[k]] += 1
    gates = [[probs[s, e].item() if e >= 0 else 0.0 for e in row] for s, row in enumerate(experts)]
    return experts, [[g / max(sum(row), 1e-7) for g in row] for row in gates]


@pytest.mark.parametrize("num_rows,num_experts,factor",
                         [(7, 4, 1.0), (9, 2, 1.0), (10, 3, 0.5), (11, 3, None), (16, 2, None)])
def test_top2_with_any_row_count_routes_like_gshard(num_rows, num_experts, factor):
    torch.manual_seed(num_rows)
    gate = Top2Gate(6, num_experts, eval_capacity_factor=factor).eval()
    for _ in range(5):
        x = 3 * torch.randn(num_rows, 6)
        decision = gate(x)
        # no factor: room for all S rows, which no expert can exceed (a row picks it once)
        capacity = num_rows if factor is None else 2 * math.ceil(factor * num_rows / num_experts)
        experts, weights = gshard_top2(torch.softmax(gate.logits(x), dim=1), capacity)
        assert decision.experts.tolist() == experts
        assert torch.allclose(decision.weights, torch.tensor(weights), atol=1e-6)


def test_top2_padding_never_displaces_a_real_row():
    # 6 rows, 4 experts, capacity 2 * ceil(6/4) = 4. First choices avoid expert 0; rows 0-2 want
    # it second. Padding 2 rows onto 8 (fairscale's capacity is then 4 too) puts their first
    # choices on expert 0 ahead of all second choices, which would push row 2's out.
    first, second = [1, 2, 3, 1, 2, 3], [0, 0, 0, 2, 3, 1]
    logits = peaked_rows(first, second, 4)
    decision = identity_gate(Top2Gate, 4).train()(logits)
    assert decision.experts.tolist() == [list(pair) for pair in zip(first, second)]
    assert int(decision.dropped) == 0
    # the naive padding really loses row 2's second choice: the case above can fail
    _, _, naive = top2gating(torch.cat([logits, torch.zeros(2, 4)]))
    assert not naive[2, 0].any() and naive[:2, 0].any(dim=1).all()


def test_top2_eval_takes_the_runner_up_and_training_samples_it():
    torch.manual_seed(4)
    gate = Top2Gate(6, 4, capacity_factor=4.0)  # room for every choice
    x = torch.randn(64, 6)
    before = dict(gumbel_map)
    gate.eval()
    runner_up = torch.softmax(gate.logits(x), dim=1).topk(2, dim=1).indices[:, 1]
    assert torch.equal(gate(x).experts[:, 1], runner_up)
    assert torch.equal(gate(x).experts, gate(x).experts)
    assert gumbel_map == before  # fairscale's noise sampler is restored after eval
    gate.train()
    assert not torch.equal(gate(x).experts[:, 1], runner_up)


def one_sided_rows(num_rows, num_experts):
    """Rows that all put expert 0 first by far, the runner-up cycling through the others."""
    runner_up = 1 + torch.arange(num_rows) % (num_experts - 1)
    return peaked_rows(torch.zeros(num_rows, dtype=torch.long), runner_up, num_experts)


def slots(gate_cls, share):
    """Choices an expert takes: its share of rows, twice that for top-2 (fairscale's 2S/E)."""
    return (2 if gate_cls is Top2Gate else 1) * share


@pytest.mark.parametrize("gate_cls", [SwitchGate, Top2Gate])
def test_evaluation_drops_nothing_by_default_and_training_still_does(gate_cls):
    x = one_sided_rows(12, 4)
    gate = identity_gate(gate_cls, 4, capacity_factor=1.0)
    capacity = slots(gate_cls, 3)  # share ceil(1.0 * 12 / 4)
    trained = gate.train()(x)
    check_contract(trained, 4, capacity)
    kept = trained.experts[:, 0] == 0  # expert 0 takes `capacity` of the 12 rows, which ones is random
    assert int(kept.sum()) == capacity and (trained.experts[~kept, 0] == -1).all()
    evaluated = gate.eval()(x)
    check_contract(evaluated, 4)
    assert (evaluated.experts >= 0).all() and int(evaluated.dropped) == 0
    assert (evaluated.experts[:, 0] == 0).all()
    if gate_cls is Top2Gate:
        assert torch.equal(evaluated.experts[:, 1], 1 + torch.arange(12) % 3)


@pytest.mark.parametrize("gate_cls", [SwitchGate, Top2Gate])
def test_training_drops_overflow_rows_at_random_not_the_last_rows(gate_cls):
    """Rows are time-major, so dropping the last rows of the queue would drop late positions."""
    torch.manual_seed(0)
    x = one_sided_rows(12, 4)  # every row wants expert 0 first; it takes `capacity` of them
    gate = identity_gate(gate_cls, 4, capacity_factor=1.0).train()
    capacity, draws = slots(gate_cls, 3), 600
    kept = torch.stack([gate(x).experts[:, 0] == 0 for _ in range(draws)]).float()  # draws x 12
    assert (kept.sum(dim=1) == capacity).all()  # the capacity holds at every call
    # each row keeps expert 0 with probability capacity / 12; chi-square over the 12 rows, 11 dof,
    # 0.1% critical value 31.3 (row order would keep rows 0..capacity-1 always: chi-square ~ 7,000)
    observed, expected = kept.sum(dim=0), draws * capacity / 12
    chi_square = float(((observed - expected) ** 2 / expected).sum())
    assert chi_square < 31.3, (chi_square, observed.tolist())
    # the row-order queue that fairscale uses is still there for those who want it
    ordered = identity_gate(gate_cls, 4, capacity_factor=1.0, random_drop_order=False).train()
    assert torch.equal(ordered(x).experts[:, 0], torch.where(torch.arange(12) < capacity, 0, -1))


@pytest.mark.parametrize("gate_cls", [SwitchGate, Top2Gate])
@pytest.mark.parametrize("eval_factor", [0.5, 1.0, 1.5])
def test_an_explicit_evaluation_capacity_drops_the_overflow_in_row_order(gate_cls, eval_factor):
    x = one_sided_rows(12, 4)
    gate = identity_gate(gate_cls, 4, capacity_factor=4.0, eval_capacity_factor=eval_factor)
    capacity = slots(gate_cls, math.ceil(eval_factor * 12 / 4))
    decision = gate.eval()(x)
    check_contract(decision, 4, capacity)
    # every first choice is expert 0: it takes the first `capacity` rows, the rest lose it
    assert torch.equal(decision.experts[:, 0], torch.where(torch.arange(12) < capacity, 0, -1))
    if gate_cls is Top2Gate:  # 4 second choices for each other expert: within capacity
        assert (decision.experts[:, 1] >= 0).all()
    else:
        assert int(decision.dropped) == 12 - capacity
    assert (gate.train()(x).experts >= 0).all()  # training keeps its own factor, 4: room for all


def test_top2_without_a_cap_weights_both_choices_as_fairscale_does():
    torch.manual_seed(7)
    x = torch.randn(40, 6)
    uncapped = Top2Gate(6, 4).eval()
    roomy = Top2Gate(6, 4, eval_capacity_factor=4.0).eval()  # fairscale's path, nothing dropped
    roomy.load_state_dict(uncapped.state_dict())
    a, b = uncapped(x), roomy(x)
    assert torch.equal(a.experts, b.experts) and (a.experts >= 0).all()
    torch.testing.assert_close(a.weights, b.weights)
    torch.testing.assert_close(a.aux_loss, b.aux_loss)
    a.weights[:, 1].sum().backward()
    assert uncapped.wg.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("gate_cls", [SwitchGate, Top2Gate])
def test_gradients_reach_the_gate_through_the_dispatch_tensors(gate_cls):
    gate = gate_cls(6, 3)
    decision = gate(torch.randn(7, 6))
    decision.aux_loss.backward(retain_graph=True)
    assert gate.wg.weight.grad.abs().sum() > 0
    gate.zero_grad()
    combine, _ = decision_to_dispatch(decision, 3, 7)
    (combine * torch.randn(combine.shape)).sum().backward()  # as the task loss would
    assert gate.wg.weight.grad.abs().sum() > 0


def test_hash_table_is_fixed_by_the_seed_and_leaves_the_global_rng_alone():
    torch.manual_seed(5)
    state = torch.get_rng_state()
    a, b, c = HashGate(4, 1000, seed=7), HashGate(4, 1000, seed=7), HashGate(4, 1000, seed=8)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.table, b.table) and not torch.equal(a.table, c.table)
    assert torch.bincount(a.table, minlength=4).min() > 200  # every expert gets tokens
    tokens = torch.randint(1000, (20,))
    assert torch.equal(a(tokens).experts, a(tokens).experts)
    restored = HashGate(4, 1000, seed=0)
    restored.load_state_dict(a.state_dict())  # the table travels with the checkpoint
    assert torch.equal(restored.table, a.table)


def routed_decisions():
    """One decision per router on 10 rows and 4 experts; the learned gates see a skew towards
    expert 0 that overflows its capacity, so some rows lose choices."""
    torch.manual_seed(6)
    skewed = torch.randn(10, 4) + torch.tensor([3.0, 0, 0, 0])
    return {
        "switch": identity_gate(SwitchGate, 4)(skewed),
        "top2": identity_gate(Top2Gate, 4, capacity_factor=0.5).train()(skewed),
        "hash": HashGate(4, 30)(torch.randint(30, (10,))),
    }


@pytest.mark.parametrize("name", ["switch", "top2", "hash"])
def test_dispatch_round_trip_through_moe_layer_einsums(name):
    decision = routed_decisions()[name]
    dropped_rows = (decision.experts < 0).all(dim=1)
    assert dropped_rows.any() == (name != "hash")  # the skew overflows expert 0
    x = torch.randn(10, 5)
    capacity = int(expert_counts(decision, 4).max())
    combine, dispatch = decision_to_dispatch(decision, 4, capacity)
    assert combine.shape == dispatch.shape == (10, 4, capacity) and dispatch.dtype == torch.bool
    dispatched = torch.einsum("sec,sm->ecm", dispatch.float(), x)  # as fairscale's MOELayer
    identity = torch.einsum("sec,ecm->sm", combine, dispatched)
    assert torch.allclose(identity, decision.weights.sum(dim=1, keepdim=True) * x, atol=1e-6)
    assert (identity[dropped_rows] == 0).all()
    per_expert = dispatched * torch.arange(1.0, 5.0).view(4, 1, 1)  # expert e multiplies by e + 1
    scaled = torch.einsum("sec,ecm->sm", combine, per_expert)
    factor = (decision.weights * (decision.experts + 1)).sum(dim=1, keepdim=True)
    assert torch.allclose(scaled, factor * x, atol=1e-5)
    with pytest.raises(ValueError, match="capacity"):
        decision_to_dispatch(decision, 4, capacity - 1)


def test_dispatch_fills_slots_in_row_order():
    decision = routed_decisions()["top2"]
    _, dispatch = decision_to_dispatch(decision, 4, 10)
    for e in range(4):
        rows = (decision.experts == e).any(dim=1).nonzero().squeeze(1)
        slots = dispatch[:, e].nonzero()  # (row, slot) pairs, sorted by row
        assert torch.equal(slots[:, 0], rows) and torch.equal(slots[:, 1], torch.arange(len(rows)))
