"""Generalised Jensen-Shannon divergence (GKD, Agarwal et al. 2024), with TRL's convention for beta.

JSD_beta = beta * KL(p || m) + (1 - beta) * KL(q || m), m = beta * p + (1 - beta) * q, p = teacher,
q = student; as in TRL's `GKDTrainer.generalized_jsd_loss`, beta = 0 is defined as forward KL(p || q) and
beta = 1 as reverse KL(q || p) (the formula itself tends to 0 at both ends).
  student_logits: (batch, seq, vocab); teacher: (batch, seq, vocab_t) logits or SparseSignal; mask: (batch, seq).
"""

from __future__ import annotations

import torch
from pydantic import Field

from distill.losses.common import divergence, kl, log_mix
from distill.losses.registry import LossParams


class JsdParams(LossParams):
    beta: float = Field(0.5, ge=0.0, le=1.0, description="0: forward KL, 0.5: symmetric JSD, 1: reverse KL")


def _jsd(ls: torch.Tensor, lt: torch.Tensor, beta: float) -> torch.Tensor:
    if beta == 0.0:
        return kl(lt, ls)
    if beta == 1.0:
        return kl(ls, lt)
    lm = log_mix(lt, ls, beta)
    return beta * kl(lt, lm) + (1.0 - beta) * kl(ls, lm)


@divergence("jsd", JsdParams)
def jsd(ls: torch.Tensor, lt: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalised JSD(beta); beta = 0.5 is the symmetric JSD, bounded by log 2 per token."""
    return _jsd(ls, lt, beta)
