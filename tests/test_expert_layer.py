"""A THOR layer routed to expert k is a vanilla fairseq layer holding expert k's FFN."""
import copy

import pytest
import torch
from fairseq.models.transformer import TransformerConfig
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase, TransformerEncoderLayerBase

from fairseq_thor.models.expert_layers import ThorTransformerDecoderLayer, ThorTransformerEncoderLayer
from fairseq_thor.models.expert_options import ExpertSpec
from fairseq_thor.modules.routing import draw_sentence_experts, draw_token_experts

E, C, F, T, B = 3, 16, 32, 5, 4


def tiny_cfg():
    cfg = TransformerConfig()
    for side in (cfg.encoder, cfg.decoder):
        side.embed_dim, side.ffn_embed_dim, side.attention_heads = C, F, 2
    cfg.dropout = cfg.attention_dropout = cfg.activation_dropout = 0.0
    return cfg


def spec(**kw):
    base = dict(num_experts=E, layers=frozenset({0}), ffn_dim=None, train_routing="sentence",
                inference_routing="sentence", inference_expert=0)
    base.update(kw)
    return ExpertSpec(**base)


def vanilla_with_expert(thor_layer, vanilla_cls, k, *args):
    """A fairseq layer with the THOR layer's shared weights and expert k's FFN."""
    torch.manual_seed(123)
    layer = vanilla_cls(tiny_cfg(), *args)
    state = {n: p for n, p in thor_layer.state_dict().items() if not n.startswith(("fc1", "fc2"))}
    for fc in ("fc1", "fc2"):
        state[f"{fc}.weight"] = thor_layer.state_dict()[f"{fc}.weight"][k]
        state[f"{fc}.bias"] = thor_layer.state_dict()[f"{fc}.bias"][k]
    layer.load_state_dict(state)
    return layer.eval()


@pytest.mark.parametrize("k", range(E))
def test_encoder_layer_fixed_expert_equals_vanilla_layer(k):
    torch.manual_seed(0)
    layer = ThorTransformerEncoderLayer(tiny_cfg(), spec(inference_routing="fixed", inference_expert=k)).eval()
    x = torch.randn(T, B, C)
    expected = vanilla_with_expert(layer, TransformerEncoderLayerBase, k)(x, None)
    torch.testing.assert_close(layer(x, None), expected)
    # the other experts really are different, so the comparison can fail
    other = vanilla_with_expert(layer, TransformerEncoderLayerBase, (k + 1) % E)(x, None)
    assert not torch.allclose(other, expected)


@pytest.mark.parametrize("k", range(E))
def test_decoder_layer_fixed_expert_equals_vanilla_layer(k):
    torch.manual_seed(0)
    layer = ThorTransformerDecoderLayer(tiny_cfg(), spec(inference_routing="fixed", inference_expert=k)).eval()
    x, enc = torch.randn(T, B, C), torch.randn(T + 2, B, C)
    out, _, _ = layer(x, enc, None)
    ref, _, _ = vanilla_with_expert(layer, TransformerDecoderLayerBase, k)(x, enc, None)
    torch.testing.assert_close(out, ref)


def test_sentence_routing_gives_each_sentence_its_experts_layer():
    torch.manual_seed(0)
    layer = ThorTransformerEncoderLayer(tiny_cfg(), spec(inference_routing="sentence")).eval()
    x = torch.randn(T, 8, C)
    torch.manual_seed(7)
    out = layer(x, None)
    torch.manual_seed(7)
    chosen = draw_sentence_experts("sentence", E, 8)
    assert len(set(chosen.tolist())) > 1, "the test needs a batch that mixes experts"
    per_expert = [vanilla_with_expert(layer, TransformerEncoderLayerBase, k)(x, None) for k in range(E)]
    for b, k in enumerate(chosen.tolist()):
        torch.testing.assert_close(out[:, b], per_expert[k][:, b])


def test_token_routing_gives_each_token_its_experts_ffn():
    torch.manual_seed(0)
    layer = ThorTransformerEncoderLayer(tiny_cfg(), spec(inference_routing="token")).eval()
    x = torch.randn(T, B, C)
    torch.manual_seed(3)
    out = layer(x, None)
    torch.manual_seed(3)
    chosen = draw_token_experts(E, T, B)
    per_expert = [vanilla_with_expert(layer, TransformerEncoderLayerBase, k)(x, None) for k in range(E)]
    for t in range(T):
        for b in range(B):
            torch.testing.assert_close(out[t, b], per_expert[chosen[t, b]][t, b])


