"""Generalised Jensen-Shannon divergence (GKD, Agarwal et al. 2024), with TRL's convention for beta.

JSD_beta = beta * KL(p || m) + (1 - beta) * KL(q || m), m = beta * p + (1 - beta) * q, p = teacher,
q = student; as in TRL's `GKDTrainer.generalized_jsd_loss`, beta = 0 is defined as forward KL(p || q) and
beta = 1 as reverse KL(q || p) (the formula itself tends to 0 at both ends).
  student_logits: (batch, seq, vocab); teacher: (batch, seq, vocab_t) logits or SparseSignal; mask: (batch, seq).
"""

from __future__ import annotations

import torch

from distill.losses.common import check_fraction, divergence_loss, kl, log_mix
from distill.signals import SparseSignal


def _jsd(ls: torch.Tensor, lt: torch.Tensor, beta: float) -> torch.Tensor:
    if beta == 0.0:
        return kl(lt, ls)
    if beta == 1.0:
        return kl(ls, lt)
    lm = log_mix(lt, ls, beta)
    return beta * kl(lt, lm) + (1.0 - beta) * kl(ls, lm)


def jsd(
    student_logits: torch.Tensor,
    teacher: torch.Tensor | SparseSignal,
    mask: torch.Tensor | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    scale_temperature: bool = True,
    num_items_in_batch: int | torch.Tensor | None = None,
    sparse_mode: str = "tail",
    chunk_size: int | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Generalised JSD(beta); beta = 0.5 is the symmetric JSD, bounded by log 2 per token."""
    check_fraction("beta", beta)
    return divergence_loss(
        lambda ls, lt: _jsd(ls, lt, beta), student_logits, teacher, mask, temperature=temperature,
        scale_temperature=scale_temperature, num_items_in_batch=num_items_in_batch,
        sparse_mode=sparse_mode, chunk_size=chunk_size, vocab_size=vocab_size,
    )  # fmt: skip
