"""int8 export with torchao, and the parity report that says how closely it follows full precision.

The int8 copy is a plain transformers checkpoint: transformers quantizes the saved full-precision model with a
`TorchAoConfig` (int8 per-row weights; scheme `dynamic` also quantizes activations on the fly per token), and
`save_pretrained` writes the quantization config into config.json, so `AutoModelForCausalLM.from_pretrained(
DIR/int8)` loads it anywhere torchao is installed. The output head stays in float (transformers leaves it unconverted): it is
cheap to keep and costs agreement when quantized.
"""

from __future__ import annotations

import json
from pathlib import Path

INT8_HINT = 'int8 export needs torchao: pip install "distill[int8]"'
SCHEMES = {  # --int8-scheme -> torchao config class: weights only (closest to fp) or dynamic activations too
    "weight-only": "Int8WeightOnlyConfig",
    "dynamic": "Int8DynamicActivationInt8WeightConfig",
}


def _torchao_config(scheme: str):
    if scheme not in SCHEMES:
        raise ValueError(f"int8 scheme '{scheme}': choose one of {', '.join(SCHEMES)}")
    try:
        import torchao.quantization as taq
    except ImportError as exc:
        raise ImportError(f"{INT8_HINT} ({exc})") from exc
    from transformers import TorchAoConfig

    return TorchAoConfig(getattr(taq, SCHEMES[scheme])())


def is_int8_dir(path: str | Path) -> bool:
    """A checkpoint whose config.json says torchao quantized it (what `save_int8` writes)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    quant = json.loads(config.read_text()).get("quantization_config") or {}
    return quant.get("quant_method") == "torchao"


def save_int8(fp_dir: str | Path, out_dir: str | Path, scheme: str = "weight-only") -> dict:
    """Quantize the full-precision checkpoint in `fp_dir` into `out_dir` (weights, config, tokenizer).
    Returns the quantized module names and the scheme."""
    import torch
    from transformers import AutoModelForCausalLM

    from distill.modeling import load_tokenizer_for

    qconfig = _torchao_config(scheme)
    model = AutoModelForCausalLM.from_pretrained(str(fp_dir), quantization_config=qconfig, dtype=torch.float32,
                                                 device_map="cpu", use_safetensors=True)
    out = Path(out_dir)
    model.save_pretrained(out)
    load_tokenizer_for(fp_dir).save_pretrained(out)
    names = [n for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and type(m.weight).__name__ != "Parameter"]
    return {"scheme": scheme, "torchao": _version("torchao"), "modules": names}


def load_int8(int8_dir: str | Path, device: str = "cpu"):
    """The int8 model, loaded the way any user would: plain `from_pretrained` (torchao installed)."""
    from transformers import AutoModelForCausalLM

    d = Path(int8_dir)
    if (d / "quantization.json").exists() and not is_int8_dir(d):
        raise ValueError(f"{d}: an int8 export from an older distill (torch.ao); export it again")
    try:
        import torchao  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"{INT8_HINT} ({exc})") from exc
    return AutoModelForCausalLM.from_pretrained(str(d), device_map=device).eval()


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


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