def test_merged_routing_equals_vanilla_layer_with_averaged_weights():
    torch.manual_seed(0)
    layer = ThorTransformerEncoderLayer(tiny_cfg(), spec(inference_routing="merged")).eval()
    averaged = copy.deepcopy(layer)
    for fc in (averaged.fc1, averaged.fc2):
        fc.weight.data[:] = fc.weight.data.mean(0, keepdim=True)
        fc.bias.data[:] = fc.bias.data.mean(0, keepdim=True)
    x = torch.randn(T, B, C)
    expected = vanilla_with_expert(averaged, TransformerEncoderLayerBase, 0)(x, None)
    with torch.no_grad():  # the decoding path (cached average)
        torch.testing.assert_close(layer(x, None), expected)
    torch.testing.assert_close(layer(x, None), expected)


def test_mean_routing_averages_the_experts_ffn_outputs():
    torch.manual_seed(0)
    layer = ThorTransformerEncoderLayer(tiny_cfg(), spec(inference_routing="mean")).eval()
    x = torch.randn(T, B, C)
    ffn_outputs = []
    for k in range(E):
        h = torch.relu(x @ layer.fc1.weight[k].T + layer.fc1.bias[k])
        ffn_outputs.append(h @ layer.fc2.weight[k].T + layer.fc2.bias[k])
    from fairseq_thor.modules.experts import routed
    from fairseq_thor.modules.routing import Route, RouteKind

    with routed(Route(kind=RouteKind.MEAN), layer.fc1, layer.fc2):
        got = layer.fc2(torch.relu(layer.fc1(x)))
    torch.testing.assert_close(got, torch.stack(ffn_outputs).mean(0))


@pytest.mark.parametrize("routing", ["batch", "sentence", "token"])
def test_only_routed_experts_receive_gradient(routing):
    torch.manual_seed(0)
    layer = ThorTransformerEncoderLayer(tiny_cfg(), spec(num_experts=4, train_routing=routing)).train()
    # small enough that some of the 4 experts get no input
    x = torch.randn(*{"batch": (T, B), "sentence": (T, 2), "token": (2, 1)}[routing], C)
    torch.manual_seed(11)
    layer(x, None).pow(2).sum().backward()
    torch.manual_seed(11)
    if routing == "token":
        used = set(draw_token_experts(4, x.size(0), x.size(1)).flatten().tolist())
    else:
        used = set(draw_sentence_experts(routing, 4, x.size(1)).tolist())
    assert 0 < len(used) < 4, "the test needs some unused experts"
    for fc in (layer.fc1, layer.fc2):
        norms = fc.weight.grad.flatten(1).norm(dim=1)
        for k in range(4):
            assert (norms[k] > 0) == (k in used), (routing, k, used, norms)


def test_expert_ffn_dim_sets_the_expert_width():
    layer = ThorTransformerEncoderLayer(tiny_cfg(), spec(ffn_dim=8))
    assert layer.fc1.weight.shape == (E, 8, C) and layer.fc2.weight.shape == (E, C, 8)


def test_each_expert_is_initialised_like_nn_linear():
    torch.manual_seed(0)
    layer = ThorTransformerEncoderLayer(tiny_cfg(), spec(num_experts=64, ffn_dim=64))
    bound = 1 / C ** 0.5  # kaiming_uniform(a=sqrt(5)) on fan_in C gives U(-1/sqrt(C), 1/sqrt(C))
    w = layer.fc1.weight
    assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound
    assert abs(w.std().item() - bound / 3 ** 0.5) < 0.01
    assert not torch.equal(w[0], w[1])


@pytest.mark.parametrize("counts", [[3, 3, 3], [2, 4, 3], [0, 5, 4]], ids=["equal", "unequal", "one-unused"])
def test_grouped_rows_get_their_experts_map_and_gradients(monkeypatch, counts):
    """Rows in expert order through the bank: equal shares (training's balanced draws) go through
    one batched matmul, the others expert by expert; both must be each row's own expert."""
    from fairseq_thor.modules.experts import ExpertLinear

    batched = []
    baddbmm = torch.baddbmm
    monkeypatch.setattr(torch, "baddbmm", lambda *a, **k: batched.append(1) or baddbmm(*a, **k))
    torch.manual_seed(0)
    bank = ExpertLinear(E, C, F, dispatches=True)
    rows = torch.randn(sum(counts), C, requires_grad=True)
    experts = torch.repeat_interleave(torch.arange(E), torch.tensor(counts))
    got = bank._per_expert(rows, counts)
    assert bool(batched) == (min(counts) == max(counts))
    expected = torch.einsum("ni,noi->no", rows, bank.weight[experts]) + bank.bias[experts]
    torch.testing.assert_close(got, expected)
    upstream = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, (rows, bank.weight, bank.bias), upstream),
                    torch.autograd.grad(expected, (rows, bank.weight, bank.bias), upstream)):
        torch.testing.assert_close(a, b)
