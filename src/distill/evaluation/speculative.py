"""The student as the teacher's speculative-decoding draft: how often the teacher accepts its tokens, and how
much faster teacher + draft decode than the teacher alone, with the same greedy output.

Run as: part of `distill eval` (`eval.speculative_prompts: 8`, students that share the teacher's vocabulary),
or `draft_check(teacher, draft, prompt_ids, max_new_tokens)` on loaded models; `benchmarks/speculative.py`
measures it on a real model.

Speculative decoding (Leviathan et al. 2023; transformers' assisted generation) lets the draft propose a few
tokens and the teacher verify them in one forward: with greedy decoding the output is the teacher's own,
token for token, so a student that cannot replace the teacher can still cut its latency without losing a
point. What decides the gain is the acceptance rate (accepted / proposed draft tokens) against the draft's cost
per token. Both runs here are batch-1 greedy on the same prompts, interleaved per prompt so a noisy machine
hits both alike; time is CPU time of this process (`time.process_time`) on CPU, wall time on CUDA.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any


@contextmanager
def counting_acceptance() -> Iterator[dict[str, int]]:
    """Count draft tokens proposed and accepted in every assisted generation run inside the block.

    transformers calls `update_candidate_strategy(input_ids, scores, num_matches)` once per verification:
    `scores` holds the teacher's logits for the proposed tokens plus one, `num_matches` how many it accepted.
    """
    from transformers.generation.candidate_generator import AssistedCandidateGenerator

    counts = {"proposed": 0, "accepted": 0, "verifications": 0}
    original = AssistedCandidateGenerator.update_candidate_strategy

    def update(self, input_ids, scores, num_matches):
        counts["proposed"] += int(scores.shape[1]) - 1
        counts["accepted"] += int(num_matches)
        counts["verifications"] += 1
        return original(self, input_ids, scores, num_matches)

    AssistedCandidateGenerator.update_candidate_strategy = update
    try:
        yield counts
    finally:
        AssistedCandidateGenerator.update_candidate_strategy = original


def _clock(device) -> float:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return time.process_time()


def draft_check(
    teacher,
    draft,
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
) -> dict[str, Any]:
    """Greedy teacher alone vs teacher + `draft` (assisted generation) on each prompt, batch 1.

    prompt_ids: token ids per prompt (the teacher's vocabulary, which the draft must share). Returns
    `acceptance` (accepted / proposed draft tokens), `tokens_per_teacher_forward` (new tokens per teacher
    verification step, 1.0 without a draft), `identical` / `n_prompts` (prompts whose assisted output equals
    the teacher's own), `speedup` (teacher+draft tokens per second over the teacher's, same prompts) and the
    seconds and tokens behind it.
    """
    import torch

    device = next(teacher.parameters()).device
    if eos_token_id is None:
        eos_token_id = teacher.generation_config.eos_token_id
    if pad_token_id is None:
        pad_token_id = teacher.generation_config.pad_token_id
    if pad_token_id is None:
        pad_token_id = eos_token_id[0] if isinstance(eos_token_id, list) else eos_token_id
    kwargs = dict(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        temperature=None,
        top_p=None,
        top_k=None,
    )
    seconds = {"teacher": 0.0, "assisted": 0.0}
    tokens = {"teacher": 0, "assisted": 0}
    identical = 0
    with counting_acceptance() as counts, torch.inference_mode():
        for i, ids in enumerate(prompt_ids):
            inputs = torch.tensor([list(ids)], device=device)
            mask = torch.ones_like(inputs)
            outs: dict[str, list[int]] = {}
            order = ("teacher", "assisted") if i % 2 == 0 else ("assisted", "teacher")
            for which in order:  # alternate who goes first: caches and a busy machine hit both alike
                extra = {"assistant_model": draft} if which == "assisted" else {}
                start = _clock(device)
                out = teacher.generate(inputs, attention_mask=mask, **kwargs, **extra)
                seconds[which] += _clock(device) - start
                outs[which] = out[0, inputs.shape[1]:].tolist()
                tokens[which] += len(outs[which])
            identical += outs["teacher"] == outs["assisted"]
    rate = lambda which: tokens[which] / seconds[which] if seconds[which] > 0 else None  # noqa: E731
    speedup = None
    if rate("teacher") and rate("assisted"):
        speedup = rate("assisted") / rate("teacher")
    return {
        "acceptance": counts["accepted"] / counts["proposed"] if counts["proposed"] else None,
        "draft_tokens_proposed": counts["proposed"],
        "draft_tokens_accepted": counts["accepted"],
        "tokens_per_teacher_forward": (
            tokens["assisted"] / counts["verifications"] if counts["verifications"] else None
        ),
        "identical": identical,
        "n_prompts": len(prompt_ids),
        "speedup": speedup,
        "teacher_seconds": seconds["teacher"],
        "assisted_seconds": seconds["assisted"],
        "teacher_tokens": tokens["teacher"],
        "assisted_tokens": tokens["assisted"],
        "clock": "wall (cuda)" if str(device).startswith("cuda") else "process CPU",
    }
