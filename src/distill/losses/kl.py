"""KL-family divergences: forward KL, reverse KL and DistiLLM's skew variants.

Each is one per-token formula over log-probs registered with `common.divergence` (the shared rules: fp32,
masking, normalisation, sparse buckets, chunking, T^2, live in `common.divergence_loss`).
  student_logits: (batch, seq, vocab); teacher: (batch, seq, vocab_t) logits or SparseSignal;
  mask: (batch, seq), True = counted. Returns a scalar.
"""

from __future__ import annotations

import torch
from pydantic import Field

from distill.losses.common import dense_forward_kl, divergence, kl, log_mix
from distill.losses.registry import LossParams


class SkewParams(LossParams):
    alpha: float = Field(0.1, ge=0.0, le=1.0, description="share of the other side mixed in (0: plain KL)")


@divergence("forward_kl", dense=dense_forward_kl)
def forward_kl(ls: torch.Tensor, lt: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student): mean-seeking, the classic KD objective (Hinton et al.)."""
    return kl(lt, ls)


@divergence("reverse_kl")
def reverse_kl(ls: torch.Tensor, lt: torch.Tensor) -> torch.Tensor:
    """KL(student || teacher): mode-seeking (MiniLLM); infinite where the student has mass the teacher lacks."""
    return kl(ls, lt)


@divergence("skew_forward_kl", SkewParams)
def skew_forward_kl(ls: torch.Tensor, lt: torch.Tensor, alpha: float) -> torch.Tensor:
    """DistiLLM's skew KL: KL(p || alpha p + (1 - alpha) q), p = teacher, q = student; alpha = 0 is forward KL.

    Mixing some teacher into the student side bounds the loss and its gradient where q is near 0.
    """
    return kl(lt, log_mix(lt, ls, alpha))


@divergence("skew_reverse_kl", SkewParams)
def skew_reverse_kl(ls: torch.Tensor, lt: torch.Tensor, alpha: float) -> torch.Tensor:
    """DistiLLM's skew reverse KL: KL(q || alpha q + (1 - alpha) p); alpha = 0 is reverse KL."""
    return kl(ls, log_mix(ls, lt, alpha))
