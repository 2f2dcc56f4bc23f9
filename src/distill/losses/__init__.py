"""Distillation losses, each registered once in `LOSSES` (distill.losses.registry) with what it needs.

`LOSSES[name]` is a `Loss`: calling it calls the loss; `.student` ("logits" | "hidden"), `.teacher` ("labels" |
"signal" | "hidden" | "tokenizer" = cross-tokenizer), `.signals` (dense / sparse) and `.params` (typed, validated
parameters) say what it needs, so the trainer and the config ask the registry instead of comparing names.

Logit losses: `fn(student_logits, teacher, mask=None, *, temperature=1.0, scale_temperature=True,
num_items_in_batch=None, sparse_mode="tail", chunk_size=None, vocab_size=None, **params) -> scalar`, with
student_logits (batch, seq, vocab) already causally aligned with the teacher, or a `LinearLogits` (hidden states
and lm_head, projected chunk by chunk inside the loss: losses/fused.py); teacher: dense logits (batch, seq,
vocab_t), a LinearLogits, or a `distill.signals.SparseSignal`. Hidden-state losses take sequences of hidden
states instead: `fn(student_hidden, teacher_hidden, mask=None, *, projections=None, layer_map=None, ...)`.
"""

# ruff: noqa: I001  (import order = registration order)
from __future__ import annotations

# Importing the loss modules registers them; the order is the order of LOSSES.
from distill.losses.kl import forward_kl, reverse_kl, skew_forward_kl, skew_reverse_kl
from distill.losses.jsd import jsd
from distill.losses.tvd import tvd
from distill.losses.ce import cross_entropy
from distill.losses.hidden import (
    HiddenProjector,
    default_layer_map,
    hidden_cosine,
    hidden_mse,
    hidden_state_loss,
    make_projections,
)
from distill.losses.uld import align_responses, matched_vocab, place_counted, uld, uld_hybrid
from distill.losses.fused import LinearLogits
from distill.losses.registry import LOSSES, Loss, describe_params
from distill.losses.vocab import VocabMismatchError, align_vocab, check_tokenizers

# Views derived from the registry (not lists kept by hand): the losses on hidden states, and the cross-tokenizer
# ones (the teacher reads its own tokenization).
HIDDEN_LOSSES: frozenset[str] = frozenset(n for n, e in LOSSES.items() if e.student == "hidden")
CROSS_TOKENIZER_LOSSES: frozenset[str] = frozenset(n for n, e in LOSSES.items() if e.teacher == "tokenizer")

__all__ = [
    "CROSS_TOKENIZER_LOSSES",
    "HIDDEN_LOSSES",
    "LOSSES",
    "HiddenProjector",
    "LinearLogits",
    "Loss",
    "VocabMismatchError",
    "align_responses",
    "align_vocab",
    "check_tokenizers",
    "cross_entropy",
    "default_layer_map",
    "describe_params",
    "forward_kl",
    "hidden_cosine",
    "hidden_mse",
    "hidden_state_loss",
    "jsd",
    "make_projections",
    "matched_vocab",
    "place_counted",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "tvd",
    "uld",
    "uld_hybrid",
]
