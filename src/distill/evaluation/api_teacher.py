"""A teacher behind an OpenAI-compatible API in evaluation: its score, request latency and throughput."""

from __future__ import annotations

import time
from typing import Any

from distill.config import Config
from distill.evaluation.cost import latency_summary
from distill.evaluation.metrics import score_outputs

NO_API_FIDELITY = {
    "agreement": None,
    "kl": None,
    "fidelity_tokens": 0,
    "fidelity_note": "the teacher is served over an API: no teacher logits to compare token by token",
}


def api_teacher_entry(
    cfg: Config, records: list, metric, references: list[str | None]
) -> tuple[dict[str, Any], list[str]]:
    """Score, request latency and throughput of a teacher behind an OpenAI-compatible endpoint (greedy).

    Latency is per HTTP request of up to eval.max_new_tokens tokens (an API cannot be made to produce a fixed
    count); tokens/s is over the whole eval set at teacher.max_concurrency requests in flight. Parameters,
    memory and $/M tokens are unknown for an API and stay null.
    """
    from distill.config import GenerateConfig
    from distill.teachers import Prompt, build_teacher, teacher_identity

    ev = cfg.eval
    params = GenerateConfig(max_new_tokens=ev.max_new_tokens, temperature=0.0, seed=cfg.seed)
    teacher = build_teacher(cfg)
    try:
        prompts = [Prompt(index=i, record=r, text=teacher.render(r)) for i, r in enumerate(records)]
        texts, tokens = [""] * len(prompts), 0
        start = time.perf_counter()
        for prompt, completion in teacher.generate(prompts, params):
            texts[prompt.index] = completion.text
            tokens += completion.num_tokens()
        wall = time.perf_counter() - start
        latency = []
        for i in range(ev.latency_requests):
            start = time.perf_counter()
            list(teacher.generate([prompts[i % len(prompts)]], params))
            latency.append(time.perf_counter() - start)
    finally:
        teacher.close()
    score, n_scored = score_outputs(metric, texts, references)
    entry = {
        "path": teacher_identity(cfg.teacher),
        "api": True,
        "score": score,
        "n_scored": n_scored,
        "mean_output_tokens": tokens / len(texts),
        "params": None,
        "bytes_on_disk": None,
        "adapter": False,
        **latency_summary([latency]),  # one pass: API requests cost money; the p95/p50 tail still flags noise
        "latency_new_tokens": None,
        "tokens_per_s": tokens / wall if tokens else None,
        "throughput_batch_size": cfg.teacher.max_concurrency,
        "peak_memory_bytes": None,
        "memory_method": "n/a: the teacher is served over an API",
        "cost_per_million_tokens": None,
    }
    return entry, texts
