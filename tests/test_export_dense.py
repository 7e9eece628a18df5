"""fairseq-thor-export-dense refuses what it cannot export faithfully: models with a gate."""
import pytest

from conftest import build_model, parse_model_args
from fairseq_thor.errors import ThorError
from fairseq_thor.export_dense import export


@pytest.mark.parametrize("router", ["switch", "gshard", "hash"])
def test_gated_routers_are_refused_with_the_reason(router):
    flags = ["--num-experts", "4", "--expert-router", router]
    model = build_model("thor_transformer", flags)
    state = {"cfg": {"model": parse_model_args("thor_transformer", flags), "task": {"_name": "translation_thor"}}, "model": model.state_dict()}
    with pytest.raises(ThorError, match=f"--expert-router {router} model: its gate chooses between the experts"):
        export(state, [k for k, v in state["model"].items() if v.dim() == 3])


def test_a_thor_model_exports_with_its_experts_averaged():
    model = build_model("thor_transformer", ["--num-experts", "4"])
    state = {"cfg": {"model": parse_model_args("thor_transformer", ["--num-experts", "4"]), "task": {"_name": "translation_thor"}}, "model": model.state_dict()}
    experts = [k for k, v in state["model"].items() if v.dim() == 3]
    dense = export(state, experts)
    assert dense["cfg"]["model"]["arch"] == "transformer" and "num_experts" not in dense["cfg"]["model"]
    for name in experts:
        assert dense["model"][name].shape == state["model"][name].shape[1:]
        assert dense["model"][name].equal(state["model"][name].mean(dim=0))
