"""Vocabulary alignment between teacher and student: cut padded rows, refuse different tokenizers.

Models often pad their embedding matrix past the tokenizer (Qwen2: 151,936 tokenizer ids, 152,064 rows), so
teacher and student logits can differ in width while meaning the same tokens: those trailing rows are cut
explicitly. Different tokenizers are another matter: their ids mean different strings, so comparing logits
row by row is silently wrong; `check_tokenizers` compares the vocabularies themselves and refuses.
"""

from __future__ import annotations

from typing import Any

import torch

from distill.signals import SparseSignal


class VocabMismatchError(ValueError):
    """Teacher and student tokenizers map tokens to ids differently."""


def align_vocab(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, vocab_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut the vocabulary rows one model pads its embedding with (e.g. 152,064 vs the tokenizer's 151,936).

    student_logits: (..., vocab_s), teacher_logits: (..., vocab_t). Returns views cut to `vocab_size` (the true
    tokenizer size, when given) or else to min(vocab_s, vocab_t). It only removes trailing padding rows: it
    cannot make different tokenizers comparable (see `check_tokenizers`).
    """
    vocab_size = common_vocab(student_logits.shape[-1], teacher_logits.shape[-1], vocab_size)
    return student_logits[..., :vocab_size], teacher_logits[..., :vocab_size]


def common_vocab(vs: int, vt: int, vocab_size: int | None = None) -> int:
    """The vocabulary rows both sides share: `vocab_size` (the tokenizer's true size) or min(vs, vt)."""
    if vocab_size is None:
        return min(vs, vt)
    if vocab_size > min(vs, vt):
        raise ValueError(
            f"vocab_size={vocab_size} exceeds the logits' vocabulary (student {vs}, teacher {vt}); "
            "vocab_size should be the tokenizer's true size, at most each model's embedding rows"
        )
    return vocab_size


def student_vocab(student_logits: torch.Tensor, vocab_size: int | None) -> int:
    """The number of student vocabulary rows that count (all, or the true tokenizer size)."""
    full = student_logits.shape[-1]
    if vocab_size is None:
        return full
    if vocab_size > full:
        raise ValueError(f"vocab_size={vocab_size} exceeds the student's logits vocabulary ({full})")
    return vocab_size


def check_sparse_ids(signal: SparseSignal, vocab: int) -> None:
    """Every valid (finite-logprob) teacher id must be a student row: otherwise the tokenizers differ."""
    valid = signal.logprobs > float("-inf")
    if not bool(valid.any()):
        return
    ids = signal.ids[valid]
    top, low = int(ids.max()), int(ids.min())
    if top >= vocab or low < 0:
        raise VocabMismatchError(
            f"sparse teacher token id {top if top >= vocab else low} is outside the student vocabulary "
            f"[0, {vocab}): teacher and student must share a tokenizer (see distill.losses.check_tokenizers); "
            "for different tokenizers use cross-tokenizer distillation: train.losses=[{name: uld}] or uld_hybrid "
            "with train.signal=online (distill.losses.uld)"
        )


def check_tokenizers(student_tok: Any, teacher_tok: Any, examples: int = 5) -> None:
    """Raise VocabMismatchError unless both tokenizers map the same tokens to the same ids.

    Compares `get_vocab()` (token -> id, added tokens included), not `vocab_size`: two tokenizers of equal size
    can still disagree, and models of one family often differ only in padded embedding rows, which is fine.
    """
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    if sv == tv:
        return
    only_teacher = sorted(set(tv) - set(sv), key=tv.get)
    only_student = sorted(set(sv) - set(tv), key=sv.get)
    moved = sorted((tok for tok in set(sv) & set(tv) if sv[tok] != tv[tok]), key=tv.get)
    lines = [
        (
            f"teacher and student tokenizers have different vocabularies (teacher {len(tv)} tokens, "
            f"student {len(sv)} tokens):"
        )
    ]
    if only_teacher:
        lines.append(f"  {len(only_teacher)} only in the teacher, e.g. {only_teacher[:examples]}")
    if only_student:
        lines.append(f"  {len(only_student)} only in the student, e.g. {only_student[:examples]}")
    if moved:
        shown = ", ".join(f"{tok!r}: teacher {tv[tok]} / student {sv[tok]}" for tok in moved[:examples])
        lines.append(f"  {len(moved)} with different ids, e.g. {shown}")
    lines.append(
        "Logit losses compare the two distributions id by id, which is only meaningful with one tokenizer. "
        "Use a student with the teacher's tokenizer, or cross-tokenizer distillation with a local teacher: "
        "train.losses=[{name: uld}] (sorted-probability L1) or [{name: uld_hybrid}] (exact on tokens both "
        "vocabularies share, ULD on the rest), with train.signal=online; see distill.losses.uld."
    )
    raise VocabMismatchError("\n".join(lines))
