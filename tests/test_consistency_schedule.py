"""--consistency-alpha-warmup-updates: the consistency weight ramps from 0 to alpha, also across a resume."""
import re

import pytest
import torch

from conftest import DictTask, build_model
from fairseq_thor.criterions.thor_consistency import ThorConsistencyCriterion, consistency_weight
from test_cli import MODEL, make_toy_data, run
from test_criterion import make_sample

ALPHA, WARMUP = 2.0, 4


def criterion(dictionary, alpha=ALPHA, warmup=WARMUP):
    return ThorConsistencyCriterion(DictTask(dictionary), sentence_avg=False, label_smoothing=0.1,
                                    consistency_alpha=alpha, consistency_alpha_warmup_updates=warmup)


@pytest.mark.parametrize("num_updates,expected", [(0, 0.0), (2, 1.0), (4, 2.0), (8, 2.0)])
def test_weight_ramps_linearly_then_stays_at_alpha(num_updates, expected):
    assert consistency_weight(ALPHA, WARMUP, num_updates) == pytest.approx(expected)


def test_no_warmup_is_alpha_from_the_first_update():
    assert consistency_weight(ALPHA, 0, 0) == ALPHA


@pytest.mark.parametrize("alpha,warmup,flag", [
    (float("nan"), 0, "--consistency-alpha must be >= 0 and finite"),
    (float("inf"), 0, "--consistency-alpha must be >= 0 and finite"),
    (-0.5, 0, "--consistency-alpha must be >= 0 and finite"),
    (1.0, -1, "--consistency-alpha-warmup-updates must be a whole number of updates >= 0"),
    (1.0, 2.5, "--consistency-alpha-warmup-updates must be a whole number of updates >= 0"),
])
def test_bad_values_are_refused_naming_the_flag(dictionary, alpha, warmup, flag):
    with pytest.raises(ValueError, match=re.escape(flag)):
        criterion(dictionary, alpha, warmup)


def test_loss_and_log_use_the_ramped_weight(dictionary):
    torch.manual_seed(0)
    model = build_model("thor_transformer", ["--num-experts", "4", "--expert-routing", "token"],
                        dictionary=dictionary).train()
    sample = make_sample(dictionary)
    crit = criterion(dictionary)
    results = {}
    for u in (0, 2, 4):
        crit.set_num_updates(u)
        torch.manual_seed(3)  # the same two passes each time
        results[u] = crit(model, sample)
    kl = results[0][2]["consistency"]
    assert kl > 0
    base = results[0][0]  # weight 0: the two cross-entropies alone
    torch.testing.assert_close(results[2][0], base + 1.0 * kl)
    torch.testing.assert_close(results[4][0], base + 2.0 * kl)
    assert results[2][2]["consistency_alpha"] == pytest.approx(1.0 * sample["ntokens"])


def test_warmup_without_an_update_number_is_refused(dictionary):
    # a task that does not pass the update number on (fairseq's own translation task)
    model = build_model("transformer", dictionary=dictionary).train()
    with pytest.raises(ValueError, match="--consistency-alpha-warmup-updates needs the update number"):
        criterion(dictionary)(model, make_sample(dictionary))
    _, _, log = criterion(dictionary, warmup=0)(model, make_sample(dictionary))
    assert log["consistency_alpha"] == ALPHA * make_sample(dictionary)["ntokens"]


# -- through fairseq-train ---------------------------------------------------------------------

def logged_alphas(output):
    """{num_updates: consistency_alpha} from fairseq's train_inner lines (--log-format simple)."""
    found = {}
    for line in output.splitlines():
        alpha, update = re.search(r"consistency_alpha=([\d.]+)", line), re.search(r"num_updates=(\d+)", line)
        if alpha and update:
            found[int(update.group(1))] = float(alpha.group(1))
    return found


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    return make_toy_data(tmp_path_factory.mktemp("schedule"))


@pytest.mark.cli
def test_fairseq_train_ramps_the_weight_and_resumes_the_ramp(toy_data, tmp_path):
    data, ckpt = toy_data, tmp_path / "ckpt"
    args = [data, "--user-dir", "fairseq_thor", "--cpu", "--task", "translation_thor", *MODEL,
            "--criterion", "thor_consistency", "--consistency-alpha", ALPHA,
            "--consistency-alpha-warmup-updates", WARMUP, "--label-smoothing", "0.1",
            "--optimizer", "adam", "--lr", "0.003", "--max-tokens", "300", "--save-dir", ckpt,
            "--log-format", "simple", "--log-interval", "1", "--no-epoch-checkpoints", "--seed", "3"]
    _, first = run("fairseq-train", *args, "--max-update", "3")
    # the line for num_updates=k reports the step that started at update k-1: weight 2 * (k-1) / 4
    assert logged_alphas(first) == {1: 0.0, 2: 0.5, 3: 1.0}

    state = torch.load(ckpt / "checkpoint_last.pt", weights_only=True)  # allow-listed by fairseq_thor
    assert state["cfg"]["criterion"]["consistency_alpha_warmup_updates"] == WARMUP

    _, resumed = run("fairseq-train", *args, "--max-update", "6")
    assert re.search(r"Loaded checkpoint .*checkpoint_last\.pt \(epoch \d+ @ 3 updates\)", resumed)
    assert logged_alphas(resumed) == {4: 1.5, 5: 2.0, 6: 2.0}


@pytest.mark.cli
def test_fairseq_train_refuses_a_nan_weight(toy_data, tmp_path):
    code, out = run("fairseq-train", toy_data, "--user-dir", "fairseq_thor", "--cpu",
                    "--task", "translation_thor", *MODEL, "--criterion", "thor_consistency",
                    "--consistency-alpha", "nan", "--max-tokens", "300", "--save-dir", tmp_path / "ckpt",
                    check=False)
    assert code != 0 and "--consistency-alpha must be >= 0 and finite (0 <= A < inf), got nan" in out
