"""Training examples read lazily from the teacher store: a map-style Dataset, one row decoded per example.

`StoreExamples(path, ...)[i]` is the example `encode_example` / `tokenize_pair` made from the i-th kept row
of the store, the same examples (and order) the old in-memory path built from `read_store`, but what stays
in memory is an index (a few bytes per row), never the rows: top-k arrays are decoded when a batch asks
for them. Under torchrun / Accelerate the Trainer's DistributedSampler gives every rank its own indices,
so each rank decodes only its share; resume is exact because the sampler, not the data, holds the order.

A pre-pass decides which rows make an example (a prompt at least `max_length` long makes none) from the
list lengths alone (ids rows) or by tokenising the text (rows without ids), so `len()` is known up front.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.data.batching import encode_example, tokenize_pair
from distill.data.prompts import DataError
from distill.store.reader import StoreReader


class StoreExamples(torch.utils.data.Dataset):
    """The training examples of a store, in prompt order (duplicates dropped), built on access.

    same_tokenizer: the store's token ids are in the student's vocabulary (ids rows are used as they are);
    want_topk: offline logit distillation, so every row needs ids and top-k; tail: keep the tail mass.
    """

    def __init__(self, path: str | Path, tokenizer: Any, max_length: int, same_tokenizer: bool,
                 want_topk: bool, tail: bool = True, templated: bool = False):
        self.path, self.tokenizer, self.max_length = Path(path), tokenizer, max_length
        self.templated = templated  # text rows: prompts rendered with a chat template (the one prompt rule)
        if not self.path.exists():
            raise DataError(f"{path}: teacher store not found; run `distill generate` first or set train.store")
        base = StoreReader(self.path, columns=["index"])
        if not len(base):
            raise DataError(f"{path}: the teacher store has no finished rows")
        cols = ["prompt_ids", "response_ids"]
        self.want_topk = want_topk
        if want_topk:
            cols += ["topk_ids", "topk_logprobs"] + (["tail"] if tail else [])
        self.tail = tail
        self.ids_reader = base.with_columns(cols)
        self.text_reader = base.with_columns(["prompt", "response"])
        p_len, r_len = base.list_lengths("prompt_ids"), base.list_lengths("response_ids")
        ids_ok = (p_len >= 0) & (r_len >= 0) if same_tokenizer else np.zeros(len(base), bool)
        # top-k presence from `k` (a small column): reading topk_ids here would decode the whole store per rank
        usable = ids_ok & (base.values("k") > 0) if want_topk else ids_ok
        if want_topk and not usable.all():
            from distill.data.tokenmap import missing_ids_reason

            bad = int(np.argmin(usable))
            row = base.with_columns(None)[bad]
            raise DataError(f"{path}: {missing_ids_reason(row, tokenizer, same_tokenizer)}")
        keep = ids_ok & (p_len < max_length) & (r_len > 0)
        for i in np.flatnonzero(~ids_ok):  # text rows: tokenise once to know which fit
            row = self.text_reader[i]
            keep[i] = tokenize_pair(tokenizer, row["prompt"], row["response"], max_length, templated) is not None
        self.ids_ok = ids_ok
        self.rows = np.flatnonzero(keep)
        if not len(self.rows):
            raise DataError(f"{path}: every row's prompt is at least train.max_length={max_length} tokens; "
                            "raise train.max_length")

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict]:
        return (self[i] for i in range(len(self)))

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = int(self.rows[i])
        if not self.ids_ok[r]:
            row = self.text_reader[r]
            return tokenize_pair(self.tokenizer, row["prompt"], row["response"], self.max_length, self.templated)
        row = self.ids_reader[r]
        if self.want_topk and row.get("topk_ids") is None:  # k > 0 but top-k as strings only
            from distill.data.tokenmap import missing_ids_reason

            full = self.ids_reader.with_columns(None)[r]
            raise DataError(f"{self.path}: {missing_ids_reason(full, self.tokenizer, True)}")
        return encode_example(row["prompt_ids"], row["response_ids"], self.max_length,
                              row.get("topk_ids"), row.get("topk_logprobs"), row.get("tail"))


class MappedExamples(torch.utils.data.Dataset):
    """`fn(base[i])` for the examples where it is not None (a pre-pass finds them), made on access."""

    def __init__(self, base: Any, fn: Any):
        self.base, self.fn = base, fn
        self.rows = np.asarray([i for i in range(len(base)) if fn(base[i]) is not None], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.fn(self.base[int(self.rows[i])])
