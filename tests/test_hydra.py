"""fairseq-hydra-train with the shipped config trains what the same fairseq-train command trains,
and its checkpoint decodes with fairseq-generate."""
import os
import re

import pytest
import yaml

from test_cli import NUM_TEST, hypotheses, make_toy_data, run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "examples", "hydra", "config")
pytestmark = pytest.mark.cli

# the demo recipe at toy size: both commands get these on top of the shipped config
TOY = {"model": {"encoder_layers": 1, "decoder_layers": 1, "encoder_embed_dim": 32, "decoder_embed_dim": 32,
                 "encoder_ffn_embed_dim": 64, "decoder_ffn_embed_dim": 64, "encoder_attention_heads": 2,
                 "decoder_attention_heads": 2, "num_experts": 3},
       "optimization": {"max_update": 4}, "lr_scheduler": {"warmup_updates": 2},
       "dataset": {"max_tokens": 1000}, "common": {"log_interval": 1, "cpu": True}}
NAMED = {"task": "--task", "criterion": "--criterion", "model": "--arch", "optimizer": "--optimizer",
         "lr_scheduler": "--lr-scheduler"}


def shipped_config(**overrides):
    with open(os.path.join(CONFIG_DIR, "thor_demo.yaml")) as f:
        config = yaml.safe_load(f)
    for section, values in overrides.items():
        config.setdefault(section, {}).update(values)
    return config


def as_cli_flags(config):
    """The fairseq-train command line that says what ``config`` says (``data`` comes first)."""
    flags = [config["task"]["data"]]
    for section, values in config.items():
        for key, value in values.items():
            if key == "data":
                continue
            if key == "_name":
                flags += [NAMED[section], value]
            elif value is True:
                flags.append("--" + key.replace("_", "-"))
            elif key == "adam_betas":
                flags += ["--adam-betas", f"({value[0]}, {value[1]})"]
            elif isinstance(value, list):
                flags += ["--" + key.replace("_", "-"), ",".join(map(str, value))]
            else:
                flags += ["--" + key.replace("_", "-"), str(value)]
    return flags


def as_hydra_overrides(config):
    shipped = shipped_config()
    out = []
    for section, values in config.items():
        for key, value in values.items():
            if shipped.get(section, {}).get(key, object()) != value:
                if isinstance(value, list):
                    text = "[" + ",".join(map(str, value)) + "]"
                else:
                    text = str(value).lower() if isinstance(value, bool) else str(value)
                plus = "" if key in shipped.get(section, {}) or section != "model" else "+"
                out.append(f"{plus}{section}.{key}={text}")
    return out


def losses(log):
    """(loss, update) of every train_inner line (\\b: not nll_loss)."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"\bloss=([\d.]+), .*?num_updates=(\d+)", log)]


def test_hydra_config_trains_like_the_cli_and_its_checkpoint_decodes(tmp_path):
    data = make_toy_data(tmp_path)
    config = shipped_config(**TOY)
    config["task"]["data"] = str(data)
    config["common"]["user_dir"] = os.path.join(REPO, "fairseq_thor")
    cli = dict(config, checkpoint={**config["checkpoint"], "save_dir": str(tmp_path / "cli")})
    hydra = dict(config, checkpoint={**config["checkpoint"], "save_dir": str(tmp_path / "hydra")})
    _, cli_log = run("fairseq-train", *as_cli_flags(cli))
    _, hydra_log = run("fairseq-hydra-train", "--config-dir", CONFIG_DIR, "--config-name", "thor_demo",
                       f"hydra.run.dir={tmp_path / 'hydra-run'}", *as_hydra_overrides(hydra))
    expected = losses(cli_log)
    assert [u for _, u in expected] == ["1", "2", "3", "4"], cli_log[-2000:]
    assert losses(hydra_log) == expected  # same model, options, draws and data order
    assert "expert_load_max" in hydra_log  # THOR layers, not dense ones
    _, out = run("fairseq-generate", data, "--user-dir", "fairseq_thor", "--cpu", "--task", "translation_thor",
                 "--path", tmp_path / "hydra" / "checkpoint_last.pt", "--gen-subset", "test", "--beam", "2")
    assert [i for i, _ in hypotheses(out)] == list(range(NUM_TEST))
