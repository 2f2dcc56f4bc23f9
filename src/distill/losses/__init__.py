"""Distillation losses, registered once by name in `LOSSES`.

Logit losses: `fn(student_logits, teacher, mask=None, *, temperature=1.0, scale_temperature=True,
num_items_in_batch=None, sparse_mode="tail", chunk_size=None, vocab_size=None, **params) -> scalar`, with
student_logits (batch, seq, vocab) already causally aligned with the teacher: dense logits (batch, seq, vocab_t)
or a `distill.signals.SparseSignal`. Hidden-state losses (names in `HIDDEN_LOSSES`) take sequences of hidden
states instead: `fn(student_hidden, teacher_hidden, mask=None, *, layer_map=None, projections=None, ...)`.
"""

from __future__ import annotations

from collections.abc import Callable

from distill.losses.ce import cross_entropy
from distill.losses.hidden import (
    HiddenProjector,
    default_layer_map,
    hidden_cosine,
    hidden_mse,
    hidden_state_loss,
    make_projections,
)
from distill.losses.jsd import jsd
from distill.losses.kl import forward_kl, reverse_kl, skew_forward_kl, skew_reverse_kl
from distill.losses.tvd import tvd
from distill.losses.uld import align_responses, matched_vocab, uld, uld_hybrid
from distill.losses.vocab import VocabMismatchError, align_vocab, check_tokenizers

LOSSES: dict[str, Callable] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "tvd": tvd,
    "cross_entropy": cross_entropy,
    "hidden_mse": hidden_mse,
    "hidden_cosine": hidden_cosine,
    "uld": uld,
    "uld_hybrid": uld_hybrid,
}

# Registered losses that take hidden states (student_hidden, teacher_hidden) rather than logits.
HIDDEN_LOSSES: frozenset[str] = frozenset({"hidden_mse", "hidden_cosine"})
# Registered losses that compare teacher and student with different tokenizers (teacher aligned by response
# position, see losses/uld.py); the trainer runs the teacher on its own tokenization for them.
CROSS_TOKENIZER_LOSSES: frozenset[str] = frozenset({"uld", "uld_hybrid"})

__all__ = [
    "CROSS_TOKENIZER_LOSSES",
    "HIDDEN_LOSSES",
    "LOSSES",
    "HiddenProjector",
    "VocabMismatchError",
    "align_vocab",
    "check_tokenizers",
    "cross_entropy",
    "default_layer_map",
    "forward_kl",
    "hidden_cosine",
    "hidden_mse",
    "hidden_state_loss",
    "jsd",
    "make_projections",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "tvd",
    "align_responses",
    "matched_vocab",
    "uld",
    "uld_hybrid",
]
