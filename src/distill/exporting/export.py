"""`distill export MODEL_DIR --out DIR`: a deployable student: merged HF model + model card, optional int8
(dynamic quantization, with a parity report against full precision) and optional ONNX (checked against
onnxruntime). Everything measured goes to DIR/export_report.json and into DIR/README.md.

Layout of DIR:  config.json, model.safetensors, tokenizer files, README.md, export_report.json
                int8/  config.json, model.int8.safetensors, quantization.json, tokenizer (load_int8(DIR/int8))
                onnx/  model.onnx (inputs input_ids, attention_mask -> logits), tokenizer

Run as: `distill export runs/demo/students/small --out dist/small --quantize int8 --onnx`
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

# torch, transformers and peft are imported inside the functions: `import distill` stays light.

INT8_WEIGHTS = "model.int8.safetensors"
ONNX_HINT = 'ONNX export needs onnx and onnxruntime: pip install "distill[onnx]"'
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
    """(model, tokenizer, info) for a full HF model dir, a LoRA adapter dir merged into its base, or an int8
    export dir (`DIR/int8`, loaded with load_int8, CPU)."""
    from distill.modeling import load_model, load_tokenizer_for

    path = Path(str(model_dir))
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model directory")
    if (path / "quantization.json").exists():  # an int8 export: CPU only (torch.ao dynamic kernels)
        return load_int8(path), load_tokenizer_for(path), {"source": str(path), "adapter": None, "int8": True}
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


# ---- int8 ------------------------------------------------------------------------------------------
def _dynamic_linear():
    from torch.ao.nn.quantized.dynamic import Linear

    return Linear


def quantize_int8(model, skip: tuple[str, ...] = ("lm_head",)):
    """Dynamic int8 (per-channel weights, activations quantized on the fly) on every nn.Linear except
    `skip` (the output head is kept in float: it is cheap to keep and costs agreement when quantized)."""
    import torch
    import torch.ao.quantization as tq

    names = [n for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and not any(n == s or n.endswith("." + s) for s in skip)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao eager quantization is deprecated in favour of torchao
        qmodel = tq.quantize_dynamic(model.float().cpu(), {n: tq.per_channel_dynamic_qconfig for n in names},
                                     dtype=torch.qint8, inplace=False)
    return qmodel.eval(), names


def save_int8(qmodel, names: list[str], tokenizer, out_dir: str | Path) -> Path:
    """Plain tensors in safetensors (no pickle): int8 weights + per-channel scales/zero points."""
    import torch
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    Linear = _dynamic_linear()
    tensors: dict[str, torch.Tensor] = {}
    qnames = set()
    for name, mod in qmodel.named_modules():
        if isinstance(mod, Linear):
            w, b = mod._weight_bias()
            qnames.add(name)
            tensors[f"{name}.weight"] = w.int_repr().contiguous()
            tensors[f"{name}.weight_scale"] = w.q_per_channel_scales().float().contiguous()
            tensors[f"{name}.weight_zero_point"] = w.q_per_channel_zero_points().to(torch.int32).contiguous()
            if b is not None:
                tensors[f"{name}.bias"] = b.detach().contiguous()
    for key, value in qmodel.state_dict().items():
        quantized_part = key.rsplit(".", 1)[0] in qnames or "._packed_params" in key
        if isinstance(value, torch.Tensor) and not value.is_quantized and not quantized_part:
            tensors.setdefault(key, value.detach().contiguous().clone())
    save_file(tensors, str(out / INT8_WEIGHTS), metadata={"format": "distill-int8-dynamic"})
    qmodel.config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    (out / "quantization.json").write_text(json.dumps(
        {"scheme": "torch.ao dynamic int8, per-channel symmetric weights (axis 0)", "modules": sorted(qnames),
         "torch": torch.__version__, "load_with": "distill.exporting.export.load_int8(dir)"}, indent=2))
    return out


def load_int8(int8_dir: str | Path):
    """Rebuild the architecture from config.json, quantize the same modules, then load the int8 tensors."""
    import torch
    import torch.ao.quantization as tq
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    d = Path(int8_dir)
    meta = json.loads((d / "quantization.json").read_text())
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(d), dtype=torch.float32).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tq.quantize_dynamic(model, {n: tq.per_channel_dynamic_qconfig for n in meta["modules"]},
                                    dtype=torch.qint8, inplace=True)
    tensors = load_file(str(d / INT8_WEIGHTS))
    modules = dict(model.named_modules())
    for name in meta["modules"]:
        w = torch._make_per_channel_quantized_tensor(
            tensors.pop(f"{name}.weight"), tensors.pop(f"{name}.weight_scale").double(),
            tensors.pop(f"{name}.weight_zero_point").long(), 0)
        modules[name].set_weight_bias(w, tensors.pop(f"{name}.bias", None))
    # the float rest, tensor by tensor (load_state_dict would ask the quantized modules for their keys)
    expected = {k for k, v in model.state_dict().items() if isinstance(v, torch.Tensor) and not v.is_quantized
                and k.rsplit(".", 1)[0] not in meta["modules"]}
    if set(tensors) != expected:
        raise ValueError(f"{d / INT8_WEIGHTS}: tensors do not match the architecture in config.json "
                         f"(missing {sorted(expected - set(tensors))[:5]}, unexpected {sorted(set(tensors) - expected)[:5]})")
    with torch.no_grad():
        for key, value in tensors.items():
            owner, attr = key.rsplit(".", 1)
            getattr(modules[owner], attr).copy_(value)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    return model


# ---- parity ----------------------------------------------------------------------------------------
def parity(reference, candidate, tokenizer, prompts: list[str], max_new_tokens: int = 16) -> dict:
    """How closely `candidate` (e.g. int8) follows `reference` (full precision) on `prompts`.

    greedy_token_agreement: position-wise equality of the two free-running greedy continuations;
    top1_agreement: teacher-forced on the reference continuation, candidate argmax == reference token;
    mean_kl: KL(reference || candidate) per continuation position; greedy_exact_match: whole sequences equal.
    """
    import torch

    with torch.no_grad():
        return _parity(reference, candidate, tokenizer, prompts, max_new_tokens)


def _parity(reference, candidate, tokenizer, prompts: list[str], max_new_tokens: int) -> dict:
    import torch

    same = total = top1 = exact = 0
    kl_sum, max_diff = 0.0, 0.0
    for prompt in prompts:
        ids = torch.tensor([tokenizer(prompt).input_ids or [tokenizer.bos_token_id or 0]])
        ref = _greedy(reference, ids, max_new_tokens)
        cand = _greedy(candidate, ids, max_new_tokens)
        same += int((ref == cand).sum())
        exact += int(torch.equal(ref, cand))
        total += ref.numel()
        full = torch.cat([ids, ref[None]], dim=-1)
        n = ids.shape[1]
        lr = reference(input_ids=full).logits[0, n - 1:-1].float()
        lc = candidate(input_ids=full).logits[0, n - 1:-1].float()
        top1 += int((lc.argmax(-1) == ref).sum())
        lpr, lpc = lr.log_softmax(-1), lc.log_softmax(-1)
        kl_sum += float((lpr.exp() * (lpr - lpc)).sum())
        max_diff = max(max_diff, float((lr - lc).abs().max()))
    return {"prompts": len(prompts), "tokens": total, "greedy_token_agreement": same / max(total, 1),
            "top1_agreement": top1 / max(total, 1), "greedy_exact_match": exact / max(len(prompts), 1),
            "mean_kl": kl_sum / max(total, 1), "max_abs_logit_diff": max_diff}


def _greedy(model, ids, n: int):
    """n greedy tokens (EOS not special: both models are compared on the same number of positions)."""
    import torch

    from distill.serving.engine import cache_kwarg, cache_of

    out, past, step, kw = [], None, ids, cache_kwarg(model)
    for _ in range(n):
        res = model(input_ids=step, use_cache=True, **{kw: past})
        past = cache_of(res)
        step = res.logits[:, -1].argmax(-1, keepdim=True)
        out.append(step)
    return torch.cat(out, dim=-1)[0]


# ---- ONNX ------------------------------------------------------------------------------------------
def _logits_only(model):
    """(input_ids, attention_mask) -> logits, no cache: the graph ONNX runtimes can run as is."""
    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    return LogitsOnly(model).eval()


def export_onnx(model, tokenizer, out_dir: str | Path, atol: float = 1e-3) -> dict:
    """torch.onnx (dynamo) export with dynamic batch and sequence axes, then onnxruntime vs torch on a
    batch of another shape with left padding; the max abs diff over attended positions is reported."""
    try:
        import onnx  # noqa: F401
        import onnxruntime as ort
        import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter needs it)
    except ImportError as exc:
        raise ImportError(f"{ONNX_HINT} ({exc})") from exc
    import torch
    from torch.export import Dim

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.onnx"
    wrapper = _logits_only(model.float().cpu().eval())
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (2, 8))
    batch, seq = Dim("batch"), Dim("seq")
    large = sum(p.numel() for p in model.parameters()) * 4 > 1_500_000_000  # protobuf's 2 GB cap
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (ids, torch.ones_like(ids)), str(path), dynamo=True,
                          input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
                          external_data=large)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    gen = torch.Generator().manual_seed(0)
    test_ids = torch.randint(3, vocab, (3, 13), generator=gen)
    test_mask = torch.ones_like(test_ids)
    test_mask[0, :5] = 0  # a left-padded row
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"input_ids": test_ids.numpy(), "attention_mask": test_mask.numpy()})[0]
    with torch.no_grad():
        want = wrapper(test_ids, test_mask).numpy()
    attended = test_mask.numpy().astype(bool)
    diff = float(abs(got - want)[attended].max())
    return {"path": str(path), "bytes": _bytes(out, "*.onnx*"), "check_shape": list(test_ids.shape),
            "max_abs_diff": diff, "atol": atol, "ok": diff <= atol}


# ---- the command -----------------------------------------------------------------------------------
def export(model_dir: str | Path, out_dir: str | Path, quantize: str | None = None, onnx: bool = False,
           prompts: list[str] | str | Path | None = None, max_new_tokens: int = 16, limit: int = 32) -> dict:
    """Write the export (see module docstring) and return the report that is saved beside it.

    `prompts`: held-out prompts for the int8 parity report, as texts or a prompts file (JSONL, Parquet,
    CSV: rendered with the student's chat template like every other stage); default: a built-in set."""
    from distill.modeling import count_parameters, save_model

    if quantize not in (None, "int8"):
        raise ValueError(f"--quantize '{quantize}': only 'int8' is supported")
    t0 = time.time()
    model, tokenizer, info = load_student(model_dir, dtype="float32", device="cpu")
    out = save_model(model, tokenizer, out_dir)
    report: dict = {"source": info, "architecture": type(model).__name__,
                    "parameters": count_parameters(model), "dtype": str(next(model.parameters()).dtype),
                    "bytes": _bytes(out, "*.safetensors")}
    if quantize == "int8":
        qmodel, names = quantize_int8(model)
        save_int8(qmodel, names, tokenizer, out / "int8")
        reloaded = load_int8(out / "int8")  # measure what a user will load, not the in-memory object
        if isinstance(prompts, (str, Path)):
            from distill.data.prompts import load_records, render_prompt

            prompts = [render_prompt(r, tokenizer) for r in load_records(prompts, limit=limit)]
        held_out = prompts or HELD_OUT_PROMPTS
        report["int8"] = {"bytes": _bytes(out / "int8", "*.safetensors"), "quantized_modules": len(names),
                          "parity": parity(model, reloaded, tokenizer, held_out, max_new_tokens),
                          "held_out": "given" if prompts else "built-in"}
        report["int8"]["size_ratio"] = report["int8"]["bytes"] / max(report["bytes"], 1)
    if onnx:
        report["onnx"] = export_onnx(model, tokenizer, out / "onnx")
    report["seconds"] = round(time.time() - t0, 2)
    (out / "export_report.json").write_text(json.dumps(report, indent=2))
    card = model_card(report, Path(out).name)
    source_card = Path(info["adapter"] or info["source"]) / "README.md"
    if source_card.is_file():  # e.g. the card `distill report` wrote with the eval figures: keep it
        card += "\n## From the training run\n\n" + ("\n" + source_card.read_text()).replace("\n#", "\n##").lstrip("\n")
    (out / "README.md").write_text(card)
    return report


def _bytes(directory: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in Path(directory).glob(pattern) if p.is_file())


def model_card(report: dict, name: str) -> str:
    """README.md: what the model is, where it came from, its size, and how to load each artifact."""
    src = report["source"]
    origin = f"LoRA adapter `{src['adapter']}` merged into `{src['base']}`" if src.get("adapter") else f"`{src['source']}`"
    lines = [
        f"# {name}", "", "A student model distilled and exported with distill (`distill export`).", "",
        "| | |", "|---|---|",
        f"| source | {origin} |", f"| architecture | {report['architecture']} |",
        f"| parameters | {report['parameters']:,} |", f"| dtype | {report['dtype']} |",
        f"| size (safetensors) | {_mb(report['bytes'])} |", "",
        "## Load", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f"model = AutoModelForCausalLM.from_pretrained('{name}')",
        f"tokenizer = AutoTokenizer.from_pretrained('{name}')", "```", "",
        f"Serve it: `distill serve {name}` (OpenAI-compatible API).",
    ]
    if "int8" in report:
        q, p = report["int8"], report["int8"]["parity"]
        lines += [
            "", "## int8 (dynamic quantization, CPU)", "",
            (f"`int8/`: {_mb(q['bytes'])} ({q['size_ratio']:.0%} of full precision), {q['quantized_modules']} "
             "linear layers with int8 per-channel weights; activations are quantized on the fly."), "",
            "```python", "from distill.exporting.export import load_int8", f"model = load_int8('{name}/int8')", "```", "",
            (f"Parity with full precision on {p['prompts']} {q['held_out']} held-out prompts ({p['tokens']} "
             f"tokens): greedy-token agreement {p['greedy_token_agreement']:.1%}, top-1 agreement "
             f"{p['top1_agreement']:.1%}, mean KL {p['mean_kl']:.2e}."),
        ]
    if "onnx" in report:
        o = report["onnx"]
        lines += [
            "", "## ONNX", "",
            (f"`onnx/model.onnx` ({_mb(o['bytes'])}): inputs `input_ids`, `attention_mask` (int64, dynamic "
             f"batch and sequence), output `logits`. onnxruntime vs PyTorch max abs diff {o['max_abs_diff']:.2e}."),
            "",
            "```python", "import onnxruntime as ort",
            f"session = ort.InferenceSession('{name}/onnx/model.onnx')",
            "logits = session.run(['logits'], {'input_ids': ids, 'attention_mask': mask})[0]", "```",
        ]
    return "\n".join(lines) + "\n"


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"
