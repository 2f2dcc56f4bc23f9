"""Cost of serving a model: parameters, weight bytes on disk, latency p50/p95 at batch 1, generation tokens/s
at a larger batch, peak memory, and $ per million generated tokens, plus the ratios against the teacher.

Latency is timed in `eval.latency_passes` passes of `eval.latency_requests` requests: the spread of the
passes' p50s and the p95/p50 ratio flag a figure measured on a busy machine (`latency_noisy`), so a report
does not headline a speedup that is mostly scheduler noise.

Timed generations always produce exactly `eval.latency_new_tokens` tokens (EOS is suppressed), so models
that stop early are not flattered; each measurement follows an untimed warm-up of the same shape.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from distill.config import Config
from distill.evaluation.metrics import percent_retained

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def bytes_on_disk(path: str | Path) -> int | None:
    """Size of the weight files (safetensors/bin/gguf) of a local model or adapter; None when the model is
    not on local disk (a hub id not in the local cache)."""
    p = Path(str(path))
    if p.is_file():
        return p.stat().st_size
    if not p.is_dir():
        try:
            from huggingface_hub import snapshot_download

            p = Path(snapshot_download(str(path), local_files_only=True))
        except (OSError, ValueError):  # not cached locally (or not a repo id): the size is unknown, not zero
            return None
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and f.suffix in WEIGHT_SUFFIXES) or None


def _sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100), as numpy's default."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def measure_latency(
    model, tokenizer, prompt_ids: list[list[int]], requests: int, new_tokens: int
) -> list[float]:
    """Seconds per batch-1 request of exactly `new_tokens` new tokens, cycling through the prompts, after
    one untimed warm-up request."""
    from distill.evaluation.generation import generate_ids

    generate_ids(model, tokenizer, [prompt_ids[0]], new_tokens, True)
    times = []
    for i in range(requests):
        _sync(model.device)
        t0 = time.perf_counter()
        generate_ids(model, tokenizer, [prompt_ids[i % len(prompt_ids)]], new_tokens, True)
        _sync(model.device)
        times.append(time.perf_counter() - t0)
    return times


NOISY_SPREAD = 0.15  # pass-to-pass spread of the p50 (relative) above which a latency is flagged noisy
NOISY_TAIL = 3.0  # p95 / p50 above which a latency is flagged noisy (batch-1 requests are all the same size)


def latency_summary(passes: list[list[float]]) -> dict[str, Any]:
    """p50/p95 over every timed request, the p50 of each pass and their spread ((max - min) / median), and
    whether the figure is noisy: on a busy machine the passes disagree or a few requests take far longer."""
    every = [t for p in passes for t in p]
    p50, p95 = percentile(every, 50), percentile(every, 95)
    per_pass = [percentile(p, 50) for p in passes]
    spread = (max(per_pass) - min(per_pass)) / percentile(per_pass, 50) if len(per_pass) > 1 else None
    noisy = (spread is not None and spread > NOISY_SPREAD) or (p50 > 0 and p95 / p50 > NOISY_TAIL)
    return {
        "latency_ms_p50": 1000 * p50,
        "latency_ms_p95": 1000 * p95,
        "latency_pass_p50_ms": [1000 * x for x in per_pass],
        "latency_spread": spread,
        "latency_noisy": bool(noisy),
    }


def throughput_batch(prompt_ids: list[list[int]], batch_size: int) -> list[list[int]]:
    """The prompts of the throughput (and peak memory) batch: the eval prompts, cycled to fill it."""
    return [prompt_ids[i % len(prompt_ids)] for i in range(batch_size)]


def measure_throughput(
    model, tokenizer, prompt_ids: list[list[int]], batch_size: int, new_tokens: int, repeats: int = 2
) -> float:
    """Generated tokens per second for a batch of `batch_size` prompts, each making exactly `new_tokens`
    tokens, after a warm-up of the same shape."""
    from distill.evaluation.generation import generate_ids

    batch = throughput_batch(prompt_ids, batch_size)
    generate_ids(model, tokenizer, batch, new_tokens, True)
    _sync(model.device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        generate_ids(model, tokenizer, batch, new_tokens, True)
    _sync(model.device)
    return repeats * len(batch) * new_tokens / (time.perf_counter() - t0)


def measure_cost(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    cfg: Config,
    *,
    path: str | Path,
    trust_remote_code: bool,
    cuda_base: int = 0,
) -> dict[str, Any]:
    """Parameters, disk size, latency, throughput, peak memory and $ per million generated tokens."""
    import torch

    from distill.evaluation.generation import is_adapter
    from distill.modeling import count_parameters

    ev = cfg.eval
    passes = [
        measure_latency(model, tokenizer, prompt_ids, ev.latency_requests, ev.latency_new_tokens)
        for _ in range(ev.latency_passes)
    ]
    on_cuda = str(model.device).startswith("cuda")
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(model.device)
    tps = measure_throughput(model, tokenizer, prompt_ids, ev.batch_size, ev.latency_new_tokens)
    memory, method = None, "off (eval.measure_memory=false)"
    if ev.measure_memory and on_cuda:
        memory = torch.cuda.max_memory_allocated(model.device) - cuda_base
        method = "cuda: max_memory_allocated during the throughput batch minus allocation before loading"
    elif ev.measure_memory:
        method = "pending: measured in a separate process after all models (distill.evaluation.peak_memory)"
    return {
        "params": count_parameters(model),
        "bytes_on_disk": bytes_on_disk(path),
        "adapter": is_adapter(path),
        **latency_summary(passes),
        "latency_new_tokens": ev.latency_new_tokens,
        "tokens_per_s": tps,
        "throughput_batch_size": ev.batch_size,
        "peak_memory_bytes": memory,
        "memory_method": method,
        "cost_per_million_tokens": ev.cost_per_hour / 3600 / tps * 1e6,
    }


def relative_to_teacher(student: dict[str, Any], teacher: dict[str, Any]) -> dict[str, float | None]:
    """Speed and size ratios, each > 1 when the student is better (faster, smaller)."""

    def ratio(a, b):
        return a / b if a and b else None

    return {
        "percent_of_teacher": percent_retained(student["score"], teacher["score"]),
        "speedup": ratio(teacher["latency_ms_p50"], student["latency_ms_p50"]),
        "throughput_ratio": ratio(student["tokens_per_s"], teacher["tokens_per_s"]),
        "size_ratio": ratio(teacher["params"], student["params"]),
        "disk_ratio": ratio(teacher["bytes_on_disk"], student["bytes_on_disk"]),
        "memory_ratio": ratio(teacher["peak_memory_bytes"], student["peak_memory_bytes"]),
        "speedup_noisy": bool(teacher.get("latency_noisy") or student.get("latency_noisy")),
    }
