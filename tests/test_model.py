"""The thor_transformer model: dense equivalence, incremental decoding, options and errors."""
import pytest
import torch

from conftest import build_model, random_batch
from fairseq_thor.errors import ThorError
from fairseq_thor.models.thor_transformer import ThorTransformerModel
from fairseq_thor.modules.experts import ExpertLinear


def test_one_expert_model_is_exactly_the_dense_transformer(dictionary):
    torch.manual_seed(0)
    dense = build_model("transformer", dictionary=dictionary).eval()
    thor = build_model("thor_transformer", ["--num-experts", "1"], dictionary=dictionary).eval()
    assert set(thor.state_dict()) == set(dense.state_dict())
    thor.load_state_dict(dense.state_dict())
    src, lengths, prev = random_batch(dictionary)
    torch.testing.assert_close(thor(src, lengths, prev)[0], dense(src, lengths, prev)[0])


def test_architectures_mirror_fairseq_sizes(dictionary):
    from conftest import parse_model_args

    thor = parse_model_args("thor_transformer_wmt_en_de_big")
    dense = parse_model_args("transformer_wmt_en_de_big")
    for key, value in vars(dense).items():
        if key not in ("arch", "_name"):
            assert getattr(thor, key) == value, key
    assert thor.num_experts == 2 and thor.encoder_expert_layers == "alternate"


def test_experts_go_where_the_options_say(dictionary):
    model = build_model("thor_transformer", ["--num-experts", "3", "--encoder-layers", "4",
                                              "--decoder-expert-layers", "1"], dictionary=dictionary)
    enc = [isinstance(layer.fc1, ExpertLinear) for layer in model.encoder.layers]
    dec = [isinstance(layer.fc1, ExpertLinear) for layer in model.decoder.layers]
    assert enc == [True, False, True, False] and dec == [False, True]
    assert model.encoder.layers[0].fc1.weight.shape[0] == 3


@pytest.mark.parametrize("spec,expected", [("all", [0, 1, 2, 3, 4, 5]), ("every-3", [0, 3]),
                                           ("none", []), ("alternate", [0, 2, 4]), ("1,5", [1, 5])])
def test_expert_layer_specs(spec, expected):
    from fairseq_thor.models.expert_options import parse_expert_layers

    assert sorted(parse_expert_layers(spec, 6, "--x")) == expected


@pytest.mark.parametrize("routing", ["sentence", "batch", "fixed", "merged", "mean"])
def test_incremental_decoding_equals_full_forward(dictionary, routing):
    torch.manual_seed(0)
    model = build_model("thor_transformer", ["--num-experts", "4", "--decoder-expert-layers", "all",
                                              "--inference-routing", routing], dictionary=dictionary).eval()
    src, lengths, prev = random_batch(dictionary, batch_size=6, tgt_len=5)
    enc = model.encoder(src, src_lengths=lengths)
    torch.manual_seed(42)
    full = model.decoder(prev, encoder_out=enc)[0]
    torch.manual_seed(42)
    state, steps = {}, []
    for t in range(prev.size(1)):
        steps.append(model.decoder(prev[:, : t + 1], encoder_out=enc, incremental_state=state)[0])
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)


def test_sentence_experts_follow_beam_reordering(dictionary):
    torch.manual_seed(0)
    model = build_model("thor_transformer", ["--num-experts", "4", "--decoder-expert-layers", "all"],
                        dictionary=dictionary).eval()
    src, lengths, prev = random_batch(dictionary, batch_size=4, tgt_len=3)
    enc = model.encoder(src, src_lengths=lengths)
    state = {}
    model.decoder(prev[:, :1], encoder_out=enc, incremental_state=state)
    layer = model.decoder.layers[0]
    before = layer.get_incremental_state(state, "route")["experts"].clone()
    new_order = torch.tensor([3, 3, 0, 1])
    model.decoder.reorder_incremental_state_scripting(state, new_order)
    after = layer.get_incremental_state(state, "route")["experts"]
    assert torch.equal(after, before[new_order])


def test_token_routing_draws_differ_between_passes(dictionary):
    torch.manual_seed(0)
    model = build_model("thor_transformer", ["--num-experts", "4", "--expert-routing", "token"],
                        dictionary=dictionary).train()
    src, lengths, prev = random_batch(dictionary)
    a, b = model(src, lengths, prev)[0], model(src, lengths, prev)[0]
    assert not torch.allclose(a, b)
    torch.manual_seed(9)
    c = model(src, lengths, prev)[0]
    torch.manual_seed(9)
    torch.testing.assert_close(model(src, lengths, prev)[0], c)


def test_set_inference_routing_switches_every_expert_layer(dictionary):
    model = build_model("thor_transformer", ["--num-experts", "3"], dictionary=dictionary)
    model.set_inference_routing("fixed", 2)
    specs = [m.spec for m in model.modules() if hasattr(m, "spec")]
    assert specs and all(s.inference_routing == "fixed" and s.inference_expert == 2 for s in specs)
    with pytest.raises(ValueError, match="--inference-expert 3 is out of range.*0..2"):
        model.set_inference_routing("fixed", 3)


@pytest.mark.parametrize("extra,message", [
    (["--num-experts", "0"], "--num-experts must be >= 1"),
    (["--encoder-expert-layers", "0,2"], "--encoder-expert-layers '0,2': layer index 2 is out of range"),
    (["--decoder-expert-layers", "every-x"], "--decoder-expert-layers 'every-x'"),
    (["--decoder-expert-layers", "first"], "--decoder-expert-layers 'first' is not valid"),
    (["--encoder-expert-layers", ""], "--encoder-expert-layers is empty;.*('none' for no expert layer)"),
    (["--decoder-expert-layers", " , "], "--decoder-expert-layers is empty"),
    (["--inference-routing", "fixed", "--inference-expert", "2"], "--inference-expert 2 is out of range"),
    (["--num-experts", "1", "--encoder-expert-ffn-dim", "8"], "--encoder-expert-ffn-dim needs --num-experts > 1"),
])
def test_bad_options_name_the_flag(dictionary, extra, message):
    with pytest.raises(ThorError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_model("thor_transformer", extra, dictionary=dictionary)


def test_checkpoint_with_other_number_of_experts_is_refused(dictionary):
    four = build_model("thor_transformer", ["--num-experts", "4"], dictionary=dictionary)
    two = build_model("thor_transformer", ["--num-experts", "2"], dictionary=dictionary)
    assert isinstance(two, ThorTransformerModel)
    with pytest.raises(ValueError, match="checkpoint has 4 expert.*--num-experts 2"):
        two.load_state_dict(four.state_dict())
    dense = build_model("transformer", dictionary=dictionary)
    with pytest.raises(ValueError, match="checkpoint has 1 expert"):
        two.load_state_dict(dense.state_dict())
