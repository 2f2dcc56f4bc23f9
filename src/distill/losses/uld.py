"""Cross-tokenizer distillation: the ULD loss (Boizard et al. 2024) and a GOLD-style exact/ULD hybrid.

When teacher and student tokenizers differ, their logits index different strings, so no id-by-id divergence
is meaningful. ULD compares what does not depend on ids: at each aligned position, both probability vectors
are sorted in decreasing order, the shorter vocabulary is padded with zeros, and the loss is the L1 distance
between the sorted vectors (0 exactly when the two distributions are permutations of each other).

Alignment (done before the loss, by `align_responses`): teacher and student tokenize the same prompt and
response text separately; position j of the student's response (the logits that predict its j-th response
token) is paired with position j of the teacher's response, for j < min(student length, teacher length).
Longer tails are not counted. This is ULD's own alignment; it is exact for tokens that split alike and a
positional approximation elsewhere (TRL's GOLD additionally merges spans by byte offsets; we do not).

The hybrid (`uld_hybrid`, as TRL's GOLD trainer `uld_use_hybrid_loss`): tokens whose *string* exists in both
vocabularies (`matched_vocab`) are compared exactly, id to id, by a generalised JSD(beta) (beta = 0: forward
KL) over the matched tokens plus one bucket holding each side's remaining (unmatched) mass, so both sides are
proper distributions; the unmatched probabilities are compared by ULD's sorted L1. The two parts are weighted
`matched_weight` and 1 - matched_weight (default, as GOLD: the matched share of the teacher vocabulary).

  student_logits: (batch, seq, vocab_s); teacher: (batch, seq, vocab_t) logits already aligned to the
  student's positions; mask: (batch, seq) of aligned positions. Same call shape as every logit loss in LOSSES.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from distill.losses.common import check_temperature, token_loss, upcast
from distill.losses.fused import LinearLogits, cut_vocab
from distill.losses.jsd import _jsd
from distill.losses.registry import LogitSettings, LossParams, logit_loss
from distill.losses.vocab import student_vocab

NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------- vocab matching


def matched_vocab(student_tok: Any, teacher_tok: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher ids, student ids) of the tokens whose string is in both vocabularies, by teacher id.

    As GOLD: tokens are compared by their vocabulary string (`get_vocab()` keys), so byte-level BPE pieces
    such as 'Ġthe' match only the same piece in the other tokenizer.
    """
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    pairs = sorted((tid, sv[tok]) for tok, tid in tv.items() if tok in sv)
    if not pairs:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty.clone()
    t_ids, s_ids = zip(*pairs)
    return torch.tensor(t_ids, dtype=torch.long), torch.tensor(s_ids, dtype=torch.long)


# ----------------------------------------------------------------------------------------------- alignment


