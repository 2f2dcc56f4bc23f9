"""`distill export MODEL_DIR --out DIR`: a deployable student: merged HF model + model card (Hub metadata),
optional int8 (torchao, with a parity report against full precision), GGUF (llama.cpp; loaded back and compared)
and ONNX (checked against onnxruntime). Everything measured goes to DIR/export_report.json and DIR/README.md.

Layout of DIR:  config.json, model.safetensors, tokenizer files, README.md, export_report.json
                int8/  a transformers checkpoint quantized by torchao (`from_pretrained(DIR/int8)`)
                NAME-f16.gguf / NAME-q8_0.gguf  weights + tokenizer for llama.cpp, Ollama, LM Studio
                onnx/  model.onnx (inputs input_ids, attention_mask -> logits), tokenizer

Run as: `distill export runs/demo/students/small --out dist/small --quantize int8 --gguf --onnx`
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from distill.exporting.gguf import GGUF_TYPES
from distill.exporting.int8 import SCHEMES, is_int8_dir, load_int8, parity, save_int8
from distill.exporting.onnx import export_onnx

# torch, transformers and peft are imported inside the functions: `import distill` stays light.
__all__ = ["HELD_OUT_PROMPTS", "export", "export_onnx", "load_int8", "load_student", "model_card", "parity"]
HELD_OUT_PROMPTS = [  # a small built-in held-out set when the user gives none
    "Q: Tom has 12 apples. He eats 5. How many apples now? A:",
    "The capital of France is",
    "Distillation trains a small student to",
    "def fibonacci(n):",
    "user: hello assistant:",
    "Once upon a time, there was a",
    "Q: What is 7 times 8? A:",
    "The quick brown fox",
]


# ---- loading ---------------------------------------------------------------------------------------
def load_student(model_dir: str | Path, dtype: str = "auto", device: str = "auto"):
    """(model, tokenizer, info) for a full HF model dir (a torchao int8 export too: `DIR/int8`), a .gguf file,
    or a LoRA adapter dir merged into its base."""
    from distill.modeling import load_model, load_tokenizer_for

    path = Path(str(model_dir))
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model directory")
    if is_int8_dir(path) or (path / "quantization.json").exists():  # int8 export (an old one: a clear error)
        dev = "cpu" if device == "auto" else device
        return load_int8(path, dev), load_tokenizer_for(path), {"source": str(path), "adapter": None, "int8": True}
    adapter_cfg = path / "adapter_config.json"
    if not adapter_cfg.exists():
        model = load_model(path, dtype=dtype, device=device)
        return model.eval(), load_tokenizer_for(path), {"source": str(path), "adapter": None}
    from peft import PeftModel

    base = json.loads(adapter_cfg.read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{adapter_cfg}: field 'base_model_name_or_path' is missing; cannot find the base model")
    base_path = Path(base) if Path(base).is_absolute() or Path(base).exists() else (path / base)
    base_ref = base_path if base_path.exists() else base
    model = PeftModel.from_pretrained(load_model(base_ref, dtype=dtype, device=device), str(path))
    model = model.merge_and_unload()
    has_tok = any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = load_tokenizer_for(path if has_tok else base_ref)
    return model.eval(), tokenizer, {"source": str(path), "adapter": str(path), "base": str(base_ref)}


# ---- the command ---------------------------------------------------------------------------------
def export(model_dir: str | Path, out_dir: str | Path, quantize: str | None = None, onnx: bool = False,
           prompts: list[str] | str | Path | None = None, max_new_tokens: int = 16, limit: int = 32,
           gguf: bool = False, gguf_type: str = "f16", int8_scheme: str = "weight-only") -> dict:
    """Write the export (see module docstring) and return the report that is saved beside it.

    `prompts`: held-out prompts for the int8 parity report, as texts or a prompts file (JSONL, Parquet,
    CSV: rendered with the student's chat template like every other stage); default: a built-in set."""
    from distill.modeling import count_parameters, save_model

    if quantize not in (None, "int8"):
        raise ValueError(f"--quantize '{quantize}': only 'int8' is supported")
    if gguf and gguf_type not in GGUF_TYPES:  # checked before any work is done
        raise ValueError(f"--gguf-type '{gguf_type}': choose one of {', '.join(GGUF_TYPES)}")
    if quantize and int8_scheme not in SCHEMES:
        raise ValueError(f"--int8-scheme '{int8_scheme}': choose one of {', '.join(SCHEMES)}")
    _check_out_dir(Path(out_dir))
    t0 = time.time()
    model, tokenizer, info = load_student(model_dir, dtype="float32", device="cpu")
    out = save_model(model, tokenizer, out_dir)
    report: dict = {"source": info, "architecture": type(model).__name__,
                    "parameters": count_parameters(model), "dtype": str(next(model.parameters()).dtype),
                    "bytes": _bytes(out, "*.safetensors"),
                    "prompt_format": _copy_prompt_format(Path(info["adapter"] or info["source"]), out)}
    if quantize == "int8":
        saved = save_int8(out, out / "int8", scheme=int8_scheme)
        reloaded = load_int8(out / "int8")  # measure what a user will load, not the in-memory object
        if isinstance(prompts, (str, Path)):
            from distill.data.prompts import load_records, render_prompt

            prompts = [render_prompt(r, tokenizer) for r in load_records(prompts, limit=limit)]
        held_out = prompts or HELD_OUT_PROMPTS
        report["int8"] = {"bytes": _bytes(out / "int8", "*.safetensors"), "quantized_modules": len(saved["modules"]),
                          "scheme": saved["scheme"], "torchao": saved["torchao"],
                          "parity": parity(model, reloaded, tokenizer, held_out, max_new_tokens),
                          "held_out": "given" if prompts else "built-in"}
        report["int8"]["size_ratio"] = report["int8"]["bytes"] / max(report["bytes"], 1)
    if gguf:
        report["gguf"] = _export_gguf(model, tokenizer, out, gguf_type)
    if onnx:
        report["onnx"] = export_onnx(model, tokenizer, out / "onnx")
    report["seconds"] = round(time.time() - t0, 2)
    (out / "export_report.json").write_text(json.dumps(report, indent=2))
    source_card = Path(info["adapter"] or info["source"]) / "README.md"
    model_card(report, Path(out).name, source_card).save(out / "README.md")
    return report


def _check_out_dir(out: Path) -> None:
    """--out must be a directory, or creatable as one: an existing file there (or above it) is refused before the
    student is loaded, instead of a FileExistsError traceback from the first write."""
    for folder in (out, *out.parents):
        if folder.exists() or folder.is_symlink():
            if not folder.is_dir():
                what = "is an existing file" if folder == out else f"is inside {folder}, an existing file"
                raise ValueError(f"--out {out}: {what}, not a directory; give a directory path (it is created)")
            return


def _copy_prompt_format(source: Path, out: Path) -> bool:
    """Copy the student's prompt_format.json (how `distill train` rendered its prompts) into the export, so
    `distill serve OUT` renders chat requests as in training, not with the bare chat template."""
    from distill.data.prompt_format import PROMPT_FORMAT_FILE

    if not (source / PROMPT_FORMAT_FILE).is_file():
        return False
    shutil.copyfile(source / PROMPT_FORMAT_FILE, Path(out) / PROMPT_FORMAT_FILE)
    return True


def _export_gguf(model, tokenizer, out: Path, gguf_type: str) -> dict:
    """Write OUT/NAME-TYPE.gguf, then load it back with plain transformers and compare logits."""
    import torch

    from distill.exporting.gguf import export_gguf, load_gguf

    result = export_gguf(model, tokenizer, out / f"{out.name}-{gguf_type}.gguf", gguf_type, name=out.name)
    loaded, _ = load_gguf(result["path"])
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(tokenizer), (2, 12), generator=gen)
    with torch.no_grad():
        diff = (loaded(input_ids=ids).logits - model(input_ids=ids).logits).abs().max()
    result["max_abs_logit_diff"] = float(diff)
    return result


def _bytes(directory: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in Path(directory).glob(pattern) if p.is_file())


def model_card(report: dict, name: str, source_card: Path | None = None):
    """README.md (a huggingface_hub ModelCard) for the export: see distill.reporting.card.export_card."""
    from distill.reporting.card import export_card

    return export_card(report, name, source_card)
