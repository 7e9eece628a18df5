"""fairseq-thor-export-dense refuses what it cannot export faithfully: models with a gate."""
import pytest

from conftest import build_model, parse_model_args
from fairseq_thor.errors import ThorError
from fairseq_thor.export_dense import export, parse_expert


@pytest.mark.parametrize("router", ["switch", "gshard", "hash"])
def test_gated_routers_are_refused_with_the_reason(router):
    flags = ["--num-experts", "4", "--expert-router", router]
    model = build_model("thor_transformer", flags)
    state = {"cfg": {"model": parse_model_args("thor_transformer", flags), "task": {"_name": "translation_thor"}}, "model": model.state_dict()}
    with pytest.raises(ThorError, match=f"--expert-router {router} model: its gate chooses between the experts"):
        export(state, [k for k, v in state["model"].items() if v.dim() == 3])


def thor_state(num_experts=4):
    flags = ["--num-experts", str(num_experts)]
    model = build_model("thor_transformer", flags)
    state = {"cfg": {"model": parse_model_args("thor_transformer", flags), "task": {"_name": "translation_thor"}},
             "model": model.state_dict()}
    banks = [k for k, v in state["model"].items() if k.endswith(("fc1.weight", "fc2.weight")) and v.dim() == 3]
    return state, banks + [k[: -len("weight")] + "bias" for k in banks]


@pytest.mark.parametrize("expert", [0, 3, "merged"])
def test_a_thor_model_exports_one_expert_or_the_average(expert):
    state, experts = thor_state()
    dense = export(state, experts, expert)
    assert dense["cfg"]["model"]["arch"] == "transformer" and "num_experts" not in dense["cfg"]["model"]
    for name in experts:
        bank = state["model"][name]
        assert dense["model"][name].shape == bank.shape[1:]
        assert dense["model"][name].equal(bank.mean(dim=0) if expert == "merged" else bank[expert])
    others = set(state["model"]) - set(experts)
    assert all(dense["model"][name].equal(state["model"][name]) for name in others)


@pytest.mark.parametrize("value", ["4", "-1", "one", ""])
def test_an_expert_outside_the_bank_is_refused_with_the_choices(value):
    with pytest.raises(ThorError, match=rf"--expert {value}: expected an expert index 0\.\.3, 'best'"):
        parse_expert(value, 4)
