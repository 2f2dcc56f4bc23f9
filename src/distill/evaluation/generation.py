"""Models loaded and run for evaluation: loading (LoRA adapters merged), prompt encoding and batched greedy
generation. The one place eval, cost and peak-memory measurement share, so their arrows point here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from distill.data.batching import left_pad
from distill.data.encoding import encode_prompt
from distill.modeling import cut_at_eos, eos_token_ids


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").exists()


def load_for_eval(
    path: str | Path, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False
):
    """(model, tokenizer) in eval mode; a LoRA adapter directory is loaded with peft and merged, so it is
    timed the way it would be served."""
    from distill.modeling import load_model, load_tokenizer, load_tokenizer_for, resolve_device, resolve_dtype

    if is_adapter(path):
        import json

        from peft import AutoPeftModelForCausalLM

        dev = resolve_device(device)
        base = json.loads((Path(path) / "adapter_config.json").read_text()).get("base_model_name_or_path")
        model = AutoPeftModelForCausalLM.from_pretrained(str(path), dtype=resolve_dtype(dtype, dev, base))
        model = model.merge_and_unload().to(dev)
        try:
            tok = load_tokenizer(path)
        except (OSError, ValueError):  # adapters often ship without a tokenizer: use the base model's
            tok = load_tokenizer(model.config._name_or_path)
    else:
        model = load_model(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        tok = load_tokenizer_for(path, trust_remote_code=trust_remote_code)
    model.eval()
    return model, tok


def vocabulary_mismatch(student_tok, teacher_tok) -> str | None:
    """None when both tokenizers map the same tokens to the same ids (compared by vocabulary, not
    vocab_size); else the first line of the reason."""
    from distill.losses import VocabMismatchError, check_tokenizers

    try:
        check_tokenizers(student_tok, teacher_tok)
    except VocabMismatchError as exc:
        return str(exc).splitlines()[0].rstrip(":")
    return None




@dataclass
class Generation:
    """Greedy outputs in prompt order: decoded text, prompt token ids and generated ids (cut after EOS)."""

    texts: list[str]
    prompt_ids: list[list[int]]
    output_ids: list[list[int]]


def encode_prompts(tokenizer, prompts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
    """Prompt ids by the one prompt rule (`distill.data.encoding.encode_prompt`); add_special_tokens=False
    means the prompts were rendered with the chat template (which wrote the special tokens)."""
    return [encode_prompt(tokenizer, p, rendered_with_template=not add_special_tokens) for p in prompts]


def generate_ids(model, tokenizer, batch: list[list[int]], max_new_tokens: int, fixed: bool):
    """Greedy new token ids of a left-padded batch; `fixed` forces exactly max_new_tokens (for timing)."""
    import torch
    from transformers import GenerationConfig

    # A fresh config: a checkpoint's sampling defaults (temperature, top_p) must not leak into greedy eval.
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens if fixed else None,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos_token_ids(model, tokenizer) or None,
        bos_token_id=tokenizer.bos_token_id,
    )
    ids, mask = left_pad(batch, tokenizer.pad_token_id, model.device)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)
    return out[:, ids.shape[1] :].tolist()


def generate_batch(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int,
    *,
    add_special_tokens: bool = True,
    label: str = "generating",
) -> Generation:
    """Batched greedy generation with left padding; prompts are sorted by length so batches pad little, and
    results come back in the original order."""
    from distill.progress import Progress

    prompt_ids = encode_prompts(tokenizer, prompts, add_special_tokens)
    order = sorted(range(len(prompts)), key=lambda i: len(prompt_ids[i]))
    outputs: list[list[int]] = [[] for _ in prompts]
    eos = set(eos_token_ids(model, tokenizer))
    with Progress(label, total=len(prompts), transient=True) as progress:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            for i, new in zip(
                idx, generate_ids(model, tokenizer, [prompt_ids[i] for i in idx], max_new_tokens, False)
            ):
                outputs[i] = cut_at_eos(new, eos)
            progress.update(len(idx), tokens=sum(len(outputs[i]) for i in idx))
    texts = [tokenizer.decode(o, skip_special_tokens=True) for o in outputs]
    return Generation(texts=texts, prompt_ids=prompt_ids, output_ids=outputs)
