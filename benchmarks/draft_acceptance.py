"""Acceptance of drafts trained differently: each draft with the same teacher on the same held-out prompts.

Run as: OMP_NUM_THREADS=1 python benchmarks/draft_acceptance.py NAME=DRAFT_DIR [NAME=DRAFT_DIR ...]
        [--teacher src/distill/recipes/math_tutor/teacher] [--prompts runs/demo/data/heldout.jsonl]
        [--n 40] [--max-new-tokens 64] [--rounds 2]

`distill.evaluation.speculative.draft_check` per draft: greedy, batch 1, teacher alone vs teacher + draft
(transformers assisted generation) interleaved per prompt; the drafts take turns within each round, so a busy
machine hits them alike. Prints one markdown row per draft: acceptance (accepted / proposed draft tokens),
tokens per teacher forward, identical outputs, and the speedup in tokens per CPU-second (median over rounds,
with its range). A DRAFT_DIR may be a Trainer checkpoint (no tokenizer: the teacher's is used for prompts).
"""

from __future__ import annotations

import argparse
import statistics

import torch


def main() -> None:
    from transformers import AutoModelForCausalLM

    from distill.data.encoding import encode_prompt
    from distill.data.prompts import load_records, render_prompt
    from distill.evaluation.speculative import draft_check
    from distill.modeling import load_tokenizer_for

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("drafts", nargs="+", help="NAME=DRAFT_DIR")
    ap.add_argument("--teacher", default="src/distill/recipes/math_tutor/teacher")
    ap.add_argument("--prompts", default="runs/demo/data/heldout.jsonl")
    ap.add_argument("--n", type=int, default=40, help="held-out prompts")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)

    tok = load_tokenizer_for(args.teacher)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32).eval()
    drafts = {}
    for spec in args.drafts:
        name, _, path = spec.partition("=")
        drafts[name] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = [encode_prompt(tok, render_prompt(r, None), rendered_with_template=False) for r in load_records(args.prompts, limit=args.n)]
    results: dict[str, list[dict]] = {name: [] for name in drafts}
    for _ in range(args.rounds):
        for name, draft in drafts.items():
            results[name].append(draft_check(teacher, draft, ids, args.max_new_tokens))
    print(f"teacher {args.teacher}, {len(ids)} held-out prompts, {args.max_new_tokens} new tokens, greedy, "
          f"{args.rounds} rounds, 1 thread")
    print("| draft | acceptance | tokens / teacher forward | identical outputs | speedup (tokens per CPU-s) |")
    print("|---|---|---|---|---|")
    for name, runs in results.items():
        r = runs[0]  # acceptance and outputs are deterministic (greedy): the same in every round
        speed = [x["speedup"] for x in runs]
        print(f"| {name} | {r['acceptance']:.3f} | {r['tokens_per_teacher_forward']:.2f} | "
              f"{r['identical']}/{r['n_prompts']} | {statistics.median(speed):.2f}x "
              f"({min(speed):.2f}-{max(speed):.2f}) |")


if __name__ == "__main__":
    main()
