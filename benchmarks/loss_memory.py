"""Peak memory of a distillation loss, plain vs chunked: forward + backward of one loss at a large vocabulary.

Each variant runs in a fresh subprocess; the figure is the growth of the process's peak RSS (ru_maxrss) over
the forward + backward, measured after the inputs (student logits, teacher logits) are allocated, so it is the
loss's own memory: fp32 intermediates plus the gradient w.r.t. the student logits (which any path produces).

Run as:  OMP_NUM_THREADS=1 python benchmarks/loss_memory.py [--vocab 49152 --tokens 4096 --chunk-size 256]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _child(args: argparse.Namespace) -> None:
    import torch

    from distill.losses import LOSSES

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    batch = 4
    seq = args.tokens // batch
    student = torch.randn(batch, seq, args.vocab, dtype=dtype).requires_grad_(True)
    teacher = torch.randn(batch, seq, args.vocab, dtype=dtype)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    loss = LOSSES[args.loss](
        student, teacher, chunk_size=args.chunk_size if args.variant == "chunked" else None
    )
    loss.backward()
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_growth_mb": (after - before) / 1024, "seconds": seconds, "loss": loss.item()}))


def _run(variant: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--vocab", str(args.vocab), "--tokens", str(args.tokens),
           "--chunk-size", str(args.chunk_size), "--dtype", args.dtype, "--loss", args.loss]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vocab", type=int, default=49_152)
    parser.add_argument("--tokens", type=int, default=4_096)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--loss", default="forward_kl")
    parser.add_argument("--child", choices=["plain", "chunked"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.variant = args.child
        _child(args)
        return
    logits_mb = args.tokens * args.vocab * (4 if args.dtype == "float32" else 2) / 2**20
    print(
        f"{args.loss} forward+backward, {args.tokens} tokens x vocab {args.vocab}, {args.dtype} logits "
        f"({logits_mb:.0f} MB per logits tensor), chunk_size={args.chunk_size}"
    )
    plain, chunked = _run("plain", args), _run("chunked", args)
    for name, r in (("plain", plain), ("chunked", chunked)):
        print(
            f"  {name:8s} peak RSS growth {r['peak_growth_mb']:8.0f} MB   {r['seconds']:6.2f} s   loss {r['loss']:.6f}"
        )
    ratio = chunked["peak_growth_mb"] / plain["peak_growth_mb"]
    print(f"  chunked / plain peak memory: {ratio:.1%} (target <= 30%)")
    print(f"  |loss difference|: {abs(plain['loss'] - chunked['loss']):.2e}")


if __name__ == "__main__":
    main()
