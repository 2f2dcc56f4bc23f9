"""Fused linear distillation loss vs the plain path: peak memory and CPU time of one training step.

A SmolLM2-shaped student (Llama, hidden 576, 9 heads / 3 KV heads, intermediate 1536, vocab 49,152, tied
embeddings, 2 layers, random init) and a teacher of the same vocabulary (hidden 576, 2 layers), 4 x 512 tokens.
One training step is `DistillationTrainer.compute_loss` forward + backward, as `distill train` runs it, for
forward KL and JSD (online teacher, dense logits) and sparse top-20 forward KL (offline signal, tail bucket):

- plain:   the models project every position through lm_head, the loss runs on the whole (tokens x vocab)
           logits (train.chunk_size=0);
- chunked: the same logits, loss chunked over tokens (distill's default at vocab >= 32k before the fused path);
- fused:   the models return final hidden states, the loss projects chunk by chunk (the default now).

Each (loss, variant) runs in a fresh subprocess pinned to one thread: a warm-up step, then a timed step (CPU
time of the process). Peak memory is the step's own: VmHWM (from /proc/self/status) at the end minus VmRSS
before the first step (models, optimizer-free, and the batch are already allocated). The last line gives the
worst ratio over the three losses: `fused/plain peak memory: P% time: T x` (targets P <= 40, T <= 1.0).

Run as:  OMP_NUM_THREADS=1 python benchmarks/fused_loss.py [--chunk-size 1024 --losses forward_kl jsd sparse]
         (about 3 minutes on one core)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("plain", "chunked", "fused")
LOSSES = ("forward_kl", "jsd", "sparse")
VOCAB, BATCH, SEQ, TOPK = 49_152, 4, 512, 20


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _llama(seed: int, layers: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    return LlamaForCausalLM(cfg)


def _child(variant: str, loss: str, chunk_size: int) -> None:
    import torch
    from transformers import TrainingArguments

    from distill.training.trainer import DistillationTrainer, LossSpec

    torch.set_num_threads(1)
    student = _llama(0, 2).train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=g)
    labels = ids.clone()
    labels[:, :32] = -100  # a prompt, not counted
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    teacher = None
    if loss == "sparse":
        logp = torch.log_softmax(torch.randn(BATCH, SEQ - 1, VOCAB, generator=g) * 3, -1)
        top = logp.topk(TOPK, dim=-1)
        batch.update(topk_ids=top.indices, topk_logprobs=top.values, topk_tail=1 - top.values.exp().sum(-1))
        del logp, top
    else:
        teacher = _llama(2, 2)
    spec = LossSpec("jsd", params={"beta": 0.5}) if loss == "jsd" else LossSpec("forward_kl")
    chunk = None if variant == "plain" else chunk_size
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True)
        trainer = DistillationTrainer(model=student, args=args, teacher=teacher, losses=[spec], chunk_size=chunk,
                                      fused=variant == "fused", vocab_size=VOCAB)  # fmt: skip
        num_items = (labels[:, 1:] != -100).sum()
        before = _status_kb("VmRSS")
        values = []
        for step in range(2):
            student.zero_grad(set_to_none=True)
            start = time.process_time()
            value = trainer.compute_loss(student, batch, num_items_in_batch=num_items)
            value.backward()
            seconds = time.process_time() - start
            values.append(float(value.detach()))
    peak = _status_kb("VmHWM")
    print(json.dumps({"peak_mb": (peak - before) / 1024, "rss_peak_mb": peak / 1024, "seconds": seconds,
                      "loss": values[-1]}))  # fmt: skip


def _run(variant: str, loss: str, chunk_size: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, __file__, "--child", variant, loss, "--chunk-size", str(chunk_size)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "LOSS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child, args.chunk_size)
        return
    if "plain" not in args.variants or "fused" not in args.variants:
        parser.error("--variants must include plain and fused")
    print(f"one training step (forward + backward), {BATCH} x {SEQ} tokens, vocab {VOCAB:,}, student hidden 576 x 2 "
          f"layers, chunk_size {args.chunk_size}; logits tensor {BATCH * SEQ * VOCAB * 4 / 2**20:.0f} MB fp32")  # fmt: skip
    mem_ratios, time_ratios = [], []
    for loss in args.losses:
        runs = {variant: _run(variant, loss, args.chunk_size) for variant in args.variants}
        for variant, r in runs.items():
            print(f"  {loss:10s} {variant:8s} step peak {r['peak_mb']:7.0f} MB (process {r['rss_peak_mb']:6.0f} MB)  "
                  f"CPU {r['seconds']:6.2f} s  loss {r['loss']:.6f}")  # fmt: skip
        plain, fused = runs["plain"], runs["fused"]
        mem_ratios.append(fused["peak_mb"] / plain["peak_mb"])
        time_ratios.append(fused["seconds"] / plain["seconds"])
        print(f"  {loss:10s} fused/plain: memory {mem_ratios[-1]:.1%}, time {time_ratios[-1]:.2f} x, "
              f"|loss difference| {abs(fused['loss'] - plain['loss']):.1e}")  # fmt: skip
    print(f"fused/plain peak memory: {max(mem_ratios) * 100:.0f}% time: {max(time_ratios):.2f} x")


if __name__ == "__main__":
    main()
