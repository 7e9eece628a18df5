"""``--inference-routing path``: one random expert per sentence for every layer, keyed by the
sentence's id, and evaluation/decoding batches grouped by it so each batch runs one expert."""
import numpy as np
import pytest
import torch
from fairseq.data import FairseqDataset

from conftest import build_model, random_batch
from fairseq_thor.errors import ThorError
from fairseq_thor.modules.experts import ExpertLinear
from fairseq_thor.modules.routing import PATH_SALT, keyed_sentence_experts
from fairseq_thor.tasks.expert_grouped_batches import BatchesByExpert, ExpertGroupedBatches
from test_routing import CHI2_999, chi_square

SEED = 11


def path_experts(ids, num_experts):
    return keyed_sentence_experts(torch.as_tensor(ids), PATH_SALT, SEED, num_experts)


@pytest.mark.parametrize("num_experts", [2, 4, 8])
def test_path_experts_are_uniform_like_sentence_routing(num_experts):
    counts = torch.bincount(path_experts(torch.arange(4000), num_experts), minlength=num_experts).float()
    assert chi_square(counts) < CHI2_999[num_experts], counts
    # and independent of every layer's own sentence draw (salts 0.. are the layers')
    layer = keyed_sentence_experts(torch.arange(4000), 0, SEED, num_experts)
    assert abs((layer == path_experts(torch.arange(4000), num_experts)).float().mean() - 1 / num_experts) < 0.05


def routed_kinds(model, ids, src, lengths, prev):
    kinds = []
    hook = lambda module, args: kinds.append((module.route.kind, module.route.expert))  # noqa: E731
    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, ExpertLinear)]
    model.set_sentence_keys(torch.as_tensor(ids))
    torch.manual_seed(SEED)
    with torch.no_grad():
        out = model(src, lengths, prev)[0]
    for h in handles:
        h.remove()
    return kinds, out


def test_a_batch_of_one_path_expert_runs_that_expert_in_every_layer(dictionary):
    model = build_model("thor_transformer", ["--num-experts", "4", "--inference-routing", "path",
                                             "--encoder-expert-layers", "all", "--decoder-expert-layers", "all"],
                        dictionary=dictionary).eval()
    ids = np.arange(200)
    experts = path_experts(ids, 4).numpy()
    group = ids[experts == 2][:3]
    src, lengths, prev = random_batch(dictionary, batch_size=3)
    kinds, _ = routed_kinds(model, group, src, lengths, prev)
    assert len(kinds) == 2 * 4 and set(kinds) == {("one", 2)}  # 2 banks x 4 expert layers, one expert
    mixed = [ids[experts == 0][0], ids[experts == 1][0], ids[experts == 3][0]]
    kinds, out = routed_kinds(model, mixed, src, lengths, prev)
    assert {kind for kind, _ in kinds} == {"grouped"}  # a mixed batch is still right, just not cheap
    # each sentence's output is the one it gets alone: its expert comes from its id only
    for row, sentence in enumerate(mixed):
        _, alone = routed_kinds(model, [sentence], src[row:row + 1], lengths[row:row + 1], prev[row:row + 1])
        torch.testing.assert_close(out[row:row + 1], alone)


def test_path_routing_without_sentence_ids_says_how_to_get_them(dictionary):
    model = build_model("thor_transformer", ["--num-experts", "4", "--inference-routing", "path"],
                        dictionary=dictionary).eval()
    with pytest.raises(ThorError, match="--inference-routing path needs the sentence ids"):
        model(*random_batch(dictionary))


def test_expert_parallel_models_refuse_path_routing():
    from types import SimpleNamespace

    from fairseq_thor.models.expert_options import validate_inference

    spec = SimpleNamespace(num_experts=4, inference_routing="path", inference_expert=0, expert_parallel=True)
    with pytest.raises(ThorError, match="path needs every expert in one process"):
        validate_inference(spec)


class Sized(FairseqDataset):
    """Just enough of a dataset for fairseq's batch_by_size: sentence i has sizes[i] tokens."""

    def __init__(self, sizes):
        self.sizes = np.asarray(sizes)

    def __len__(self):
        return len(self.sizes)

    def num_tokens(self, index):
        return int(self.sizes[index])

    def num_tokens_vec(self, indices):
        return self.sizes[indices]

    def size(self, index):
        return int(self.sizes[index])


def test_grouped_batches_hold_one_expert_and_every_sentence_once():
    rng = np.random.default_rng(0)
    dataset = Sized(rng.integers(3, 30, size=500))
    indices = np.argsort(dataset.sizes, kind="mergesort")  # fairseq's order: by length
    batches = BatchesByExpert(dataset, 4, SEED).batch_by_size(indices, max_tokens=200)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(500))  # every sentence, once
    for batch in batches:
        assert len(set(path_experts(batch, 4).tolist())) == 1
        assert len(batch) * dataset.sizes[batch].max() <= 200  # fairseq's own size limit still holds
    ungrouped = dataset.batch_by_size(indices, max_tokens=200)
    assert len(batches) < len(ungrouped) + 4 * 2  # grouping costs at most a partial batch per expert or so


def test_the_task_groups_only_for_path_models(dictionary):
    task = ExpertGroupedBatches()
    dataset = Sized([5] * 10)
    task.remember_path_models(build_model("thor_transformer", ["--num-experts", "4"], dictionary=dictionary))
    assert task.grouped_by_path_expert(dataset) is dataset  # sentence routing: fairseq's batches
    task.remember_path_models(build_model("thor_transformer", ["--num-experts", "4", "--inference-routing",
                                                               "path"], dictionary=dictionary))
    grouped = task.grouped_by_path_expert(dataset)
    assert isinstance(grouped, BatchesByExpert) and grouped.num_experts == 4
    assert task.grouped_by_path_expert(dataset) is grouped  # one wrapper: fairseq caches iterators by it
    task.dataset_to_epoch_iter = {grouped: "the iterator fairseq cached for it"}
    torch.manual_seed(SEED + 1)  # fairseq reseeds at every update: the next validation's seed
    regrouped = task.grouped_by_path_expert(dataset)
    assert regrouped is not grouped and regrouped.seed == SEED + 1
    assert task.dataset_to_epoch_iter == {}  # the stale iterator is not kept alive
