"""Random routing is uniform, replayable from the seed, and a route covers every row once."""
import pytest
import torch

from fairseq_thor.modules.routing import (
    draw_sentence_experts,
    draw_token_experts,
    keyed_sentence_experts,
    make_route,
    route_from_assignment,
)

# 0.999 quantiles of the chi-square distribution with E - 1 degrees of freedom
CHI2_999 = {2: 10.83, 4: 16.27, 8: 24.32}


def chi_square(counts: torch.Tensor) -> float:
    expected = counts.sum() / counts.numel()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("num_experts", [2, 4, 8])
@pytest.mark.parametrize("mode", ["batch", "sentence", "token"])
def test_routing_frequencies_are_uniform(mode, num_experts):
    torch.manual_seed(1234)
    if mode == "token":
        draws = torch.cat([draw_token_experts(num_experts, 10, 8).flatten() for _ in range(200)])
    elif mode == "sentence":
        draws = torch.cat([draw_sentence_experts(mode, num_experts, 16) for _ in range(500)])
    else:  # one draw per batch: count batches, not sentences
        draws = torch.cat([draw_sentence_experts(mode, num_experts, 16)[:1] for _ in range(4000)])
    counts = torch.bincount(draws, minlength=num_experts).float()
    assert counts.numel() == num_experts and (counts > 0).all()
    assert chi_square(counts) < CHI2_999[num_experts], counts


def test_chi_square_check_can_fail():
    skewed = torch.tensor([1200.0, 800.0, 1000.0, 1000.0])
    assert chi_square(skewed) > CHI2_999[4]


def test_batch_routing_uses_one_expert_for_every_sentence():
    torch.manual_seed(0)
    for _ in range(20):
        assert len(set(draw_sentence_experts("batch", 4, 32).tolist())) == 1


def test_draws_replay_from_the_seed():
    torch.manual_seed(5)
    a = draw_token_experts(4, 7, 3)
    torch.manual_seed(5)
    assert torch.equal(a, draw_token_experts(4, 7, 3))


def test_grouped_route_is_a_permutation_grouped_by_expert():
    assignment = torch.tensor([[2, 0, 2], [1, 0, 2]])
    route = route_from_assignment(assignment, 4, torch.device("cpu"))
    assert route.kind == "grouped" and route.counts == [2, 1, 3, 0]
    flat = assignment.flatten()
    assert sorted(route.order.tolist()) == list(range(6))
    assert flat[route.order].tolist() == [0, 0, 1, 2, 2, 2]
    assert torch.equal(route.order[route.restore], torch.arange(6))


def test_single_expert_route_needs_no_permutation():
    route = route_from_assignment(torch.full((4, 3), 2), 4, torch.device("cpu"))
    assert route.kind == "one" and route.expert == 2


def test_sentence_route_replays_stored_experts():
    stored = torch.tensor([1, 0, 1])
    route = make_route("sentence", 2, 4, 3, torch.device("cpu"), sentence_experts=stored)
    rows_expert = stored.expand(4, 3).flatten()[route.order]
    assert rows_expert.tolist() == sorted(rows_expert.tolist())
    assert route.counts == [4, 8]


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="unknown routing mode 'random'"):
        make_route("random", 2, 3, 3, torch.device("cpu"))


# ---- inference draws keyed by sentence id --------------------------------------------------------

@pytest.mark.parametrize("num_experts", [2, 4, 8])
def test_keyed_draws_are_uniform_and_independent_across_layers(num_experts):
    ids = torch.arange(4000)
    first = keyed_sentence_experts(ids, salt=0, seed=1, num_experts=num_experts)
    assert chi_square(torch.bincount(first, minlength=num_experts).float()) < CHI2_999[num_experts]
    # another layer (salt): the pair (expert in layer 0, expert in layer 1) is uniform over E x E
    second = keyed_sentence_experts(ids, salt=1, seed=1, num_experts=num_experts)
    pairs = torch.bincount(first * num_experts + second, minlength=num_experts ** 2).float()
    chi2_999_pairs = {2: 16.27, 4: 37.70, 8: 99.61}  # E*E - 1 degrees of freedom
    assert chi_square(pairs) < chi2_999_pairs[num_experts], pairs
    # another seed redraws: about 1/E of the sentences keep their expert
    other_seed = keyed_sentence_experts(ids, salt=0, seed=2, num_experts=num_experts)
    same = (first == other_seed).float().mean().item()
    assert abs(same - 1 / num_experts) < 0.05


def test_a_keyed_draw_ignores_batch_order_and_company():
    ids = torch.tensor([17, 3, 250, 9, 42])
    together = keyed_sentence_experts(ids, salt=5, seed=7, num_experts=4)
    alone = torch.cat([keyed_sentence_experts(ids[i:i + 1], salt=5, seed=7, num_experts=4) for i in range(5)])
    shuffled = keyed_sentence_experts(ids.flip(0), salt=5, seed=7, num_experts=4).flip(0)
    assert torch.equal(together, alone) and torch.equal(together, shuffled)
    torch.manual_seed(0)
    before = torch.rand(3)
    torch.manual_seed(0)
    keyed_sentence_experts(ids, salt=5, seed=7, num_experts=4)
    assert torch.equal(torch.rand(3), before)  # torch's generator is not used


def test_route_kinds_are_an_enum_and_unknown_kinds_are_refused():
    from fairseq_thor.modules.routing import Route, RouteKind

    assert Route(kind="mean").kind is RouteKind.MEAN
    with pytest.raises(ValueError, match="'average' is not a valid RouteKind"):
        Route(kind="average")
