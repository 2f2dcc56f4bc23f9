"""Training examples and batches: prompt + response token ids, completion-only labels, sparse teacher rows.

Labels are -100 on the prompt and on padding, and the response's EOS keeps its label even when the pad token
is the EOS token: masks come from labels, never from `input_ids != pad_token_id`.

Sparse top-k rows are stored per response token; in a batch they are placed at the *shifted* positions
(row j predicts response token j, i.e. logits position prompt_len + j - 1), so they line up with
`logits[:, :-1]` exactly as the losses expect.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from distill.data.encoding import encode_prompt


def left_pad(seqs: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (ids, attention mask) for generation: every row's last prompt token sits at the end."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids.to(device) if device is not None else ids, mask.to(device) if device is not None else mask


def encode_example(
    prompt_ids: list[int],
    response_ids: list[int],
    max_length: int,
    topk_ids: np.ndarray | None = None,
    topk_logprobs: np.ndarray | None = None,
    tail: np.ndarray | None = None,
) -> dict[str, Any] | None:
    """One training example; None when the prompt leaves no room for a single response token."""
    if len(prompt_ids) >= max_length:
        return None
    room = max_length - len(prompt_ids)
    response_ids = list(response_ids)[:room]
    if not response_ids:
        return None
    ex: dict[str, Any] = {
        "input_ids": list(prompt_ids) + response_ids,
        "labels": [-100] * len(prompt_ids) + response_ids,
        "prompt_len": len(prompt_ids),
    }
    if topk_ids is not None and topk_logprobs is not None:
        n = len(response_ids)
        if len(topk_ids) < n:
            raise ValueError(f"teacher top-k has {len(topk_ids)} rows for {n} response tokens")
        ex["topk_ids"] = np.array(topk_ids[:n], dtype=np.int64)  # copies: store arrays are read-only
        ex["topk_logprobs"] = np.array(topk_logprobs[:n], dtype=np.float32)
        if tail is not None:
            ex["topk_tail"] = np.array(tail[:n], dtype=np.float32)
    return ex


def tokenize_pair(
    tokenizer, prompt: str, response: str, max_length: int, rendered_with_template: bool = False
) -> dict[str, Any] | None:
    """Prompt and response text to an example, EOS appended to the response.

    The prompt follows the one prompt rule (`distill.data.encoding.encode_prompt`): the ids eval, generation
    and serving give the same text, one start token and never two.
    """
    prompt_ids = encode_prompt(tokenizer, prompt, rendered_with_template)
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    return encode_example(prompt_ids, response_ids, max_length)


@dataclass
class DistillCollator:
    """Right-pads a list of examples into tensors; sparse rows go to (batch, seq-1, k) at shifted positions."""

    pad_token_id: int

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(e["input_ids"]) for e in examples)
        b = len(examples)
        input_ids = torch.full((b, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((b, length), -100, dtype=torch.long)
        attention = torch.zeros((b, length), dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            input_ids[i, :n] = torch.tensor(e["input_ids"])
            labels[i, :n] = torch.tensor(e["labels"])
            attention[i, :n] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
        if any("topk_ids" in e for e in examples):
            if not all("topk_ids" in e for e in examples):
                raise ValueError("a batch mixes examples with and without teacher top-k rows")
            k = max(e["topk_ids"].shape[1] for e in examples)
            ids = torch.zeros((b, length - 1, k), dtype=torch.long)
            logprobs = torch.full((b, length - 1, k), float("-inf"), dtype=torch.float32)
            has_tail = all("topk_tail" in e for e in examples)
            tail = torch.zeros((b, length - 1), dtype=torch.float32) if has_tail else None
            for i, e in enumerate(examples):
                start = e["prompt_len"] - 1
                n, ki = e["topk_ids"].shape
                ids[i, start : start + n, :ki] = torch.from_numpy(e["topk_ids"])
                logprobs[i, start : start + n, :ki] = torch.from_numpy(e["topk_logprobs"])
                if tail is not None:
                    tail[i, start : start + n] = torch.from_numpy(e["topk_tail"])
            batch["topk_ids"], batch["topk_logprobs"] = ids, logprobs
            if tail is not None:
                batch["topk_tail"] = tail
        return batch
