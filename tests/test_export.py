"""`distill export`: HF round trip, LoRA merge, torchao int8 parity (with a negative control), ONNX vs
onnxruntime, and the export's model card (Hub metadata)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_llama, make_tokenizer

from distill.exporting.export import HELD_OUT_PROMPTS, export, load_int8, load_student, parity
from distill.modeling import load_model

# int8 parity bar. Measured on the hidden-128 random Llama below with the built-in prompts (torchao 0.18):
# weight-only int8 top-1 agreement 0.984, greedy-token agreement 0.875, mean KL < 5e-5; dynamic int8 (activations
# too) 0.969 / 0.742. Random
# models have nearly flat logits, so tiny quantization noise flips near-ties; 0.85 / 0.75 leave room for other
# kernels while a broken quantization (see the negative control) is near chance (~0.01).
TOP1_BAR, GREEDY_BAR, KL_BAR = 0.85, 0.75, 1e-3


def _ids(tok, text="Q: Tom has 12 apples. He eats 5. How many apples now? A:"):
    ids = torch.tensor([tok(text).input_ids, tok(text[::-1]).input_ids[: len(tok(text).input_ids)]])
    return ids


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    out = tmp_path_factory.mktemp("student")
    tok = make_tokenizer(chat_template=True)
    make_llama(len(tok), hidden=128, layers=2, seed=0).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "README.md").write_text("# student card\n\nscore kept: 93% of the teacher\n")
    return out


@pytest.fixture(scope="module")
def exported(student, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "small"
    report = export(student, out, quantize="int8")
    return out, report


def test_hf_round_trip_gives_same_logits_and_card(student, exported):
    out, report = exported
    original, tok, _ = load_student(student, dtype="float32", device="cpu")
    reloaded = load_model(out, dtype="float32", device="cpu")
    ids = _ids(tok)
    assert torch.equal(_logits(original, ids), _logits(reloaded, ids))
    assert (out / "tokenizer.json").exists() and (out / "model.safetensors").exists()
    saved = json.loads((out / "export_report.json").read_text())
    assert saved["parameters"] == sum(p.numel() for p in original.parameters()) == report["parameters"]
    card = (out / "README.md").read_text()
    assert f"{report['parameters']:,}" in card and str(student) in card
    assert "from_pretrained('small/int8')" in card
    assert "## student card" in card and "score kept: 93% of the teacher" in card  # the source card is kept


def test_export_card_has_hub_metadata(exported):
    """The export card's front matter is what the Hub parses (the student card here has none)."""
    from huggingface_hub import ModelCard

    out, _ = exported
    data = ModelCard.load(out / "README.md").data
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert {"distill", "distillation", "int8"} <= set(data.tags) and data.license == "other"
    assert data.base_model is None  # nothing says which hub model it came from
    assert "model_name" not in data.to_dict() and "model-index" not in data.to_dict()  # no eval figures here


def test_int8_parity_and_size(exported):
    _, report = exported
    q = report["int8"]
    p = q["parity"]
    assert p["prompts"] == len(HELD_OUT_PROMPTS) and p["tokens"] == len(HELD_OUT_PROMPTS) * 16
    assert p["top1_agreement"] >= TOP1_BAR, p
    assert p["greedy_token_agreement"] >= GREEDY_BAR, p
    assert p["mean_kl"] <= KL_BAR, p
    assert q["bytes"] < 0.5 * report["bytes"] and q["size_ratio"] == pytest.approx(q["bytes"] / report["bytes"])
    assert q["quantized_modules"] == 2 * 7 and q["scheme"] == "weight-only"  # q k v o gate up down per layer


def test_int8_loads_with_plain_transformers(student, exported):
    """No distill code: `from_pretrained(DIR/int8)` gives int8 weights whose logits follow full precision."""
    from transformers import AutoModelForCausalLM

    out, _ = exported
    int8 = AutoModelForCausalLM.from_pretrained(out / "int8")
    projections = {n: m for n, m in int8.named_modules() if n.endswith("_proj")}
    assert len(projections) == 14 and all(type(m.weight).__name__ == "Int8Tensor" for m in projections.values())
    assert type(int8.lm_head.weight).__name__ == "Parameter"  # the head stays in float
    fp, tok, _ = load_student(student, dtype="float32", device="cpu")
    ids = _ids(tok)
    want, got = _logits(fp, ids), _logits(int8, ids)
    assert not torch.equal(want, got) and torch.allclose(want, got, atol=0.1), (want - got).abs().max()


