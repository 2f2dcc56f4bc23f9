"""One lever of the demo's distilled student, measured on one demo store: what moves exact match.

The lever table in the README: the demo's offline student as it was when the table was measured (top-8
forward KL + CE, 5,000 steps, lr 5e-3 cosine, batch 32, 2 layers x 64 wide, 4 heads of 16; `base`) with one
thing changed at a time (`heads_8` is the demo's student since: the same size with 8 heads), trained on the same store
(run `distill demo` first) and scored greedily on the same held-out problems. Besides exact match it
prints the first logged step whose training loss is under 0.02: the student learns the arithmetic in a
sudden drop of its loss, and a lever that moves that drop earlier is what makes short runs work.

Run as: python benchmarks/demo_levers.py LEVER --store runs/demo/teacher --data runs/demo/data
Levers: see LEVERS below. `--seed N` with seed N's store and data repeats a lever on another seed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

FRESH = {"hidden_size": 64, "intermediate_size": 120, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 4}

# name -> (config overrides as a dict merged into the demo's tree, what it changes). Each keeps the student
# >= 10x smaller than the 865,792-parameter teacher.
LEVERS: dict[str, tuple[dict, str]] = {
    "base": ({}, "the 4-head student the table starts from"),
    "steps_3000": ({"train": {"max_steps": 3000}}, "3,000 steps"),
    "reverse_kl": ({"train": {"losses": [{"name": "reverse_kl", "weight": 0.5},
                                         {"name": "cross_entropy", "weight": 0.5}]}}, "reverse KL + CE"),
    "skew_kl": ({"train": {"losses": [{"name": "skew_forward_kl", "weight": 0.5, "params": {"alpha": 0.1}},
                                      {"name": "cross_entropy", "weight": 0.5}]}}, "skew forward KL (alpha 0.1) + CE"),
    "kl_only": ({"train": {"losses": [{"name": "forward_kl"}]}}, "forward KL alone"),
    # Continuations of the steps_3000 student (--init-from its output): 1,000 more steps on-policy (half the
    # batches sampled by the student and scored by the live teacher, forward KL + CE on the others) vs offline.
    "then_on_policy": ({"train": {"signal": "online", "max_steps": 1000, "learning_rate": 1e-3, "warmup_ratio": 0.0,
                                  "onpolicy": {"lmbda": 0.5, "start_step": 0, "max_new_tokens": 64, "temperature": 1.0}}},
                       "3,000 offline steps, then 1,000 on-policy (lr 1e-3)"),
    "then_offline": ({"train": {"max_steps": 1000, "learning_rate": 1e-3, "warmup_ratio": 0.0}},
                     "3,000 offline steps, then 1,000 more offline (lr 1e-3)"),
    "constant_lr": ({"train": {"lr_scheduler_type": "constant_with_warmup"}}, "constant LR after warmup"),
    "lr_1e-2": ({"train": {"learning_rate": 1e-2}}, "peak LR 1e-2"),
    "lr_2e-3": ({"train": {"learning_rate": 2e-3}}, "peak LR 2e-3"),
    "heads_2": ({"student": {**FRESH, "num_attention_heads": 2, "num_key_value_heads": 2}},
                "2 heads of 32 (the minitron student's shape)"),
    "heads_8": ({"student": {**FRESH, "num_attention_heads": 8, "num_key_value_heads": 8}}, "8 heads of 8"),
    "layers_1": ({"student": {**FRESH, "hidden_size": 88, "intermediate_size": 176, "num_hidden_layers": 1}},
                 "1 layer, width 88"),
    "layers_3": ({"student": {**FRESH, "hidden_size": 56, "intermediate_size": 84, "num_hidden_layers": 3}},
                 "3 layers, width 56 (head dim 14), MLP 84"),
    "prompts_2048": ({"store_rows": 2048}, "2,048 of the 10,000 teacher solutions"),
    "minitron": ({"spec": {"init": "minitron", "num_layers": 2,
                           "config": {**FRESH, "num_attention_heads": 2, "num_key_value_heads": 2}}},
                 "init from the teacher (minitron: 2 of its 4 heads, 64 wide, MLP 120, 2 of 4 layers)"),
    "minitron_4heads": ({"spec": {"init": "minitron", "num_layers": 2,
                                  "config": {**FRESH, "intermediate_size": 36}}},
                        "init from the teacher keeping all 4 heads (head dim 32), 64 wide, MLP 36, 2 of 4 layers"),
}


def subset_store(store: Path, out: Path, rows: int) -> Path:
    """A copy of the store holding only its first shards (`rows` rows): fewer distinct prompts, same teacher."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(store, out)
    for manifest in out.glob("manifest.*.json"):
        data = json.loads(manifest.read_text())
        kept, total = [], 0
        for shard in data["shards"]:
            if total >= rows:
                (out / shard["file"]).unlink()
                continue
            kept.append(shard)
            total += shard["rows"]
        data["shards"] = kept
        manifest.write_text(json.dumps(data, indent=1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("lever", choices=sorted(LEVERS))
    ap.add_argument("--store", default="runs/demo/teacher", help="the demo's teacher store")
    ap.add_argument("--data", default="runs/demo/data", help="the demo's data folder (prompts, heldout)")
    ap.add_argument("--run-dir", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="override the step budget (a smoke run)")
    ap.add_argument("--init-from", default=None, help="start from this trained student (then_* levers)")
    a = ap.parse_args()
    torch.set_num_threads(1)

    from distill.config import load_config
    from distill.modeling import load_model, load_tokenizer_for
    from distill.recipes import math_tutor
    from distill.recipes.demo import demo_config
    from distill.training.train import train

    change, what = LEVERS[a.lever]
    data, store = Path(a.data).resolve(), Path(a.store).resolve()
    run_dir = Path(a.run_dir or f"runs/levers/{a.lever}").resolve()
    tree = demo_config(run_dir, threads=1, seed=a.seed).model_dump(mode="json")
    # demo_config wrote fresh data files into run_dir/data; the store's prompts and held-out set are the demo's.
    tree["generate"]["input"] = str(data / "prompts.jsonl")
    tree["eval"]["input"] = str(data / "heldout.jsonl")
    tree["train"].update({"store": str(store), "resume": False, "save_steps": 100000, "logging_steps": 50})
    tree["train"].update(change.get("train", {}))
    if a.steps:
        tree["train"]["max_steps"] = a.steps
    student = {"name": a.lever, **change.get("spec", {"init": "config", "config": change.get("student", FRESH)})}
    if a.init_from:
        student = {"name": a.lever, "init": "pretrained", "model": str(Path(a.init_from).resolve())}
    if change.get("store_rows"):
        tree["train"]["store"] = str(subset_store(store, run_dir / "store", change["store_rows"]))
    tree["students"] = [student]
    cfg = load_config(tree)

    cpu = time.process_time()
    (out,) = train(cfg)
    cpu = time.process_time() - cpu

    log = json.loads((out / "train_log.json").read_text())
    drop = next((e["step"] for e in log if "loss" in e and e["loss"] < 0.02), None)
    problems = [json.loads(line) for line in (data / "heldout.jsonl").read_text().splitlines() if line.strip()]
    prompts = [p["prompt"] for p in problems]
    preds = math_tutor.greedy_solve(load_model(out).eval(), load_tokenizer_for(str(out)), prompts)
    tpreds = math_tutor.greedy_solve(load_model(cfg.teacher.model).eval(), load_tokenizer_for(cfg.teacher.model), prompts)

    def em(texts: list[str]) -> float:
        return sum(math_tutor.exact_match(t, p["answer"]) for t, p in zip(texts, problems)) / len(problems)

    agree = sum(math_tutor.extract_answer(s) is not None and math_tutor.extract_answer(s) == math_tutor.extract_answer(t)
                for s, t in zip(preds, tpreds)) / len(problems)
    params = sum(p.numel() for p in load_model(out).parameters())
    print(json.dumps({"lever": a.lever, "what": what, "params": params, "exact_match": round(em(preds), 4),
                      "teacher_exact_match": round(em(tpreds), 4), "percent_of_teacher": round(100 * em(preds) / em(tpreds), 1),
                      "answer_agreement": round(agree, 4), "loss_under_0.02_at_step": drop,
                      "final_loss": round([e["loss"] for e in log if "loss" in e][-1], 4),
                      "train_cpu_s": round(cpu, 1)}))


if __name__ == "__main__":
    main()
