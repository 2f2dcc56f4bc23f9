"""One EOS rule, one meaning of `dtype: auto`, BOS kept for GGUF, the transformers pin (issue 18)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_llama, make_tokenizer

from distill.modeling import eos_token_ids

# ----------------------------------------------------------------------------------------------- EOS


def _chat_model_dir(tmp_path):
    """A tiny model saved with an extra end token in its generation_config only (as Llama-3 lists <|eot_id|>):
    the token it greedily emits first. Returns (dir, that token, prompt)."""
    from distill.evaluation.generation import encode_prompts, generate_ids

    tok = make_tokenizer()
    model = make_llama(len(tok), hidden=32, layers=1, heads=2, seed=3)
    prompt = "Q: Tom has 12 apples."
    first = generate_ids(model, tok, encode_prompts(tok, [prompt]), 8, False)[0]
    end = first[0]
    assert end not in (tok.eos_token_id, tok.pad_token_id) and len(set(first)) > 1  # the test's premise
    model.generation_config.eos_token_id = [tok.eos_token_id, end]
    out = tmp_path / "chat"
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out, end, prompt


def test_eval_stops_at_an_eos_listed_only_in_generation_config(tmp_path):
    """Before, eval generated past <|eot_id|>-like ends (it stopped only at the tokenizer's EOS), so a chat
    model's answer ran on into a new turn while generate, serving and on-policy stopped."""
    from distill.evaluation.generation import generate_batch, load_for_eval

    path, end, prompt = _chat_model_dir(tmp_path)
    model, tok = load_for_eval(path, device="cpu")
    assert end in eos_token_ids(model, tok)
    gen = generate_batch(model, tok, [prompt], max_new_tokens=8, batch_size=1)
    assert gen.output_ids == [[end]]


def test_every_generating_stage_stops_on_the_same_tokens(tmp_path):
    from distill.config import DataConfig, TeacherConfig
    from distill.evaluation.generation import load_for_eval
    from distill.serving.engine import Engine
    from distill.teachers.hf import HFTeacher

    path, end, _ = _chat_model_dir(tmp_path)
    model, tok = load_for_eval(path, device="cpu")
    teacher = HFTeacher(TeacherConfig(model=str(path), device="cpu"), DataConfig())
    assert teacher.eos_ids == sorted(Engine(model, tok).eos_ids) == eos_token_ids(model, tok) == [2, end]


# ----------------------------------------------------------------------------------------------- dtype


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA machine as far as dtype and device choice can tell: models 'move' to cuda without moving."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    real_to = torch.nn.Module.to

    def to(self, *args, **kwargs):
        args = tuple(a for a in args if not (isinstance(a, (str, torch.device)) and "cuda" in str(a)))
        kwargs.pop("device", None)
        return real_to(self, *args, **kwargs) if args or kwargs else self

    monkeypatch.setattr(torch.nn.Module, "to", to)


def _stage_dtypes(tmp_path, saved: torch.dtype) -> dict[str, torch.dtype]:
    """The teacher's dtype in generate, train (online) and eval for one config whose dtypes are all `auto`."""
    from distill.config import load_config
    from distill.evaluation.generation import load_for_eval
    from distill.teachers.hf import HFTeacher
    from distill.training.train import _models, _sides

    tok = make_tokenizer()
    teacher_dir = tmp_path / f"teacher-{saved}"
    make_llama(len(tok), hidden=16, layers=1, heads=2).to(saved).save_pretrained(teacher_dir)
    tok.save_pretrained(teacher_dir)
    cfg = load_config({"teacher": {"model": str(teacher_dir)}, "run_dir": str(tmp_path / "run"),
                       "train": {"signal": "online"},
                       "student": {"init": "config", "config": {"num_hidden_layers": 1}}})
    sides = _sides(cfg, cfg.student)
    return {
        "generate": next(HFTeacher(cfg.teacher, cfg.data).model.parameters()).dtype,
        "train": next(_models(cfg, cfg.student, sides)[2].parameters()).dtype,
        "eval": next(load_for_eval(teacher_dir, cfg.eval.device, cfg.eval.dtype)[0].parameters()).dtype,
    }


@pytest.mark.parametrize("saved", [torch.bfloat16, torch.float32])
def test_auto_dtype_is_the_same_in_generate_train_and_eval_on_an_accelerator(tmp_path, fake_gpu, saved):
    """Before, `teacher.dtype: auto` gave the teacher fp32 in training (resolved for the CPU it is loaded on) but
    bf16 in generate and eval (resolved for CUDA), whatever the checkpoint: now it is the checkpoint's dtype."""
    assert _stage_dtypes(tmp_path, saved) == {"generate": saved, "train": saved, "eval": saved}


def test_auto_dtype_is_float32_on_cpu_in_every_stage(tmp_path):
    assert set(_stage_dtypes(tmp_path, torch.bfloat16).values()) == {torch.float32}


def test_resolve_dtype_rules(tmp_path):
    from distill.modeling import checkpoint_dtype, resolve_dtype

    make_llama(32, hidden=16, layers=1, heads=2).to(torch.float16).save_pretrained(tmp_path)
    assert checkpoint_dtype(tmp_path) == torch.float16
    assert checkpoint_dtype(tmp_path / "missing") is None
    assert resolve_dtype("auto", "cpu", tmp_path) == torch.float32  # bf16/fp16 matmuls are slow on CPU
    assert resolve_dtype("bf16", "cpu") == resolve_dtype(torch.bfloat16) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8")


def test_resolve_dtype_on_an_accelerator(tmp_path, fake_gpu, monkeypatch):
    from distill.modeling import resolve_dtype

    make_llama(32, hidden=16, layers=1, heads=2).to(torch.float16).save_pretrained(tmp_path)
    assert resolve_dtype("auto", "cuda", tmp_path) == torch.float16
    assert resolve_dtype("auto", "auto", tmp_path / "model.gguf") == torch.bfloat16  # a GGUF does not say
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", "cuda", torch.bfloat16) == torch.float32


# ----------------------------------------------------------------------------------------------- GGUF BOS


@pytest.fixture(scope="module")
def gguf_pair(tmp_path_factory):
    """(HF dir, .gguf) of one tiny model whose tokenizer adds BOS, written the way `distill export --gguf` does."""
    pytest.importorskip("gguf")
    from distill.exporting.gguf import export_gguf

    tmp_path = tmp_path_factory.mktemp("gguf")
    tok = make_tokenizer(chat_template=True)
    tok.add_bos_token = True
    model = make_llama(len(tok), hidden=16, layers=1, heads=2)
    model.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf", export_gguf(model, tok, tmp_path / "m.gguf", "f16")["path"]


def test_a_gguf_tokenizer_adds_the_bos_its_file_asks_for(gguf_pair):
    """A .gguf teacher or served model must see the prompt ids its HF directory gives (BOS included)."""
    from distill.data.encoding import encode_prompt
    from distill.modeling import gguf_add_bos, load_tokenizer_for

    hf_dir, gguf_path = gguf_pair
    hf, gg = load_tokenizer_for(hf_dir), load_tokenizer_for(gguf_path)
    assert gguf_add_bos(gguf_path) == hf.bos_token_id == 1
    for text in ("Q: Tom has 12 apples. How many now?", ""):
        want = encode_prompt(hf, text, False)
        assert want[0] == hf.bos_token_id and encode_prompt(gg, text, False) == want


def test_add_gguf_bos_restores_a_bos_the_loader_dropped(gguf_pair):
    """Some transformers versions load a GGUF tokenizer with no BOS (no bos_token, or a post-processor that
    ignores add_bos_token): the file's metadata puts it back."""
    from distill.modeling import add_gguf_bos, load_tokenizer_for

    hf_dir, gguf_path = gguf_pair
    want = load_tokenizer_for(hf_dir)("hello")["input_ids"]
    tok = load_tokenizer_for(gguf_path)
    tok.add_bos_token = False  # what such a loader gives
    assert tok("hello")["input_ids"] == want[1:]
    add_gguf_bos(tok, gguf_path)
    assert tok("hello")["input_ids"] == want


# ----------------------------------------------------------------------------------------------- pins


def _declared_minimum(package: str):
    """The lower bound pyproject.toml declares for a dependency (tomllib is Python 3.11+)."""
    import re
    from pathlib import Path

    from packaging.requirements import Requirement
    from packaging.version import Version

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    lines = re.findall(r'^\s*"([^"]+)",', text, flags=re.M)
    req = next(Requirement(x) for x in lines if Requirement(x).name == package)
    return max(Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~="))


def test_saved_tokenizers_load_with_the_declared_transformers(tmp_path):
    """Every tokenizer distill saves names TokenizersBackend (transformers 5.x); with `transformers>=4.56`
    declared, a 4.x install could not load a single student distill wrote."""
    import json

    from packaging.version import Version

    from distill.modeling import save_model

    tok = make_tokenizer()
    save_model(make_llama(len(tok), hidden=16, layers=1, heads=2), tok, tmp_path)
    cls = json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"]
    introduced = {"TokenizersBackend": Version("5.0")}  # classes a saved tokenizer may name, and since when
    assert _declared_minimum("transformers") >= introduced.get(cls, Version("0"))


# ----------------------------------------------------------------------------------------------- MLflow

FAKE_MLFLOW = {
    "__init__.py": "from mlflow import exceptions, utils\n__version__ = '3.14.0'\n"
                   "def is_tracking_uri_set():\n    return True\n"
                   "def get_tracking_uri():\n    return './mlruns'\n"
                   "def active_run():\n    return None\n"
                   "def start_run(**kwargs):\n    raise exceptions.MlflowException(\n"
                   "        \"The filesystem tracking backend (e.g., './mlruns') is no longer supported.\\n"
                   "Please migrate to a database backend (e.g., 'sqlite:///mlflow.db').\")\n",
    "exceptions.py": "class MlflowException(Exception):\n    pass\n",
    "utils/__init__.py": "from mlflow.utils import validation\n",
    "utils/validation.py": "MAX_PARAM_VAL_LENGTH = 6000\nMAX_PARAMS_TAGS_PER_BATCH = 100\n",
}


def _tiny_train_cfg(tmp_path, report_to: list[str]):
    import json

    from distill.config import load_config

    tok = make_tokenizer()
    teacher = tmp_path / "teacher"
    make_llama(len(tok), hidden=16, layers=1, heads=2).save_pretrained(teacher)
    tok.save_pretrained(teacher)
    data = tmp_path / "train.jsonl"
    rows = [{"prompt": f"Q: 2 + {i} =", "response": f" {2 + i}"} for i in range(4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_config({"run_dir": str(tmp_path / "run"), "teacher": {"model": str(teacher)},
                        "student": {"init": "config", "config": {"num_hidden_layers": 1}},
                        "train": {"input": str(data), "signal": "none", "losses": [{"name": "cross_entropy"}],
                                  "max_steps": 1, "save_steps": 1000, "report_to": report_to}})


def test_an_mlflow_store_refusal_is_one_line(tmp_path, monkeypatch):
    """MLflow 3.13+ refuses a './mlruns' file store from inside Trainer.train: it was a 40-line traceback, rc 1."""
    from typer.testing import CliRunner

    from distill.cli import app
    from distill.config import save_config

    for rel, text in FAKE_MLFLOW.items():
        (tmp_path / "pkgs" / "mlflow" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pkgs" / "mlflow" / rel).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    for mod in [m for m in list(__import__("sys").modules) if m == "mlflow" or m.startswith("mlflow.")]:
        monkeypatch.delitem(__import__("sys").modules, mod)
    cfg_path = tmp_path / "cfg.yaml"
    save_config(_tiny_train_cfg(tmp_path, ["mlflow"]), cfg_path)
    res = CliRunner().invoke(app, ["train", str(cfg_path)])
    assert res.exit_code == 2, res.output
    assert "train.report_to: mlflow refused to log: The filesystem tracking" in res.output
    assert "sqlite:///mlflow.db" in res.output and "Traceback" not in res.output


def test_a_tracker_that_is_not_installed_fails_at_preflight(tmp_path):
    from distill.errors import ConfigError
    from distill.preflight import check_trackers

    with pytest.raises(ConfigError, match="train.report_to: 'clearml' is not installed; `pip install clearml`"):
        check_trackers(["none", "clearml"])
    with pytest.raises(ConfigError, match="unknown tracker 'mlfow'"):
        check_trackers(["mlfow"])
