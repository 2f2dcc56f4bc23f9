"""Fidelity of a student to its teacher: token agreement and KL(teacher || student) under teacher forcing on
the teacher's greedy outputs (same tokenizer only).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from distill.data.batching import left_pad
from distill.evaluation.generation import Generation

if TYPE_CHECKING:
    import torch

def token_fidelity(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
) -> tuple[int, int, float]:
    """Agreement and KL(teacher || student) on teacher-forced positions.

    student_logits, teacher_logits: (batch, seq, vocab), already aligned with `targets` (the caller did the
    causal shift); targets: (batch, seq) the teacher's generated tokens; mask: (batch, seq) bool, True where
    a teacher token is counted. Returns (matching positions, counted positions, summed KL in nats), so
    callers can sum over batches and divide once. The KL is the training loss `forward_kl` at T=1 (one
    definition of the divergence in the project), which cuts padded vocab rows and never yields 0*log 0 NaNs.
    """
    from distill.losses import LOSSES

    mask = mask.bool()
    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
    count = int(mask.sum().item())
    if count == 0:
        return 0, 0, 0.0
    agree = int(((student_logits[..., :vocab].argmax(-1) == targets) & mask).sum().item())
    mean_kl = LOSSES["forward_kl"](student_logits, teacher_logits, mask, temperature=1.0, vocab_size=vocab)
    return agree, count, float(mean_kl.item()) * count


def _forward_last(model, ids: torch.Tensor, attn: torch.Tensor, keep: int) -> torch.Tensor:
    """Logits of the last `keep` positions of a left-padded batch; positions count from each row's first real
    token, as in generation. Only those positions are projected onto the vocabulary when the model supports
    `logits_to_keep` (prompt logits of a large vocabulary would dominate memory)."""
    import torch

    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    args = {
        "input_ids": ids.to(model.device),
        "attention_mask": attn.to(model.device),
        "position_ids": pos.to(model.device),
    }
    with torch.inference_mode():
        try:
            logits = model(**args, logits_to_keep=keep).logits
        except TypeError:  # models without logits_to_keep: project everything, then cut
            logits = model(**args).logits
    return logits[:, -keep:]


def fidelity(student, teacher, gen: Generation, pad_id: int, batch_size: int) -> dict[str, Any]:
    """Token agreement and mean KL(teacher || student) over the teacher's generated tokens, both models
    teacher-forced on prompt + teacher output (one forward pass each per batch)."""
    import torch

    rows = [(p, o) for p, o in zip(gen.prompt_ids, gen.output_ids) if o]
    agree = count = 0
    kl = 0.0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        ids, attn = left_pad([p + o for p, o in chunk], pad_id, "cpu")
        longest = max(len(o) for _, o in chunk)
        # Sequences end together (left padding): the last `longest` tokens hold every response, predicted by
        # the logits one position earlier.
        counted = torch.zeros((len(chunk), longest), dtype=torch.bool)
        for i, (_, o) in enumerate(chunk):
            counted[i, longest - len(o) :] = True
        s_logits = _forward_last(student, ids, attn, longest + 1)[:, :-1]
        t_logits = _forward_last(teacher, ids, attn, longest + 1)[:, :-1]
        a, n, k = token_fidelity(s_logits.cpu(), t_logits.cpu(), ids[:, -longest:], counted)
        agree, count, kl = agree + a, count + n, kl + k
    if count == 0:
        return {
            "agreement": None,
            "kl": None,
            "fidelity_tokens": 0,
            "fidelity_note": "the teacher generated no tokens",
        }
    return {"agreement": agree / count, "kl": kl / count, "fidelity_tokens": count, "fidelity_note": None}
