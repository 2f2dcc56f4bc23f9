"""One example recipe on the demo task: train it, then score greedy exact match and answer agreement.

The methods table in the README: every recipe in examples/recipes/ at one budget on one demo store (run
`distill demo` first). Chain of thought generates its own store (reasoning split) from the demo prompts.
Prints one JSON line: exact match, the teacher's, answer agreement (student answer == teacher answer),
the share of answers that end before 60 tokens, and the training CPU seconds (one thread).

Run as: python benchmarks/recipe_methods.py response_level --store runs/demo/teacher --data runs/demo/data \
            train.max_steps=300
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe", help="a file stem in examples/recipes/")
    ap.add_argument("--store", default="runs/demo/teacher", help="the demo's teacher store")
    ap.add_argument("--data", default="runs/demo/data", help="the demo's data folder (prompts, labelled, heldout)")
    ap.add_argument("--cot-prompts", type=int, default=3000, help="chain of thought: prompts to generate")
    ap.add_argument("--run-dir", default=None)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_intermixed_args()
    torch.set_num_threads(1)

    from distill.config import load_config
    from distill.data.cot import student_prompt
    from distill.modeling import load_model, load_tokenizer_for
    from distill.recipes import math_tutor
    from distill.training.train import train

    data = Path(a.data).resolve()
    over = [f"run_dir={a.run_dir or f'runs/methods/{a.recipe}'}", f"eval.input={data / 'heldout.jsonl'}",
            "train.resume=false", "train.threads=1", "train.save_steps=100000"]
    if a.recipe == "chain_of_thought":
        over += [f"generate.input={data / 'prompts.jsonl'}", f"generate.limit={a.cot_prompts}"]
    elif a.recipe == "labels_only":
        over.append(f"train.input={data / 'labelled.jsonl'}")
    else:
        over.append(f"train.store={Path(a.store).resolve()}")
    cfg = load_config(ROOT / "examples" / "recipes" / f"{a.recipe}.yaml", over + a.overrides)
    if a.recipe == "chain_of_thought":
        from distill.teachers.generate import generate

        generate(cfg)
    cpu = time.process_time()
    (out,) = train(cfg)
    cpu = time.process_time() - cpu

    problems = [json.loads(line) for line in (data / "heldout.jsonl").read_text().splitlines() if line.strip()]
    model, tok = load_model(out).eval(), load_tokenizer_for(str(out))
    preds = math_tutor.greedy_solve(model, tok, [student_prompt(p["prompt"], cfg.train.cot) for p in problems])
    teacher = load_model(cfg.teacher.model).eval()
    tpreds = math_tutor.greedy_solve(teacher, load_tokenizer_for(cfg.teacher.model), [p["prompt"] for p in problems])

    def em(texts):
        return sum(math_tutor.exact_match(t, p["answer"]) for t, p in zip(texts, problems)) / len(problems)

    agree = sum(math_tutor.extract_answer(s) is not None and math_tutor.extract_answer(s) == math_tutor.extract_answer(t)
                for s, t in zip(preds, tpreds)) / len(problems)
    ended = sum(len(tok(t, add_special_tokens=False)["input_ids"]) < 60 for t in preds) / len(preds)
    print(json.dumps({"recipe": a.recipe, "overrides": a.overrides, "exact_match": round(em(preds), 4),
                      "teacher_exact_match": round(em(tpreds), 4), "answer_agreement": round(agree, 4),
                      "ended": round(ended, 4), "train_cpu_s": round(cpu, 1), "sample": preds[0]}))


if __name__ == "__main__":
    main()
