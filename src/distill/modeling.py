"""Loading and saving models and tokenizers the same way in every stage (safetensors, no remote code)."""

from __future__ import annotations

from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


FLOAT_DTYPES = {torch.float32, torch.bfloat16, torch.float16}


def checkpoint_dtype(name_or_path: str | Path) -> torch.dtype | None:
    """The dtype a checkpoint's weights were saved in (config.json `dtype`, or `torch_dtype` before
    transformers 5); None when unknown (a .gguf file, a config without it, a hub id not in the cache)."""
    path = Path(str(name_or_path))
    if path.suffix == ".gguf":
        return None
    if path.is_dir():
        import json

        try:
            saved = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            return None
        name = saved.get("dtype") or saved.get("torch_dtype")
    else:
        try:
            from transformers import AutoConfig

            name = getattr(AutoConfig.from_pretrained(str(name_or_path)), "dtype", None)
        except (OSError, ValueError):
            return None
    found = name if isinstance(name, torch.dtype) else DTYPES.get(str(name))
    return found if found in FLOAT_DTYPES else None


def resolve_dtype(
    name: str | torch.dtype | None,
    device: str | torch.device | None = "cpu",
    checkpoint: str | Path | torch.dtype | None = None,
) -> torch.dtype:
    """The one meaning of `dtype: auto` (teacher, student, eval, export, serving): what the model *runs* in on
    `device` (where it will run, which is not always where it is loaded: training loads the teacher on CPU and
    the Trainer moves it).

    - On CPU: float32. bf16/fp16 matmuls are slow on most CPUs, and fp32 loses nothing.
    - On an accelerator: the dtype the checkpoint was saved in (`checkpoint`: a dtype, or a directory / hub id
      whose config says it), as transformers' own `dtype="auto"` does, so a bf16 teacher runs in bf16 and an
      fp32 student in fp32; bfloat16 when the checkpoint does not say (GGUF); float32 instead of bfloat16 on a
      GPU without bf16 support.
    An explicit name (float32 | bfloat16 | float16, or fp32 | bf16 | fp16) is taken as given.
    """
    if isinstance(name, torch.dtype):
        return name
    if name not in (None, "auto"):
        if name not in DTYPES:
            raise ValueError(f"unknown dtype '{name}'; expected auto, {', '.join(DTYPES)}")
        return DTYPES[name]
    dev = resolve_device(None if device is None else str(device))
    if dev.type == "cpu":
        return torch.float32
    saved = checkpoint_dtype(checkpoint) if isinstance(checkpoint, (str, Path)) else checkpoint
    saved = saved if saved in FLOAT_DTYPES else torch.bfloat16
    if saved == torch.bfloat16 and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float32
    return saved


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
    runs_on: str | None = None,
):
    """A causal LM from a hub id, a local directory (safetensors only) or a single .gguf file, on `device`, in
    `resolve_dtype(dtype)` for `runs_on` (the device it will run on when that is not where it is loaded)."""
    from transformers import AutoModelForCausalLM

    dev = resolve_device(device)
    path = Path(str(name_or_path))
    run_dev = dev if runs_on is None else resolve_device(runs_on)
    kwargs: dict = {"dtype": resolve_dtype(dtype, run_dev, name_or_path), "trust_remote_code": trust_remote_code}
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


def load_model_config(name_or_path: str | Path, trust_remote_code: bool = False):
    """The transformers config of a hub id, a model directory or a single .gguf file (read from its metadata:
    a .gguf has no config.json beside it, so `AutoConfig.from_pretrained(path)` alone fails on it)."""
    from transformers import AutoConfig

    path = Path(str(name_or_path))
    if path.suffix == ".gguf":
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoConfig.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)


def load_tokenizer_for(name_or_path: str | Path, trust_remote_code: bool = False):
    """Tokenizer beside a model directory or a .gguf file."""
    path = Path(str(name_or_path))
    if path.suffix == ".gguf":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        add_gguf_bos(tok, path)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok
    return load_tokenizer(path, trust_remote_code=trust_remote_code)


def gguf_add_bos(path: str | Path) -> int | None:
    """The BOS id a .gguf says to put in front of every text, as llama.cpp reads it: tokenizer.ggml.bos_token_id
    when tokenizer.ggml.add_bos_token is true (absent: true for a sentencepiece 'llama' vocabulary, else
    false); None when it adds none, or when the `gguf` package (extra `distill[gguf]`) is missing."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return None
    fields = GGUFReader(str(path)).fields

    def value(key: str):
        field = fields.get(key)
        return None if field is None else field.contents()

    add = value("tokenizer.ggml.add_bos_token")
    add = value("tokenizer.ggml.model") == "llama" if add is None else bool(add)
    bos = value("tokenizer.ggml.bos_token_id")
    return int(bos) if add and bos is not None else None


def add_gguf_bos(tokenizer, path: str | Path) -> None:
    """Make a tokenizer read from a .gguf add the BOS its file asks for. Some transformers versions build it
    with no bos_token, or a post-processor that ignores add_bos_token (issue 18), so every prompt lost its
    first token against the same model's HF directory; the file's own metadata decides, as in llama.cpp."""
    bos = gguf_add_bos(path)
    if bos is None or tokenizer("a")["input_ids"][:1] == [bos]:
        return
    tokenizer.bos_token = tokenizer.convert_ids_to_tokens(bos)
    tokenizer.add_bos_token = True  # rebuilds the post-processor (TokenizersBackend.update_post_processor)


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a generation: the `eos_token_id` (an int or a list) of the model's generation_config
    and config (chat models list several there, e.g. Llama-3's <|eot_id|> besides <|end_of_text|>, Gemma's
    <end_of_turn>, Phi-3's <|end|>) plus the tokenizer's EOS; sorted, no repeats. The one EOS rule of every
    place that generates or cuts at EOS (eval, the hf teacher, on-policy sampling, serving, the demo), so they
    all stop on the same tokens. `model` or `tokenizer` may be None."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        eos = getattr(source, "eos_token_id", None)
        if eos is not None:
            ids.update(int(i) for i in (eos if isinstance(eos, (list, tuple)) else [eos]))
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


def cut_at_eos(new: list[int], eos_ids) -> list[int]:
    """Generated ids up to and including the first EOS of any kind in `eos_ids` (what follows is padding)."""
    eos = set(eos_ids)
    cut = next((i for i, t in enumerate(new) if t in eos), None)
    return new if cut is None else new[: cut + 1]


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
