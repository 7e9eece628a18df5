"""Expert parallelism (fairscale MOELayer over gloo, 2 CPU processes) against one process."""
import pytest
import torch
import torch.distributed as dist

import fairseq_thor.models.expert_layers as expert_layers
from conftest import build_model, make_dictionary, random_batch
from distributed_utils import run_in_processes
from fairseq import utils as fairseq_utils

from fairseq_thor.criterions.router_stats import collect_decisions
from fairseq_thor.distributed.trainer import reduce_expert_gradients, with_all_experts
from fairseq_thor.modules.expert_parallel_ffn import ExpertParallelFFN, expert_parameter_names
from fairseq_thor.modules.routing import route_from_assignment

NUM_EXPERTS = 4


def scripted_experts(seq_len, batch_size, num_experts):
    """A fixed token-level assignment that uses every expert, shaped T x B."""
    t = torch.arange(seq_len).unsqueeze(1)
    b = torch.arange(batch_size).unsqueeze(0)
    return (t + 3 * b) % num_experts


def use_scripted_routing():
    """Both models route every layer call with ``scripted_experts`` instead of a random draw."""
    expert_layers.draw_balanced_experts = lambda mode, num_experts, seq_len, batch_size: (
        scripted_experts(seq_len, batch_size, num_experts))
    expert_layers.make_route = lambda mode, num_experts, seq_len, batch_size, device, **kw: (
        route_from_assignment(scripted_experts(seq_len, batch_size, num_experts), num_experts, device))


def loss_of(model, batch, seed):
    """Output and a loss with every output weighted differently, plus the routers' aux losses."""
    torch.manual_seed(100 + seed)  # GShard's gate draws noise: the same draws in both models
    out = model(*batch)[0]
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    aux = sum(d.aux_loss for d in collect_decisions(model))
    return out, (out * weights).sum() + aux


def batches(dictionary, count=2):
    # different sentence counts and lengths per rank: the ranks exchange equal-sized blocks
    # anyway; every second batch has left padding, which the baseline routers must skip
    out = []
    for r in range(count):
        batch = random_batch(dictionary, batch_size=3 - r % 2, src_len=5 + 2 * (r % 2),
                             tgt_len=4 + 2 * (r % 2), seed=r)
        if r % 2:
            batch[0][0, :3] = dictionary.pad()
        out.append(batch)
    return out


def groups_of(model):
    return next(m for m in model.modules() if isinstance(m, ExpertParallelFFN)).groups


def compare_with_one_process(rank, world_size, router, num_experts=NUM_EXPERTS):
    extra = ["--num-experts", str(num_experts), "--expert-router", router]
    dictionary = make_dictionary()
    torch.manual_seed(0)
    local = build_model(extra=extra, dictionary=dictionary)
    torch.manual_seed(0)
    sharded = build_model(extra=extra + ["--expert-parallel"], dictionary=dictionary)
    local_params = dict(local.named_parameters())
    sharded_params = dict(sharded.named_parameters())
    groups = groups_of(sharded)
    per_rank = num_experts // groups.num_shards
    assert groups.num_shards == min(world_size, num_experts)
    first = (rank % groups.num_shards) * per_rank  # replicas (W > E) hold the same experts

    # same seed -> the same model: shared weights equal, and this rank holds its slice of experts
    names = expert_parameter_names(sharded)
    assert len(names) == 2 * 4  # expert layers: encoder 0 and decoder 0; fc1/fc2 weight/bias
    for canonical, slices in names:
        for j, name in enumerate(slices):
            torch.testing.assert_close(sharded_params[name], local_params[canonical][first + j])
    expert_names = {name for _, slices in names for name in slices}
    for name, p in sharded_params.items():
        assert hasattr(p, "expert") == (name in expert_names), name
        if name not in expert_names:
            torch.testing.assert_close(p, local_params[name])

    # forward: each rank's batch gives the one-process output for that batch
    data = batches(dictionary, world_size)
    out, loss = loss_of(sharded, data[rank], seed=rank)
    expected, _ = loss_of(local, data[rank], seed=rank)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)

    # backward, then the gradients as fairseq's train step leaves them up to the factor
    # W / sample_size: shared ones summed over ranks / W (legacy_ddp, gates included), experts'
    # through the trainer's reduce_expert_gradients. Times W, both must be the one-process
    # gradient of the summed loss.
    loss.backward()
    total = sum(loss_of(local, data[r], seed=r)[1] for r in range(world_size))
    total.backward()
    reduce_expert_gradients(sharded.parameters(), groups)
    for name, p in sharded_params.items():
        if name not in expert_names:
            dist.all_reduce(p.grad.div_(world_size))
        p.grad.mul_(world_size)
        if name not in expert_names:
            torch.testing.assert_close(p.grad, local_params[name].grad, rtol=1e-4, atol=1e-5)
    for canonical, slices in names:
        for j, name in enumerate(slices):
            torch.testing.assert_close(sharded_params[name].grad,
                                       local_params[canonical].grad[first + j],
                                       rtol=1e-4, atol=1e-5)
    return sharded, local


