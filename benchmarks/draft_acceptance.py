"""Acceptance of drafts trained differently: each draft with the same teacher on the same held-out prompts.

Run as: OMP_NUM_THREADS=1 python benchmarks/draft_acceptance.py NAME=DRAFT_DIR [NAME=DRAFT_DIR ...]
        [--teacher src/distill/recipes/math_tutor/teacher] [--prompts runs/demo/data/heldout.jsonl]
        [--n 40] [--max-new-tokens 64] [--rounds 2]

`distill.evaluation.speculative.draft_check` per draft: greedy, batch 1, teacher alone vs teacher + draft
(transformers assisted generation) interleaved per prompt; the drafts take turns within each round, so a busy
machine hits them alike. Prints one markdown row per draft: acceptance (accepted / proposed draft tokens),
tokens per teacher forward, identical outputs, and the speedup in tokens per CPU-second (median over rounds,
with its range), for transformers' assisted generation and for the server's engine (`distill serve --draft`:
distill.serving.speculative, each prompt alone, with and without the draft, interleaved). A DRAFT_DIR may be
a Trainer checkpoint (no tokenizer: the teacher's is used for prompts).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def engine_check(engine_plain, engine_draft, prompt_ids, max_new_tokens: int) -> dict:
    """Greedy, one prompt at a time through the serving engine without and with the draft (alternating who goes
    first): identical outputs and the speedup in tokens per CPU-second."""
    from distill.serving.engine import Row, SamplingParams

    seconds, tokens, identical = {"plain": 0.0, "draft": 0.0}, {"plain": 0, "draft": 0}, 0
    for i, ids in enumerate(prompt_ids):
        outs = {}
        for which in (("plain", "draft") if i % 2 == 0 else ("draft", "plain")):
            events: list = []
            row = Row(list(ids), SamplingParams(max_tokens=max_new_tokens, temperature=0), events.append)
            start = time.process_time()
            (engine_plain if which == "plain" else engine_draft).generate([row])
            seconds[which] += time.process_time() - start
            outs[which] = [t.id for ev in events for t in ev.tokens]
            tokens[which] += len(outs[which])
        identical += outs["plain"] == outs["draft"]
    s = engine_draft.stats
    return {"speedup": (tokens["draft"] / seconds["draft"]) / (tokens["plain"] / seconds["plain"]),
            "identical": identical, "tokens_per_teacher_forward": s.verified_tokens / max(s.draft_verifications, 1)}


def main() -> None:
    from transformers import AutoModelForCausalLM

    from distill.data.encoding import encode_prompt
    from distill.data.prompts import load_records, render_prompt
    from distill.evaluation.speculative import draft_check
    from distill.modeling import load_tokenizer_for
    from distill.serving.engine import Engine
    from distill.serving.speculative import Drafter

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
    served: dict[str, list[dict]] = {name: [] for name in drafts}
    for _ in range(args.rounds):
        for name, draft in drafts.items():
            results[name].append(draft_check(teacher, draft, ids, args.max_new_tokens))
            served[name].append(engine_check(Engine(teacher, tok), Engine(teacher, tok, draft=Drafter(draft)), ids,
                                             args.max_new_tokens))
    print(f"teacher {args.teacher}, {len(ids)} held-out prompts, {args.max_new_tokens} new tokens, greedy, "
          f"{args.rounds} rounds, 1 thread")
    print("| draft | acceptance | tokens / teacher forward | identical outputs | speedup, assisted generation "
          "| tokens / teacher forward, serve --draft | identical, serve | speedup, serve --draft |")
    print("|---|---|---|---|---|---|---|---|")
    for name, runs in results.items():
        r, e = runs[0], served[name][0]  # acceptance and outputs are deterministic (greedy): the same every round
        print(f"| {name} | {r['acceptance']:.3f} | {r['tokens_per_teacher_forward']:.2f} | "
              f"{r['identical']}/{r['n_prompts']} | {_spread([x['speedup'] for x in runs])} | "
              f"{e['tokens_per_teacher_forward']:.2f} | {e['identical']}/{r['n_prompts']} | "
              f"{_spread([x['speedup'] for x in served[name]])} |")


def _spread(values: list[float]) -> str:
    """Median over rounds, with the range."""
    return f"{statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f})"


if __name__ == "__main__":
    main()
