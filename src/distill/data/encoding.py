"""The one tokenisation rule for prompts, shared by every stage (training, generation, eval, serving).

A prompt rendered with a chat template is tokenized as written: the template already wrote the special tokens
(BOS), as `apply_chat_template(tokenize=True)` does. A plain prompt gets the tokenizer's own leading special
tokens (its post-processor's BOS), unless the text already starts with them. So no prompt ever gets two
start tokens, and the ids a model was trained on are the ids it is evaluated, served and scored on.
"""

from __future__ import annotations

from typing import Any


def uses_template(tokenizer: Any, data_cfg: Any) -> bool:
    """Whether `render_prompt` renders with the tokenizer's chat template under this data config."""
    return bool(
        getattr(data_cfg, "chat_template", True) and tokenizer is not None and getattr(tokenizer, "chat_template", None)
    )


def special_prefix(tokenizer: Any) -> list[int]:
    """The special ids the tokenizer puts in front of a text by default (e.g. [BOS]; [] for GPT-2 or Qwen)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            head = list(full[:i])
            return head if all(t in specials for t in head) else []
    return []


def start_token(tokenizer: Any) -> int | None:
    """The id that opens an empty prompt: BOS, else EOS."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode_prompt(tokenizer: Any, text: str, rendered_with_template: bool) -> list[int]:
    """Prompt token ids by the rule above. An empty prompt still gets a start token (BOS, else EOS): without
    one the first response token would have no position predicting it."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []
    if not rendered_with_template:
        head = special_prefix(tokenizer)
        if head and ids[: len(head)] != head:
            ids = head + ids
    if not ids:
        start = start_token(tokenizer)
        ids = [start] if start is not None else []
    return ids
