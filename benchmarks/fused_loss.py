"""distill's fused linear loss vs a lean hand-written loss on the same rows: CPU time and peak memory of one step.

The step is the loss head of a training step: final hidden states of the counted (completion) tokens and the
lm_head weight in, loss forward + backward to both out. A SmolLM2-like width (hidden 576) and a teacher of the
same vocabulary and width, at vocabularies 8,192 / 49,152 / 151,936 (Qwen's) by default.

- hand:  what one writes by hand: project the rows (student with gradient, teacher without), fp32 log_softmax on
         both, `kl_div(log_target=True)`; for a sparse teacher (top-k ids + logprobs + tail mass), the student's
         log-probs gathered at the top-k ids plus a tail bucket log(1 - sum p_topk), KL over the k + 1 buckets;
- fused: `distill.losses.LOSSES[loss]` on a `LinearLogits` student (and teacher), chunked with distill's default
         chunk size (`distill.losses.fused.DEFAULT_CHUNK_SIZE`), as `distill train` and the Trainer run it.

Each (vocab, variant) runs in a fresh subprocess pinned to one thread, `--rounds` rounds interleaved
(hand, fused, hand, fused, ...); a child times one step after a warm-up step with time.process_time (CPU seconds
of the one-thread process) and reports its peak memory: VmHWM at the end minus VmRSS before the first step (inputs
allocated; the gradients of hidden states and weight, which every variant produces, count).
Printed per vocabulary: the median fused / hand time ratio over rounds (min-max spread), and the peak-memory
ratio. Targets (issue 20): time <= 1.1x (dense) / 1.2x (sparse), memory <= 40% of the hand-written loss's.

Run as:  OMP_NUM_THREADS=1 python benchmarks/fused_loss.py [--vocab 8192 49152 151936 --tokens 384 --rounds 3
         --losses forward_kl sparse]   (about 4 minutes on one core)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HIDDEN, TOPK = 576, 20
VARIANTS = ("hand", "fused")


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def hand_forward_kl(h, w, th, tw):
    """Forward KL(teacher || student) summed over the rows, as one writes it by hand."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        lt = F.log_softmax((th @ tw.T).float(), dim=-1)
    ls = F.log_softmax((h @ w.T).float(), dim=-1)
    return F.kl_div(ls, lt, reduction="sum", log_target=True)


def hand_sparse(h, w, ids, logprobs, tail):
    """Forward KL over the teacher's top-k ids + one tail bucket, as one writes it by hand."""
    import torch

    s = (h @ w.T).float()
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    ls_top = s.gather(-1, ids) - lse
    ls_tail = torch.log1p(-ls_top.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-6))
    ls = torch.cat([ls_top, ls_tail], dim=-1)
    lt = torch.cat([logprobs, tail.clamp(min=1e-8).log().unsqueeze(-1)], dim=-1)
    return (lt.exp() * (lt - ls)).sum()


def _child(variant: str, loss: str, vocab: int, tokens: int) -> None:
    import torch

    from distill.losses import LOSSES, LinearLogits, fused
    from distill.signals import SparseSignal

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, HIDDEN, generator=g)
    w = torch.randn(vocab, HIDDEN, generator=g) * 0.05
    th = torch.randn(tokens, HIDDEN, generator=g)
    tw = torch.randn(vocab, HIDDEN, generator=g) * 0.1
    sparse = None
    if loss == "sparse":
        with torch.no_grad():
            top = torch.log_softmax(th @ tw.T, -1).topk(TOPK, dim=-1)
        sparse = (top.indices, top.values, (1 - top.values.exp().sum(-1)).clamp(min=0))
        del top
    chunk = getattr(fused, "DEFAULT_CHUNK_SIZE", 1024)  # (1024: distill train's default before there was one)

    hh, ww = h.requires_grad_(True), w.requires_grad_(True)

    def step() -> float:
        hh.grad = ww.grad = None
        if variant == "hand":
            value = hand_sparse(hh, ww, *sparse) if sparse else hand_forward_kl(hh, ww, th, tw)
        else:
            student = LinearLogits(hh[None], ww)
            teacher = SparseSignal(*(x[None] for x in sparse)) if sparse else LinearLogits(th[None], tw)
            value = LOSSES["forward_kl"](student, teacher, chunk_size=chunk, num_items_in_batch=1)
        value.backward()
        return float(value.detach())

    before = _status_kb("VmRSS")
    step()  # warm-up
    start = time.process_time()
    value = step()
    seconds = time.process_time() - start
    peak = _status_kb("VmHWM")
    print(json.dumps({"seconds": seconds, "peak_mb": (peak - before) / 1024, "loss": value, "chunk": chunk}))


def _run(variant: str, loss: str, vocab: int, tokens: int, src: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": src}
    cmd = [sys.executable, __file__, "--child", variant, loss, "--vocab", str(vocab), "--tokens", str(tokens)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[8_192, 49_152, 151_936])
    parser.add_argument("--tokens", type=int, default=384, help="counted (completion) tokens in the step")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--losses", nargs="+", choices=("forward_kl", "sparse"), default=["forward_kl", "sparse"])
    parser.add_argument("--src", default=str(REPO / "src"),
                        help="the distill source to measure (e.g. an export of main: `git archive main src | tar -x`)")
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "LOSS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child, args.vocab[0], args.tokens)
        return
    load = os.getloadavg()[0]
    print(f"loss head step (forward + backward), {args.tokens} counted tokens, hidden {HIDDEN}, fp32, top-{TOPK} for "
          f"sparse; {args.rounds} interleaved rounds, one thread, CPU seconds; load average {load:.1f}")  # fmt: skip
    for loss in args.losses:
        for vocab in args.vocab:
            runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
            for _ in range(args.rounds):
                for variant in VARIANTS:
                    runs[variant].append(_run(variant, loss, vocab, args.tokens, args.src))
            ratios = [f["seconds"] / h["seconds"] for f, h in zip(runs["fused"], runs["hand"])]
            mem = statistics.median(r["peak_mb"] for r in runs["fused"]) / statistics.median(
                r["peak_mb"] for r in runs["hand"]
            )
            diff = abs(runs["fused"][0]["loss"] - runs["hand"][0]["loss"]) / max(abs(runs["hand"][0]["loss"]), 1e-12)
            print(f"  {loss:10s} vocab {vocab:7,d}: hand {statistics.median(r['seconds'] for r in runs['hand']):6.2f} s "
                  f"{statistics.median(r['peak_mb'] for r in runs['hand']):6.0f} MB | fused (chunk "
                  f"{runs['fused'][0]['chunk']}) {statistics.median(r['seconds'] for r in runs['fused']):6.2f} s "
                  f"{statistics.median(r['peak_mb'] for r in runs['fused']):6.0f} MB | fused/hand time "
                  f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}), memory {mem:.0%}, "
                  f"loss rel. diff {diff:.1e}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
