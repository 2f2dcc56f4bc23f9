"""KL-family divergences: forward KL, reverse KL and DistiLLM's skew variants.

All take `fn(student_logits, teacher, mask=None, *, temperature, ...)`; the shared rules (fp32, masking,
normalisation, sparse buckets, chunking, T^2) live in `common.divergence_loss`.
  student_logits: (batch, seq, vocab); teacher: (batch, seq, vocab_t) logits or SparseSignal;
  mask: (batch, seq), True = counted. Returns a scalar.
"""

from __future__ import annotations

import torch

from distill.losses.common import check_fraction, divergence_loss, kl, log_mix
from distill.signals import SparseSignal

Teacher = torch.Tensor | SparseSignal


def forward_kl(
    student_logits: torch.Tensor,
    teacher: Teacher,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    scale_temperature: bool = True,
    num_items_in_batch: int | torch.Tensor | None = None,
    sparse_mode: str = "tail",
    chunk_size: int | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """KL(teacher || student): mean-seeking, the classic KD objective (Hinton et al.)."""
    return divergence_loss(
        lambda ls, lt: kl(lt, ls), student_logits, teacher, mask, temperature=temperature,
        scale_temperature=scale_temperature, num_items_in_batch=num_items_in_batch,
        sparse_mode=sparse_mode, chunk_size=chunk_size, vocab_size=vocab_size,
    )  # fmt: skip


def reverse_kl(
    student_logits: torch.Tensor,
    teacher: Teacher,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    scale_temperature: bool = True,
    num_items_in_batch: int | torch.Tensor | None = None,
    sparse_mode: str = "tail",
    chunk_size: int | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """KL(student || teacher): mode-seeking (MiniLLM); infinite where the student has mass the teacher lacks."""
    return divergence_loss(
        lambda ls, lt: kl(ls, lt), student_logits, teacher, mask, temperature=temperature,
        scale_temperature=scale_temperature, num_items_in_batch=num_items_in_batch,
        sparse_mode=sparse_mode, chunk_size=chunk_size, vocab_size=vocab_size,
    )  # fmt: skip


def skew_forward_kl(
    student_logits: torch.Tensor,
    teacher: Teacher,
    mask: torch.Tensor | None = None,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    scale_temperature: bool = True,
    num_items_in_batch: int | torch.Tensor | None = None,
    sparse_mode: str = "tail",
    chunk_size: int | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """DistiLLM's skew KL: KL(p || alpha p + (1 - alpha) q), p = teacher, q = student; alpha = 0 is forward KL.

    Mixing some teacher into the student side bounds the loss and its gradient where q is near 0.
    """
    check_fraction("alpha", alpha)
    return divergence_loss(
        lambda ls, lt: kl(lt, log_mix(lt, ls, alpha)), student_logits, teacher, mask,
        temperature=temperature, scale_temperature=scale_temperature, num_items_in_batch=num_items_in_batch,
        sparse_mode=sparse_mode, chunk_size=chunk_size, vocab_size=vocab_size,
    )  # fmt: skip


def skew_reverse_kl(
    student_logits: torch.Tensor,
    teacher: Teacher,
    mask: torch.Tensor | None = None,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    scale_temperature: bool = True,
    num_items_in_batch: int | torch.Tensor | None = None,
    sparse_mode: str = "tail",
    chunk_size: int | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """DistiLLM's skew reverse KL: KL(q || alpha q + (1 - alpha) p); alpha = 0 is reverse KL."""
    check_fraction("alpha", alpha)
    return divergence_loss(
        lambda ls, lt: kl(ls, log_mix(ls, lt, alpha)), student_logits, teacher, mask,
        temperature=temperature, scale_temperature=scale_temperature, num_items_in_batch=num_items_in_batch,
        sparse_mode=sparse_mode, chunk_size=chunk_size, vocab_size=vocab_size,
    )  # fmt: skip