def align_responses(
    teacher_logits: torch.Tensor,
    teacher_targets: torch.Tensor,
    student_targets: torch.Tensor,
    index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Place the teacher's response predictions at the student's response positions.

    teacher_logits: (batch, seq_t, vocab_t), already causally shifted (row i predicts teacher_targets[:, i]);
    teacher_targets: (batch, seq_t) and student_targets: (batch, seq_s) shifted labels, -100 where not counted.
    index: (batch, n) for the j-th counted student token, the counted teacher token it pairs with (-1: none),
    from `distill.data.crosstok.align_by_offsets` (same character offset); None pairs the j-th with the j-th,
    for j < min of the two counts (ULD's positional alignment).
    Returns (aligned teacher logits (batch, seq_s, vocab_t), mask (batch, seq_s)); unpaired rows are zeros.
    """
    b, seq_s = student_targets.shape
    if teacher_logits.shape[0] != b or teacher_targets.shape[0] != b:
        raise ValueError(
            f"teacher batch {teacher_logits.shape[0]} and student batch {b} differ: cross-tokenizer batches "
            "must hold the same examples on both sides"
        )
    aligned = teacher_logits.new_zeros((b, seq_s, teacher_logits.shape[-1]))
    mask = torch.zeros((b, seq_s), dtype=torch.bool, device=student_targets.device)
    for i in range(b):
        s_pos = (student_targets[i] != -100).nonzero(as_tuple=True)[0]
        t_pos = (teacher_targets[i] != -100).nonzero(as_tuple=True)[0].to(teacher_logits.device)
        if index is None:
            n = min(len(s_pos), len(t_pos))
            s_sel, t_sel = s_pos[:n], t_pos[:n]
        else:
            k = index[i, : len(s_pos)].to(s_pos.device)
            keep = (k >= 0) & (k < len(t_pos))
            s_sel, t_sel = s_pos[: len(k)][keep], t_pos[k[keep].to(t_pos.device)]
        if len(s_sel):
            aligned[i, s_sel.to(aligned.device)] = teacher_logits[i, t_sel]
            mask[i, s_sel] = True
    return aligned, mask


def place_counted(values: torch.Tensor, student_targets: torch.Tensor) -> torch.Tensor:
    """(batch, n) values of the counted student tokens, in order, at their (batch, seq_s) positions (False elsewhere)."""
    out = torch.zeros(student_targets.shape, dtype=values.dtype, device=student_targets.device)
    for i in range(student_targets.shape[0]):
        s_pos = (student_targets[i] != -100).nonzero(as_tuple=True)[0]
        n = min(len(s_pos), values.shape[1])
        out[i, s_pos[:n]] = values[i, :n].to(out.device)
    return out


# ------------------------------------------------------------------------------------------ per-token parts


def sorted_l1(ps: torch.Tensor, pt: torch.Tensor) -> torch.Tensor:
    """L1 distance between descending-sorted probability rows (n, Vs) and (n, Vt), zero-padding the shorter.

    The padding is never materialised: past the shorter width the other side is 0, so |x - 0| = x.
    """
    ss = ps.sort(dim=-1, descending=True).values
    st = pt.sort(dim=-1, descending=True).values
    w = min(ss.shape[-1], st.shape[-1])
    head = (ss[:, :w] - st[:, :w]).abs().sum(-1)
    return head + ss[:, w:].sum(-1) + st[:, w:].sum(-1)


def _tempered_log_probs(rows: torch.Tensor, temperature: float) -> torch.Tensor:
    x = upcast(rows)
    return torch.log_softmax(x / temperature if temperature != 1.0 else x, dim=-1)


def _uld_tokens(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    return sorted_l1(_tempered_log_probs(s, temperature).exp(), _tempered_log_probs(t.detach(), temperature).exp())


def _hybrid_tokens(
    s: torch.Tensor,
    t: torch.Tensor,
    temperature: float,
    t_ids: torch.Tensor,
    s_ids: torch.Tensor,
    matched_weight: float,
    beta: float,
    exact_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """exact_rows (n, 1): 1 where the two aligned tokens are the same string; elsewhere only the whole-vocabulary
    sorted L1 (ULD) is meaningful, since the teacher's shared-token ids predict a different piece of text."""
    ls, lt = _tempered_log_probs(s, temperature), _tempered_log_probs(t.detach(), temperature)
    s_un = torch.ones(ls.shape[-1], dtype=torch.bool, device=ls.device)
    t_un = torch.ones(lt.shape[-1], dtype=torch.bool, device=lt.device)
    s_un[s_ids], t_un[t_ids] = False, False

    def rest(lp: torch.Tensor, un: torch.Tensor) -> torch.Tensor:
        if not bool(un.any()):
            return lp.new_full((lp.shape[0], 1), NEG_INF)
        return torch.logsumexp(lp[:, un], dim=-1, keepdim=True)

    exact = _jsd(torch.cat([ls[:, s_ids], rest(ls, s_un)], -1), torch.cat([lt[:, t_ids], rest(lt, t_un)], -1), beta)
    hybrid = exact if matched_weight >= 1.0 else (
        matched_weight * exact + (1.0 - matched_weight) * sorted_l1(ls[:, s_un].exp(), lt[:, t_un].exp()))
    if exact_rows is None:
        return hybrid
    same = exact_rows.reshape(-1).to(torch.bool)
    return torch.where(same, hybrid, sorted_l1(ls.exp(), lt.exp()))


# ---------------------------------------------------------------------------------------------- the losses


class UldParams(LossParams):
    beta: float = Field(0.0, ge=0.0, le=1.0, description="uld_hybrid: JSD(beta) on matched tokens (0: forward KL)")
    matched_weight: float | None = Field(
        None, ge=0.0, le=1.0, description="uld_hybrid: weight of the exact part (None: matched share of the vocab)"
    )


def _uld(
    student_logits,
    teacher,
    mask,
    settings: LogitSettings,
    *,
    beta: float = 0.0,
    matched_weight: float | None = None,
    teacher_vocab_size: int | None = None,
    matched: tuple[torch.Tensor, torch.Tensor] | None = None,
    exact: torch.Tensor | None = None,
) -> torch.Tensor:
    """ULD: sorted-probability L1 per aligned position; with `matched`, the GOLD hybrid (see module doc).

    exact: (batch, seq) bool, the positions whose two aligned tokens are the same string (from the offset
    alignment, `distill.data.crosstok`); the hybrid compares shared ids only there. None: everywhere.

    vocab_size / teacher_vocab_size cut padded embedding rows of each side (the tokenizers' true sizes).
    sparse_mode is accepted for the common call shape; ULD needs dense teacher logits (an online teacher).
    """
    temperature = settings.temperature
    check_temperature(temperature)
    dense = isinstance(teacher, LinearLogits) or (isinstance(teacher, torch.Tensor) and teacher.is_floating_point())
    if not dense:
        raise TypeError(
            "ULD needs dense teacher logits over the teacher's whole vocabulary (train.signal=online with a local "
            "teacher); a sparse top-k signal does not say how the rest of the teacher's mass is spread"
        )
    if student_logits.dim() != 3 or teacher.dim() != 3 or teacher.shape[:2] != student_logits.shape[:2]:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher {tuple(teacher.shape)} must be "
            "(batch, seq, vocab) with the same (batch, seq): align the teacher first (align_responses)"
        )
    vocab = student_vocab(student_logits, settings.vocab_size)
    t_vocab = teacher.shape[-1] if teacher_vocab_size is None else min(teacher_vocab_size, teacher.shape[-1])
    teacher = cut_vocab(teacher, t_vocab)
    if matched is None:
        def token_fn(s, t):
            return _uld_tokens(s, t, temperature)
    else:
        t_ids, s_ids = (m.to(student_logits.device) for m in matched)
        keep = (t_ids < t_vocab) & (s_ids < vocab)
        t_ids, s_ids = t_ids[keep], s_ids[keep]
        if t_ids.numel() == 0:
            raise ValueError("uld_hybrid: no token string is shared by the two vocabularies; use plain uld")
        weight = t_ids.numel() / t_vocab if matched_weight is None else float(matched_weight)

        def token_fn(s, t, e=None):
            return _hybrid_tokens(s, t, temperature, t_ids, s_ids, weight, beta, e)

    payload = (teacher,) if exact is None or matched is None else (teacher, exact.to(torch.float32)[..., None])
    return token_loss(token_fn, student_logits, payload, mask, vocab, settings)


_CROSS = {"params": UldParams, "teacher": "tokenizer", "signals": frozenset({"dense"})}
uld = logit_loss("uld", context=("teacher_vocab_size",), **_CROSS)(_uld)


@logit_loss("uld_hybrid", context=("teacher_vocab_size", "matched", "exact"), **_CROSS)
def uld_hybrid(student_logits, teacher, mask, settings: LogitSettings, **kwargs: Any) -> torch.Tensor:
    """Exact JSD(beta) on string-matched tokens + ULD on the rest; `matched` from `matched_vocab`."""
    if kwargs.get("matched") is None:
        raise ValueError(
            "uld_hybrid needs matched=(teacher ids, student ids) from distill.losses.uld.matched_vocab(student_tok, "
            "teacher_tok); the trainer passes it in cross-tokenizer mode"
        )
    return _uld(student_logits, teacher, mask, settings, **kwargs)
