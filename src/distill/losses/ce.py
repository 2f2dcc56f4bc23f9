"""Cross-entropy on the teacher's tokens: sequence-level KD (Kim & Rush 2016) and plain SFT on labels.

The target at each position is a token id: given directly (labels, -100 = ignore), or the teacher's argmax
(dense logits) or top-1 id (sparse signal).
  student_logits: (batch, seq, vocab); teacher: (batch, seq) long targets, (batch, seq, vocab_t) logits or
  SparseSignal; mask: (batch, seq). Returns a scalar.
"""

from __future__ import annotations

import torch
from pydantic import Field

from distill.losses.common import check_temperature, token_loss, upcast
from distill.losses.fused import LinearLogits, chunked_argmax
from distill.losses.registry import LogitSettings, LossParams, logit_loss
from distill.losses.vocab import common_vocab, student_vocab
from distill.signals import SparseSignal


class CrossEntropyParams(LossParams):
    ignore_index: int = Field(-100, description="target id of positions that are not counted")


def teacher_targets(
    student_logits: torch.Tensor | LinearLogits,
    teacher: torch.Tensor | LinearLogits | SparseSignal,
    vocab_size: int | None,
    ignore_index: int,
) -> torch.Tensor:
    """(batch, seq) long target ids from any teacher shape."""
    if isinstance(teacher, SparseSignal):
        lp = teacher.logprobs.detach()
        best = lp.argmax(-1, keepdim=True)
        ids = teacher.ids.gather(-1, best).squeeze(-1)
        return torch.where(lp.gather(-1, best).squeeze(-1) > float("-inf"), ids, ignore_index)
    if isinstance(teacher, LinearLogits) or teacher.is_floating_point():
        vocab = common_vocab(student_logits.shape[-1], teacher.shape[-1], vocab_size)
        if isinstance(teacher, LinearLogits):
            return chunked_argmax(teacher.cut(vocab).detach())
        return teacher[..., :vocab].detach().argmax(-1)
    return teacher


def _nll(rows: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    s = upcast(rows)
    if temperature != 1.0:
        s = s / temperature
    return torch.logsumexp(s, dim=-1) - s.gather(-1, target.unsqueeze(-1)).squeeze(-1)


@logit_loss("cross_entropy", params=CrossEntropyParams, teacher="labels", signals=frozenset({"dense", "sparse"}))
def cross_entropy(student_logits, teacher, mask, settings: LogitSettings, ignore_index: int) -> torch.Tensor:
    """Mean negative log-likelihood of the teacher's tokens under the student.

    Positions with target == ignore_index or mask False are not counted. temperature divides the student
    logits (scaled back by T^2 like the divergences); leave it at 1 for plain sequence-level KD.
    `sparse_mode` is accepted for the common call shape and unused: a hard target has no tail.
    `vocab_size` cuts padded vocabulary rows: they take no probability mass from the targets.
    """
    temperature = settings.temperature
    check_temperature(temperature)
    lead = tuple(student_logits.shape[:2])
    target = teacher_targets(student_logits, teacher, settings.vocab_size, ignore_index)
    if tuple(target.shape) != lead:
        raise ValueError(
            f"cross_entropy targets have shape {tuple(target.shape)}, expected (batch, seq) = {lead}"
        )
    vocab = student_vocab(student_logits, settings.vocab_size)
    counted = target != ignore_index
    if mask is not None:
        if tuple(mask.shape) != lead:
            raise ValueError(f"mask has shape {tuple(mask.shape)}, expected (batch, seq) = {lead}")
        counted = counted & mask.bool().to(counted.device)
    if bool(counted.any()):
        bad = target[counted]
        if int(bad.min()) < 0 or int(bad.max()) >= vocab:
            raise ValueError(
                f"cross_entropy target id {int(bad.max()) if int(bad.max()) >= vocab else int(bad.min())} is "
                f"outside the student vocabulary [0, {vocab}) (use {ignore_index} for ignored positions)"
            )
    safe_target = torch.where(counted, target, 0)
    return token_loss(lambda rows, tgt: _nll(rows, tgt, temperature), student_logits, (safe_target,), counted,
                      vocab, settings)  # fmt: skip
