"""benchmarks/fairseq_logs.py and the scores of benchmarks/cli_runs.py: what the study reads off
fairseq's logs (training statistics, validation curve, hypotheses) and the numbers it reports."""
import os
import sys

import pytest
import torch

from test_cli import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import cli_runs  # noqa: E402
import fairseq_logs as logs  # noqa: E402


TRAIN_LOG = """\
2026-11-30 15:03:30 | INFO | fairseq_cli.train | num. shared model params: 8,138,752 (num. trained: 8,138,752)
2026-11-30 15:03:30 | INFO | fairseq_cli.train | num. expert model params: 0 (num. trained: 0)
2026-11-30 15:03:41 | INFO | train_inner | epoch 001:     10 / 329 loss=11.919, nll_loss=11.805, aux_loss=1.2015, expert_load_max=0.493, gate_entropy=1.3483, dropped=0.4015, ppl=3578.81, wps=1705.4, ups=1.01, wpb=1616.4, bsz=107.2, num_updates=10, lr=0.0003, gnorm=2.929, clip=100, train_wall=10, wall=11
2026-11-30 15:03:43 | INFO | valid | epoch 001 | valid on 'valid' subset | loss 10.715 | nll_loss 10.475 | aux_loss 1.2 | ppl 1423.2 | wps 4515.9 | wpb 1103.4 | bsz 90.9 | num_updates 10
2026-11-30 15:03:52 | INFO | train_inner | epoch 001:     20 / 329 loss=10.326, nll_loss=10.024, aux_loss=1.3133, expert_load_max=0.5029, gate_entropy=1.3197, dropped=0.3679, ppl=1041.01, wps=1477, ups=0.91, wpb=1624.1, bsz=122.4, num_updates=20, lr=0.0006, gnorm=1.429, clip=100, train_wall=9, wall=22
2026-11-30 15:03:54 | INFO | valid | epoch 001 | valid on 'valid' subset | loss 9.79 | nll_loss 9.433 | ppl 691.1 | wps 4654.1 | wpb 1103.4 | bsz 90.9 | num_updates 20 | best_loss 9.79
2026-11-30 15:03:54 | INFO | train | epoch 001 | loss 11.1 | nll_loss 10.9 | aux_loss 1.25 | ppl 1900 | wps 1413.9 | ups 0.86 | wpb 1620 | bsz 114.8 | num_updates 20 | lr 0.0006 | gnorm 2.1 | clip 95 | train_wall 20 | wall 26
2026-11-30 15:04:30 | INFO | train | epoch 002 | loss 9.1 | nll_loss 8.9 | aux_loss 1.1 | ppl 480 | wps 1000 | ups 0.5 | wpb 1000 | bsz 100 | num_updates 30 | lr 0.0009 | gnorm 1.1 | clip 90 | train_wall 5 | wall 40
2026-11-30 15:04:30 | INFO | fairseq_cli.train | done training in 39.0 seconds
"""
GENERATE_LOG = """\
S-1\tb c
T-1\tthe second
H-1\t-0.5\tthe second one
D-1\t-0.5\tthe second one
P-1\t-0.1 -0.2 -0.3
S-0\ta
T-0\tthe first
H-0\t-0.4\tthe first
INFO:fairseq_cli.generate:Translated 2 sentences (1,266 tokens) in 4.6s (136.14 sentences/s, 1,275.33 tokens/s)
"""


def test_train_log_parser():
    parsed = logs.parse_train_log(TRAIN_LOG)
    assert parsed["total_params"] == 8138752
    assert parsed["num_updates"] == 30
    assert parsed["valid_curve"] == [{"num_updates": 10, "loss": 10.715, "nll_loss": 10.475},
                                     {"num_updates": 20, "loss": 9.79, "nll_loss": 9.433}]
    # (1620 * 20 + 1000 * 10) words in (20 + 5) s of training steps
    assert parsed["train_words_per_s"] == pytest.approx((1620 * 20 + 1000 * 10) / 25, abs=0.1)
    assert parsed["train_last"] == {"loss": 10.326, "nll_loss": 10.024, "aux_loss": 1.3133,
                                    "expert_load_max": 0.5029, "dropped": 0.3679, "gate_entropy": 1.3197}
    assert logs.progress(TRAIN_LOG.splitlines()[3]) == "update    10: valid loss 10.715, nll_loss 10.475"


def test_short_runs_fall_back_to_fairseqs_wps():
    epochs = [{"wpb": 400, "num_updates": 5, "train_wall": 0, "wps": 100.0},
              {"wpb": 400, "num_updates": 10, "train_wall": 0, "wps": 300.0}]
    assert logs.train_words_per_s(epochs) == 200.0


def test_generate_log_parser():
    parsed = logs.parse_generate_log(GENERATE_LOG)
    assert parsed["hypotheses"] == ["the first", "the second one"]
    assert parsed["references"] == ["the first", "the second"]
    assert parsed["sentences"] == 2 and parsed["decode_tokens_per_s"] == 1275.33 and parsed["decode_s"] == 4.6


def test_scores_report_the_brevity_penalty_and_length_ratio():
    refs = ["the cat sat on the mat today", "a dog ran in the park"]
    full = cli_runs.sacrebleu_scores(refs, refs)
    assert full["bleu"] == 100.0 and full["bleu_bp"] == 1.0 and full["length_ratio"] == 1.0
    short = cli_runs.sacrebleu_scores(["the cat sat", "a dog ran"], refs)  # half the words: penalised
    assert short["length_ratio"] == round(6 / 13, 3) and short["bleu_bp"] < 0.4


def test_active_params_count_one_expert_per_layer_or_two_for_top2():
    E, d, f = 4, 8, 16
    state = {"encoder.layers.0.fc1.weight": torch.zeros(E, f, d), "encoder.layers.0.fc1.bias": torch.zeros(E, f),
             "encoder.layers.0.fc2.weight": torch.zeros(E, d, f), "encoder.layers.0.fc2.bias": torch.zeros(E, d),
             "encoder.layers.1.fc1.weight": torch.zeros(f, d), "encoder.layers.1.fc1.bias": torch.zeros(f),
             "encoder.layers.0.gate.wg.weight": torch.zeros(E, d)}
    one_expert = 2 * d * f + f + d
    assert cli_runs.expert_ffn_numel(state, E) == E * one_expert
    assert cli_runs.expert_ffn_numel(state, 1) == 0
    total = 1000 + E * one_expert
    assert cli_runs.active_params(total, E * one_expert, E, 1) == 1000 + one_expert
    assert cli_runs.active_params(total, E * one_expert, E, 2) == 1000 + 2 * one_expert