def test_int8_export_can_be_served(exported):
    """`distill serve DIR/int8` loads the quantized model; the engine decodes with it."""
    from distill.serving.engine import Engine, Row, SamplingParams

    out, _ = exported
    model, tok, info = load_student(out / "int8")
    assert info["int8"] and type(model.model.layers[0].mlp.up_proj.weight).__name__ == "Int8Tensor"
    events = []
    Engine(model, tok).generate([Row(tok("hello").input_ids, SamplingParams(max_tokens=4, temperature=0.0),
                                     events.append)])
    assert events[-1].finish_reason in ("stop", "length") and sum(len(e.tokens) for e in events) >= 1


def test_int8_parity_detects_broken_quantization(student, exported):
    """Negative control: the same metric on an int8 model with scrambled weights falls far below the bar."""
    out, _ = exported
    fp, tok, _ = load_student(student, dtype="float32", device="cpu")
    broken = load_int8(out / "int8")
    gen = torch.Generator().manual_seed(0)
    for name, mod in broken.named_modules():
        if name.endswith(("gate_proj", "up_proj", "down_proj", "o_proj")):
            qdata = mod.weight.qdata  # torchao Int8Tensor: int8 values + per-row scales
            perm = torch.randperm(qdata.shape[1], generator=gen)  # columns permuted: wrong wiring, same values
            qdata.copy_(qdata[:, perm].clone())
    p = parity(fp, broken, tok, HELD_OUT_PROMPTS[:4], max_new_tokens=8)
    assert p["top1_agreement"] < TOP1_BAR or p["mean_kl"] > KL_BAR, p


def test_lora_adapter_is_merged_with_same_logits(student, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    base = load_model(student, dtype="float32", device="cpu")
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    torch.manual_seed(3)
    peft_model = get_peft_model(base, cfg).eval()
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(student)
    tok = make_tokenizer(chat_template=True)
    ids = _ids(tok)
    want = _logits(PeftModel.from_pretrained(load_model(student, dtype="float32", device="cpu"), adapter), ids)
    assert not torch.allclose(want, _logits(load_model(student, dtype="float32", device="cpu"), ids), atol=1e-3)

    report = export(adapter, tmp_path / "merged")
    merged = load_model(tmp_path / "merged", dtype="float32", device="cpu")
    assert not any("lora" in k for k in merged.state_dict())
    assert torch.allclose(_logits(merged, ids), want, atol=1e-5)
    assert report["source"]["adapter"] == str(adapter) and report["source"]["base"] == str(student)
    assert (tmp_path / "merged" / "tokenizer.json").exists()
    from huggingface_hub import ModelCard

    assert ModelCard.load(adapter / "README.md").data.base_model == str(student)  # PEFT's card: a local path
    data = ModelCard.load(tmp_path / "merged" / "README.md").data
    assert data.base_model is None and data.library_name == "transformers"  # not a hub id: dropped


def test_onnx_matches_onnxruntime(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import numpy as np
    import onnxruntime as ort

    from distill.exporting.export import export_onnx

    tok = make_tokenizer()
    model = make_llama(len(tok), hidden=32, layers=1, heads=2)
    report = export_onnx(model, tok, tmp_path / "onnx")
    assert report["ok"] and report["max_abs_diff"] < 1e-4, report
    # dynamic axes: another batch size and length than both the export and the built-in check
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = torch.randint(3, len(tok), (5, 21))
    got = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": np.ones((5, 21), dtype=np.int64)})[0]
    assert np.abs(got - _logits(model, ids).numpy()).max() < 1e-4


def test_export_cli_writes_report(student, tmp_path):
    from typer.testing import CliRunner

    from distill.cli import app

    prompts = tmp_path / "held_out.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ["Q: 3 + 4 = ?", "hello there"]) + "\n")
    result = CliRunner().invoke(app, ["export", str(student), "--out", str(tmp_path / "out"), "--quantize",
                                      "int8", "--int8-scheme", "dynamic", "--prompts", str(prompts), "--gguf",
                                      "--gguf-type", "q8_0"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "export_report.json").read_text())
    assert report["int8"]["held_out"] == "given" and report["int8"]["parity"]["prompts"] == 2
    assert report["int8"]["scheme"] == "dynamic" and report["int8"]["parity"]["top1_agreement"] >= TOP1_BAR
    gguf = report["gguf"]
    assert gguf["type"] == "q8_0" and gguf["path"] == str(tmp_path / "out" / "out-q8_0.gguf")
    assert 0 < gguf["max_abs_logit_diff"] < 0.05 and "gguf" in result.output  # loaded back with transformers
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## GGUF" in card and "gguf_file='out-q8_0.gguf'" in card
    bad = CliRunner().invoke(app, ["export", str(tmp_path / "missing"), "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "no such model directory" in " ".join(bad.output.split())
    bad = CliRunner().invoke(app, ["export", str(student), "--out", str(tmp_path / "y"), "--gguf", "--gguf-type", "q4"])
    assert bad.exit_code == 2 and "--gguf-type 'q4'" in bad.output and not (tmp_path / "y").exists()
