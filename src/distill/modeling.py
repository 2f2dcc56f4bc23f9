"""Loading and saving models and tokenizers the same way in every stage (safetensors, no remote code)."""

from __future__ import annotations

from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(name: str | torch.dtype | None, device: str = "cpu") -> torch.dtype:
    """'auto' means float32 on CPU (bf16 matmuls are slow there) and bfloat16 on CUDA when supported."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        if str(device).startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype '{name}'; expected auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str | None = "auto") -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_tokenizer(name_or_path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        # pad == eos is the common case; the loss masks come from labels, so EOS still counts.
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def load_model(
    name_or_path: str | Path,
    dtype: str | torch.dtype | None = "auto",
    device: str | None = "auto",
    trust_remote_code: bool = False,
):
    """A causal LM from a hub id, a local directory (safetensors only) or a single .gguf file."""
    from transformers import AutoModelForCausalLM

    dev = resolve_device(device)
    path = Path(str(name_or_path))
    kwargs: dict = {"dtype": resolve_dtype(dtype, str(dev)), "trust_remote_code": trust_remote_code}
    if path.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, **kwargs)
    else:
        if path.is_dir() and not any(path.glob("*.safetensors")) and (
            any(path.glob("*.bin")) or any(path.glob("*.pt"))
        ):
            raise ValueError(
                f"{path}: only pickle weights (*.bin) found; distill loads safetensors only. Convert with "
                "`model.save_pretrained(dir, safe_serialization=True)` from a trusted environment."
            )
        model = AutoModelForCausalLM.from_pretrained(str(path), use_safetensors=True, **kwargs)
    return model.to(dev)


def load_tokenizer_for(name_or_path: str | Path, trust_remote_code: bool = False):
    """Tokenizer beside a model directory or a .gguf file."""
    path = Path(str(name_or_path))
    if path.suffix == ".gguf":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok
    return load_tokenizer(path, trust_remote_code=trust_remote_code)


def eos_token_ids(tokenizer, *configs) -> list[int]:
    """Every id that ends a generation: the `eos_token_id` (an int or a list) of each config given (pass the
    model's generation_config and config: chat models often list several, e.g. <|eot_id|> besides
    <|end_of_text|>) plus the tokenizer's EOS; sorted, no repeats. The one collector of training (on-policy
    sampling), the hf teacher and the serving engine, so they stop on the same tokens."""
    ids: set[int] = set()
    for source in configs:
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if eos is not None:
            ids.update(int(i) for i in (eos if isinstance(eos, (list, tuple)) else [eos]))
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def save_model(model, tokenizer, out_dir: str | Path) -> Path:
    """HF format with safetensors weights and the tokenizer beside them."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
