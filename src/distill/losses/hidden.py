"""Hidden-state distillation: match student layers to teacher layers (MSE or cosine), as in DistilBERT/TinyBERT.

Takes hidden states, not logits: `hidden_state_loss(student_hidden, teacher_hidden, mask, ...)` with the
sequences HF models return under `output_hidden_states=True` (embeddings first, then one entry per layer).
  student_hidden: sequence of (batch, seq, d_s); teacher_hidden: sequence of (batch, seq, d_t);
  mask: (batch, seq) over the same positions as the hidden states (no causal shift). Returns a scalar.
When d_s != d_t a learned projection per mapped layer (`make_projections`) maps student to teacher width;
its parameters must be trained with the student (the trainer adds them to the optimiser).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from distill.losses.common import normalise, select_tokens, upcast
from distill.losses.registry import LossParams, register, split_kwargs

HIDDEN_KINDS = ("mse", "cosine")


class HiddenProjector(nn.Module):
    """Linear map from the student's hidden width to the teacher's, for one mapped layer pair."""

    def __init__(self, student_dim: int, teacher_dim: int):
        super().__init__()
        self.proj = nn.Linear(student_dim, teacher_dim, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden.to(self.proj.weight.dtype))


def make_projections(student_dim: int, teacher_dim: int, n: int) -> nn.ModuleList:
    """n projections (one per entry of the layer map) from student_dim to teacher_dim."""
    return nn.ModuleList(HiddenProjector(student_dim, teacher_dim) for _ in range(n))


def default_layer_map(n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """Student entry i -> teacher entry round(i * (n_teacher - 1) / (n_student - 1)): evenly spaced, first to
    first and last to last (with a single student entry: last to last)."""
    if n_student < 1 or n_teacher < 1:
        raise ValueError(
            f"need at least one hidden state on each side (student {n_student}, teacher {n_teacher})"
        )
    if n_student == 1:
        return [(0, n_teacher - 1)]
    return [(i, round(i * (n_teacher - 1) / (n_student - 1))) for i in range(n_student)]


def _pair_loss(hs: torch.Tensor, ht: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token loss (n,) between student (n, d) and teacher (n, d) states, in fp32."""
    hs, ht = upcast(hs), upcast(ht.detach())
    if kind == "mse":
        return (hs - ht).pow(2).mean(-1)
    return 1.0 - F.cosine_similarity(hs, ht, dim=-1, eps=1e-8)


def hidden_state_loss(
    student_hidden: Sequence[torch.Tensor],
    teacher_hidden: Sequence[torch.Tensor],
    mask: torch.Tensor | None = None,
    *,
    layer_map: Sequence[tuple[int, int]] | None = None,
    kind: str = "mse",
    projections: nn.ModuleList | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over mapped layer pairs of the per-token MSE (mean over width) or 1 - cosine, summed over counted
    tokens and divided by num_items_in_batch (or this call's count)."""
    if kind not in HIDDEN_KINDS:
        raise ValueError(f"kind must be one of {HIDDEN_KINDS}, got {kind!r}")
    pairs = (
        list(layer_map)
        if layer_map is not None
        else default_layer_map(len(student_hidden), len(teacher_hidden))
    )
    if not pairs:
        raise ValueError("layer_map is empty: map at least one (student layer, teacher layer) pair")
    if projections is not None and len(projections) != len(pairs):
        raise ValueError(f"{len(projections)} projections for {len(pairs)} layer pairs: need one per pair")
    b_idx = s_idx = None
    total = None
    for i, (si, ti) in enumerate(pairs):
        if not (
            -len(student_hidden) <= si < len(student_hidden)
            and -len(teacher_hidden) <= ti < len(teacher_hidden)
        ):
            raise ValueError(
                f"layer_map[{i}] = ({si}, {ti}) is out of range: {len(student_hidden)} student and "
                f"{len(teacher_hidden)} teacher hidden states"
            )
        hs, ht = student_hidden[si], teacher_hidden[ti]
        if hs.shape[:2] != ht.shape[:2]:
            raise ValueError(
                f"layer pair {i}: student {tuple(hs.shape)} and teacher {tuple(ht.shape)} differ in (batch, seq)"
            )
        if b_idx is None:
            b_idx, s_idx = select_tokens(mask, hs.shape)
            b_idx, s_idx = b_idx.to(hs.device), s_idx.to(hs.device)
        rows_s, rows_t = hs[b_idx, s_idx], ht[b_idx, s_idx]
        if projections is not None:
            rows_s = projections[i](rows_s)
        elif rows_s.shape[-1] != rows_t.shape[-1]:
            raise ValueError(
                f"layer pair {i}: student width {rows_s.shape[-1]} != teacher width {rows_t.shape[-1]}; pass "
                "projections=make_projections(student_dim, teacher_dim, len(layer_map)) and train them"
            )
        if rows_s.shape[-1] != rows_t.shape[-1]:
            raise ValueError(
                f"layer pair {i}: projection gives width {rows_s.shape[-1]}, teacher has {rows_t.shape[-1]}"
            )
        pair = _pair_loss(rows_s, rows_t, kind).sum()
        total = pair if total is None else total + pair
    return normalise(total / len(pairs), int(b_idx.numel()), num_items_in_batch)


class HiddenParams(LossParams):
    layer_map: list[tuple[int, int]] | None = Field(
        None, description="(student entry, teacher entry) pairs of hidden states; None: evenly spaced"
    )

    @field_validator("layer_map", mode="before")
    @classmethod
    def _pairs(cls, value: Any) -> Any:
        ok = value is None or (
            isinstance(value, (list, tuple)) and len(value) > 0
            and all(isinstance(p, (list, tuple)) and len(p) == 2 and all(type(x) is int for x in p) for p in value)
        )
        if not ok:
            raise ValueError("expected a non-empty list of [student, teacher] hidden-state index pairs such as "
                             f"[[0, 0], [2, 4]], got {value!r}")
        return value


def _hidden(kind: str):
    def loss(
        student_hidden: Sequence[torch.Tensor],
        teacher_hidden: Sequence[torch.Tensor],
        mask: torch.Tensor | None = None,
        *,
        num_items_in_batch: int | torch.Tensor | None = None,
        temperature: float = 1.0,
        scale_temperature: bool = True,
        sparse_mode: str = "tail",
        chunk_size: int | None = None,
        vocab_size: int | None = None,
        **kwargs,
    ) -> torch.Tensor:
        # temperature .. vocab_size: accepted so the trainer can call every registered loss alike; unused
        del temperature, scale_temperature, sparse_mode, chunk_size, vocab_size
        params, context = split_kwargs(entry, kwargs)
        return hidden_state_loss(
            student_hidden, teacher_hidden, mask, kind=kind, num_items_in_batch=num_items_in_batch, **params,
            **context,
        )  # fmt: skip

    name = f"hidden_{kind}"
    loss.__name__ = loss.__qualname__ = name
    loss.__doc__ = f"hidden_state_loss(..., kind={kind!r}); logit-loss keywords are accepted and ignored."
    entry = register(name, loss, student="hidden", teacher="hidden", signals=frozenset({"dense"}),
                     params=HiddenParams, context=("projections",), doc=loss.__doc__)  # fmt: skip
    return loss


hidden_mse = _hidden("mse")
hidden_cosine = _hidden("cosine")
