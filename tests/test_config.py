import pytest
import yaml

from distill.config import ConfigError, load_config, save_config


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "train": {"learning_rate": 1e-3}}))
    cfg = load_config(path, ["train.learning_rate=3e-4", "student.num_layers=2", 'generate.stop=["\\n", "Q:"]'])
    assert cfg.train.learning_rate == pytest.approx(3e-4)
    assert cfg.student.num_layers == 2
    assert cfg.generate.stop == ["\n", "Q:"]
    assert cfg.run_dir == str(tmp_path / "run")


def test_unknown_key_names_the_key_and_suggests(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"train": {"learning_rat": 1e-3}}))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "train.learning_rat" in msg and "unknown key" in msg and "learning_rate" in msg


def test_bad_value_names_field_and_input():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.learning_rate=-1"])
    assert "train.learning_rate" in str(err.value) and "-1" in str(err.value)
    with pytest.raises(ConfigError, match="teacher.backend"):
        load_config(None, ["teacher.backend=gpt"])


def test_unknown_loss_is_an_error_with_hint():
    with pytest.raises(ConfigError) as err:
        load_config({"train": {"losses": [{"name": "foward_kl"}]}})
    assert "losses" in str(err.value) and "forward_kl" in str(err.value)


def test_override_syntax_error():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.learning_rate"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.losses=[{name: cross_entropy, weight: 0.5}, {name: forward_kl, weight: 0.5}]"])
    out = save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(out)
    assert again == cfg
    assert [t.name for t in again.train.losses] == ["cross_entropy", "forward_kl"]


def test_duplicate_student_names():
    with pytest.raises(ConfigError, match="unique"):
        load_config({"students": [{"name": "a"}, {"name": "a"}]})


def test_per_student_train_overrides():
    cfg = load_config({
        "train": {"signal": "offline", "losses": [{"name": "forward_kl"}]},
        "students": [{"name": "kd"}, {"name": "baseline", "train": {"signal": "none", "input": "labels.jsonl",
                                                                      "losses": [{"name": "cross_entropy"}]}}],
    })
    kd, base = cfg.all_students()
    assert cfg.train_for(kd).signal == "offline"
    assert cfg.train_for(base).signal == "none" and cfg.train_for(base).losses[0].name == "cross_entropy"
    assert cfg.for_student(base).train.input == "labels.jsonl" and cfg.for_student(base).student.name == "baseline"
    with pytest.raises(ConfigError) as err:
        load_config({"students": [{"name": "b", "train": {"signall": "none"}}]})
    assert "student 'b'" in str(err.value) and "signall" in str(err.value)
