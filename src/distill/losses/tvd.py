"""Total variation distance, 0.5 * sum |p - q|: bounded in [0, 1] per token, robust to tiny probabilities.

student_logits: (batch, seq, vocab); teacher: (batch, seq, vocab_t) logits or SparseSignal; mask: (batch, seq).
"""

from __future__ import annotations

import torch

from distill.losses.common import divergence_loss
from distill.signals import SparseSignal


def _tvd(ls: torch.Tensor, lt: torch.Tensor) -> torch.Tensor:
    return 0.5 * (ls.exp() - lt.exp()).abs().sum(-1)


def tvd(
    student_logits: torch.Tensor,
    teacher: torch.Tensor | SparseSignal,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    scale_temperature: bool = True,
    num_items_in_batch: int | torch.Tensor | None = None,
    sparse_mode: str = "tail",
    chunk_size: int | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """TVD(teacher, student) per counted token (T^2-scaled like the other divergences when T != 1)."""
    return divergence_loss(
        _tvd, student_logits, teacher, mask, temperature=temperature, scale_temperature=scale_temperature,
        num_items_in_batch=num_items_in_batch, sparse_mode=sparse_mode, chunk_size=chunk_size,
        vocab_size=vocab_size,
    )  # fmt: skip