def equivalence_body(rank, world_size, num_experts):
    use_scripted_routing()  # THOR's random draws replaced by one fixed assignment in both
    for router in ("stochastic", "switch", "gshard", "hash"):
        sharded, local = compare_with_one_process(rank, world_size, router, num_experts)

    # gradient clipping: the trainer's norm over shared parameters + every expert once is the
    # one-process norm, and clipping leaves every rank with the one-process gradients
    max_norm = 0.01
    groups = groups_of(sharded)
    norm = fairseq_utils.clip_grad_norm_(
        list(sharded.parameters()), max_norm,
        aggregate_norm_fn=with_all_experts(sharded.parameters(), groups.expert_group))
    expected = torch.nn.utils.clip_grad_norm_(list(local.parameters()), max_norm)
    torch.testing.assert_close(norm, expected, rtol=1e-5, atol=0)
    local_params = dict(local.named_parameters())
    first = groups.shard * (num_experts // groups.num_shards)
    for canonical, slices in expert_parameter_names(sharded):
        for j, name in enumerate(slices):
            torch.testing.assert_close(dict(sharded.named_parameters())[name].grad,
                                       local_params[canonical].grad[first + j],
                                       rtol=1e-4, atol=1e-7)


def test_two_processes_match_one_process_for_every_router():
    run_in_processes(equivalence_body, 2, NUM_EXPERTS)


def test_four_processes_with_two_experts_match_one_process_for_every_router():
    """W = 2E: two expert groups of two ranks, each expert on two replicas."""
    run_in_processes(equivalence_body, 4, 2)


def eval_capacity_body(rank, world_size):
    """Evaluation capacity: the gates decide the drops, the agreed all-to-all capacity follows."""
    dictionary = make_dictionary()
    batch = batches(dictionary)[rank]
    for router in ("switch", "gshard"):
        extra = ["--num-experts", str(NUM_EXPERTS), "--expert-router", router,
                 "--capacity-factor", "0.25"]
        torch.manual_seed(0)
        local = build_model(extra=extra, dictionary=dictionary).eval()
        torch.manual_seed(0)
        sharded = build_model(extra=extra + ["--expert-parallel"], dictionary=dictionary).eval()
        for factor, drops in ((None, False), (0.25, True)):
            local.set_eval_capacity_factor(factor)
            sharded.set_eval_capacity_factor(factor)
            with torch.no_grad():
                out = sharded(*batch)[0]
                dropped = [bool((d.experts < 0).any()) for d in collect_decisions(sharded)]
                torch.testing.assert_close(out, local(*batch)[0], rtol=1e-5, atol=1e-5)
            assert dropped and all(d == drops for d in dropped), (router, factor, dropped)


def test_evaluation_capacity_under_expert_parallelism():
    run_in_processes(eval_capacity_body, 2)


def balanced_body(rank, world_size):
    """Real (balanced random) routing: sentence and token modes run, every expert gets work."""
    dictionary = make_dictionary()
    for mode in ("sentence", "token", "batch"):
        torch.manual_seed(0)
        model = build_model(extra=["--num-experts", str(NUM_EXPERTS), "--expert-parallel",
                                   "--expert-routing", mode], dictionary=dictionary)
        model.train()
        batch = batches(dictionary)[rank]
        out, loss = loss_of(model, batch, seed=rank)
        assert torch.isfinite(out).all()
        loss.backward()
        grads = [p.grad for n, p in model.named_parameters() if hasattr(p, "expert")]
        assert all(g is not None for g in grads)
    model.eval()
    model.set_inference_routing("fixed", expert=NUM_EXPERTS - 1)
    with torch.no_grad():
        out, _ = loss_of(model, batches(dictionary)[rank], seed=0)
    assert torch.isfinite(out).all()


def test_balanced_routing_runs_in_every_mode():
    run_in_processes(balanced_body, 2)


def divisibility_body(rank, world_size):
    with pytest.raises(ValueError, match=r"--num-experts \(3\) to be a multiple or a divisor of the "
                                         r"world size \(2\).*valid here: --num-experts 2, 4, 6"):
        build_model(extra=["--num-experts", "3", "--expert-parallel"])
    model = build_model(extra=["--num-experts", "2", "--expert-parallel"])
    for mode in ("mean", "merged"):
        with pytest.raises(ValueError, match="consolidate"):
            model.set_inference_routing(mode)


def test_clear_errors_in_processes():
    run_in_processes(divisibility_body, 2)


def test_expert_parallel_needs_a_distributed_run():
    with pytest.raises(ValueError, match="fairseq-thor-consolidate CHECKPOINT"):
        build_model(extra=["--num-experts", "2", "--expert-parallel"])
    assert not any(isinstance(m, ExpertParallelFFN) for m in build_model().modules())


@pytest.mark.parametrize("change, message", [
    ({"ddp_backend": "c10d"}, "--expert-parallel needs --ddp-backend legacy_ddp"),
    ({"fp16": True}, "needs --fp16-no-flatten-grads"),
    ({"bf16": True}, "needs --fp16-no-flatten-grads"),
    ({"eval_bleu": True}, "--eval-bleu decodes step by step"),
])
def test_training_settings_that_would_mix_up_expert_gradients_are_refused(change, message):
    from omegaconf import OmegaConf

    from fairseq_thor.distributed.trainer import check_expert_parallel_config

    def cfg(**c):
        common = {"fp16": False, "bf16": False, "memory_efficient_fp16": False,
                  "memory_efficient_bf16": False, "fp16_no_flatten_grads": False}
        dt, task = {"ddp_backend": "legacy_ddp"}, {"eval_bleu": False}
        for k, v in c.items():
            (dt if k in dt else task if k in task else common)[k] = v
        return OmegaConf.create({"common": common, "distributed_training": dt, "task": task})

    check_expert_parallel_config(cfg())  # the supported setting passes
    check_expert_parallel_config(cfg(fp16=True, fp16_no_flatten_grads=True))
    with pytest.raises(ValueError, match=message):
        check_expert_parallel_config(cfg(**change))


# ---- index dispatch against fairscale's einsum dispatch ------------------------------------------

def dispatch_body(rank, world_size):
    from fairscale.nn.moe import MOELayer

    from fairseq_thor.modules.experts import ExpertLinear
    from fairseq_thor.modules.gate_decision import make_decision

    torch.manual_seed(0)  # the same banks on both ranks; each keeps its experts
    fc1 = ExpertLinear(NUM_EXPERTS, 6, 10, dispatches=True)
    fc2 = ExpertLinear(NUM_EXPERTS, 10, 6, dispatches=False)
    ffn = ExpertParallelFFN(fc1, fc2, torch.relu, torch.nn.Identity())
    g = torch.Generator().manual_seed(10 + rank)  # each rank its own rows and choices
    rows = 10 + 4 * rank  # MOELayer wants a multiple of the local expert count
    x = torch.randn(rows, 1, 6, generator=g)
    # top-2 choices with drops (-1), rows whose both choices are dropped, repeated experts
    experts = torch.randint(NUM_EXPERTS, (rows, 2), generator=g)
    experts[::3, 1] = -1
    experts[1, :] = -1
    weights = torch.rand(rows, 2, generator=g) * (experts >= 0)
    decision = make_decision(experts, weights, NUM_EXPERTS, torch.zeros(()), torch.zeros(()))
    results = []
    for forward in (lambda inp: MOELayer.forward(ffn.moe, inp), ffn.moe):  # einsum, then index
        ffn.zero_grad()
        inp = x.clone().requires_grad_()
        ffn.moe.gate.decision = decision
        out = forward(inp)
        (out * torch.arange(out.numel()).view(out.shape).sin()).sum().backward()
        results.append((out.detach(), inp.grad, [p.grad.clone() for p in ffn.parameters()]))
    (out_e, grad_e, params_e), (out_i, grad_i, params_i) = results
    assert out_i[1].abs().sum() == 0  # a row with every choice dropped gets 0, as with the mask
    torch.testing.assert_close(out_i, out_e)
    torch.testing.assert_close(grad_i, grad_e)
    for a, b in zip(params_i, params_e):
        torch.testing.assert_close(a, b)


def test_index_dispatch_equals_fairscales_einsum_dispatch_with_drops_and_top2():
    run_in_processes(dispatch_body, 2)
