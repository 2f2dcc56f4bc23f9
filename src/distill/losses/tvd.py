"""Total variation distance, 0.5 * sum |p - q|: bounded in [0, 1] per token, robust to tiny probabilities.

student_logits: (batch, seq, vocab); teacher: (batch, seq, vocab_t) logits or SparseSignal; mask: (batch, seq).
"""

from __future__ import annotations

import torch

from distill.losses.common import divergence


@divergence("tvd")
def tvd(ls: torch.Tensor, lt: torch.Tensor) -> torch.Tensor:
    """TVD(teacher, student) per counted token (T^2-scaled like the other divergences when T != 1)."""
    return 0.5 * (ls.exp() - lt.exp()).abs().sum(-1)
