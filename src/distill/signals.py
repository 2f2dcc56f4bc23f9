"""The teacher signal: one type, two shapes, so losses never care where teacher numbers came from.

- dense: a float tensor of teacher logits, (batch, seq, vocab), from an online teacher forward;
- sparse: `SparseSignal` with the teacher's top-k token ids and logprobs per position, and the probability
  mass left outside the top-k ("tail"), from the offline store or an API that returns logprobs.

Positions are already aligned with the student logits they are compared to (the causal shift is done by
the caller: logits[:, :-1] predict labels[:, 1:]).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SparseSignal:
    """Top-k teacher distribution per position.

    ids: (batch, seq, k) long; logprobs: (batch, seq, k) float, log p of each id at temperature 1;
    tail: (batch, seq) float or None, the teacher's probability mass outside the top-k (1 - sum p_topk).
    Padding slots (positions shorter than k, or masked positions) carry logprob = -inf.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> SparseSignal:
        return SparseSignal(
            self.ids.to(device),
            self.logprobs.to(device),
            None if self.tail is None else self.tail.to(device),
        )

    @property
    def k(self) -> int:
        return int(self.ids.shape[-1])

    def __getitem__(self, index) -> SparseSignal:
        """Index the leading (batch, seq) dims, e.g. signal[:, a:b] for chunking."""
        return SparseSignal(
            self.ids[index], self.logprobs[index], None if self.tail is None else self.tail[index]
        )


TeacherSignal = torch.Tensor | SparseSignal


def is_sparse(signal: TeacherSignal) -> bool:
    return isinstance(signal, SparseSignal)
