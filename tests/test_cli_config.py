"""Settings users can discover: `distill config [SECTION]`, every field described, train.args type-checked."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from distill.cli import app
from distill.config import ConfigError, describe, load_config


def test_every_setting_has_a_type_default_and_description():
    rows = describe()
    assert len(rows) > 100
    missing = [key for key, _t, _d, desc in rows if not desc]
    assert missing == []
    by_key = {r[0]: r for r in rows}
    assert by_key["train.learning_rate"][1:3] == ("float", "0.0005")
    assert by_key["teacher.backend"][1] == "hf | openai | vllm"
    assert by_key["train.losses[].name"][2] == "(required)"
    assert "data.truncate" in by_key and "train.onpolicy.lmbda" in by_key


def test_config_command_lists_a_section_and_refuses_unknown_ones():
    res = CliRunner().invoke(app, ["config", "train"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert all(line.startswith("train.") for line in lines)
    lr = next(line for line in lines if line.startswith("train.learning_rate "))
    assert lr.split()[1:3] == ["float", "0.0005"] and "learning rate" in lr
    assert any(line.startswith("train.cot.mode ") for line in lines)
    res = CliRunner().invoke(app, ["config", "trian"])
    assert res.exit_code == 2 and "did you mean 'train'" in res.output
    res = CliRunner().invoke(app, ["train", "--help"])
    assert res.exit_code == 0 and "distill config train" in " ".join(res.output.split())


def test_train_args_are_parsed_against_training_arguments(tmp_path):
    cfg = load_config(None, ["train.args.learning_rate=1e-3", "train.args.max_grad_norm=0.5",
                             "train.args.dataloader_drop_last=true"])
    assert cfg.train.args == {"learning_rate": 0.001, "max_grad_norm": 0.5, "dataloader_drop_last": True}
    yaml_file = tmp_path / "cfg.yaml"
    yaml_file.write_text("train:\n  args:\n    learning_rate: 1e-3\n    optim: sgd\n")  # YAML 1.1: '1e-3' is a str
    assert load_config(yaml_file).train.args["learning_rate"] == pytest.approx(1e-3)
    with pytest.raises(ConfigError, match=r"train.args.max_grad_norm: expected float, got 'lots'"):
        load_config(None, ["train.args.max_grad_norm=lots"])
    with pytest.raises(ConfigError, match=r"train.args.learnig_rate: not a transformers.TrainingArguments field; "
                                          r"did you mean 'learning_rate'"):
        load_config(None, ["train.args.learnig_rate=1"])


def test_train_args_reach_the_trainer_as_numbers(tmp_path):
    from distill.training.train import _training_args

    cfg = load_config({"run_dir": str(tmp_path)}, ["train.args.learning_rate=1e-3", "train.args.warmup_steps=3"])
    args = _training_args(cfg, tmp_path / "out", "s")
    assert args.learning_rate == 0.001 and isinstance(args.learning_rate, float) and args.warmup_steps == 3


def test_config_lists_each_loss_s_typed_parameters():
    rows = [r for r in describe("train.losses") if r[0].startswith("train.losses[].params.")]
    beta = next(r for r in rows if r[0] == "train.losses[].params.beta" and "(jsd)" in r[3])
    assert beta[1:3] == ("float", "0.5")
    assert any(r[0] == "train.losses[].params.alpha" and "skew_forward_kl" in r[3] for r in rows)
