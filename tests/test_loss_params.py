"""Typed loss parameters (distill.losses.registry): validated when the config loads, naming the key, and at
every call of the loss function; every registered loss declares them."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from distill.config import ConfigError, load_config
from distill.losses import LOSSES, describe_params, jsd, skew_forward_kl


def _error(override: str) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    return str(err.value)


def test_unknown_param_names_the_key_with_a_hint():
    msg = _error("train.losses=[{name: jsd, params: {betaa: 0.5}}]")
    assert "train.losses[0].params.betaa" in msg and "did you mean 'beta'" in msg


def test_out_of_range_param_names_the_key_and_the_range():
    msg = _error("train.losses=[{name: cross_entropy}, {name: jsd, params: {beta: 1.5}}]")
    assert "train.losses[1].params.beta" in msg and "0.0 <= beta <= 1.0" in msg and "1.5" in msg
    msg = _error("train.losses=[{name: skew_reverse_kl, params: {alpha: -0.1}}]")
    assert "train.losses[0].params.alpha" in msg and "0.0 <= alpha <= 1.0" in msg


def test_wrong_type_and_param_of_another_loss():
    assert "train.losses[0].params.alpha" in _error("train.losses=[{name: skew_forward_kl, params: {alpha: x}}]")
    msg = _error("train.losses=[{name: forward_kl, params: {beta: 0.5}}]")
    assert "train.losses[0].params.beta" in msg and "forward_kl takes no parameter 'beta'" in msg


def test_valid_params_load_and_are_kept_as_written():
    losses = ("train.losses=[{name: jsd, params: {beta: 0.25}}, {name: hidden_mse, "
              "params: {layer_map: [[0, 0], [2, 4]]}}, {name: cross_entropy}]")
    cfg = load_config(None, [losses])
    assert cfg.train.losses[0].params == {"beta": 0.25}
    assert LOSSES["hidden_mse"].parse_params(cfg.train.losses[1].params)["layer_map"] == [(0, 0), (2, 4)]
    assert LOSSES["cross_entropy"].parse_params({}) == {"ignore_index": -100}


def test_student_override_params_are_checked_too():
    with pytest.raises(ConfigError, match=r"train\.losses\[0\]\.params\.betaa"):
        load_config({"students": [{"name": "a", "train": {"losses": [{"name": "jsd", "params": {"betaa": 1}}]}}]})


def test_cli_reports_a_bad_param_in_one_line(tmp_path):
    from distill.cli import app

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("train:\n  losses: [{name: jsd, params: {betaa: 0.5}}]\n")
    res = CliRunner().invoke(app, ["train", str(cfg)])
    assert res.exit_code == 2, res.output
    assert "train.losses[0].params.betaa" in res.output and "Traceback" not in res.output


def test_calls_validate_the_same_params():
    s, t = torch.randn(1, 3, 7), torch.randn(1, 3, 7)
    with pytest.raises(TypeError, match="did you mean 'beta'"):
        jsd(s, t, betaa=0.5)
    with pytest.raises(ValueError, match="alpha"):
        skew_forward_kl(s, t, alpha=2.0)
    # defaults come from the params model: jsd's beta 0.5 is the symmetric JSD
    torch.testing.assert_close(jsd(s, t), jsd(t, s))


@pytest.mark.parametrize("name", list(LOSSES))
def test_every_loss_declares_its_needs_and_params(name):
    entry = LOSSES[name]
    assert entry.student in ("logits", "hidden") and entry.teacher in ("labels", "signal", "hidden", "tokenizer")
    assert entry.signals <= {"dense", "sparse"} and entry.signals
    defaults = entry.parse_params({})  # every parameter has a default
    assert set(defaults) == {key for key, *_ in describe_params(name)}
    with pytest.raises(TypeError, match="takes no parameter"):
        entry.parse_params({"no_such_param": 1})
