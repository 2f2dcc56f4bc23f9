"""Training-budget levers on the real model: fixed steps vs early stopping, SmolLM2-135M-Instruct -> 12.6M student.

Each lever trains the SmolLM2 example's fresh student (examples/smollm2/config.yaml) on one teacher store in its
own process (1 thread), then one `distill eval` scores the teacher and every trained lever on the same held-out
prompts. Prints a table: lever, steps run, score, % of teacher, train CPU seconds (the training process's user +
system time, so other load on a shared machine does not count).

Run as: python benchmarks/smollm2_levers.py --config examples/smollm2/config.yaml \
            --store runs/smollm2/teacher --teacher PATH/SmolLM2-135M-Instruct.Q4_1.gguf --run-dir /tmp/levers
        (--levers steps_150 early_stopping to pick; --no-eval to train levers side by side, then --eval-only)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import yaml

# name -> per-student train overrides; everything else is the example's config
LEVERS: dict[str, dict] = {
    "steps_150": {"max_steps": 150},
    "steps_450": {"max_steps": 450},
    # the held-out loss on a 10% split decides when to stop; 1,500 steps is only the ceiling
    "early_stopping": {"max_steps": 1500, "eval_fraction": 0.1, "eval_steps": 25,
                       "early_stopping": {"enabled": True, "patience": 3}},
}


def lever_config(base: dict, args: argparse.Namespace, names: list[str]) -> dict:
    """The example's tree with absolute paths, our run_dir and one student per lever."""
    tree = json.loads(json.dumps(base))
    tree["run_dir"] = str(args.run_dir)
    tree["teacher"]["model"] = str(args.teacher)
    tree["train"].update(store=str(Path(args.store).resolve()), threads=1)
    tree["eval"].update(input=str(Path(args.heldout).resolve()), latency_requests=2, latency_passes=1,
                        measure_memory=False)
    if ":" in tree["eval"]["metric"]:  # a metric file relative to the repo root
        path, fn = tree["eval"]["metric"].rsplit(":", 1)
        tree["eval"]["metric"] = f"{(Path(args.config).parent.parent.parent / path).resolve()}:{fn}"
    student = {**tree["student"], "model": str(student_base(args))}
    tree["students"] = [{**student, "name": n, "train": LEVERS[n]} for n in names]
    return tree


def student_base(args: argparse.Namespace) -> Path:
    """The GGUF teacher's config and tokenizer as a model directory, the fresh student's base (student.model):
    init=config reads the base config with AutoConfig, which does not open a .gguf file."""
    out = args.run_dir / "student_base"
    if not (out / "config.json").exists():
        from transformers import AutoConfig

        from distill.modeling import load_tokenizer_for

        gguf = Path(args.teacher)
        AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out)
        load_tokenizer_for(str(gguf)).save_pretrained(out)  # the same vocabulary, chat template and BOS rule
    return out


def run(cmd: list[str], log: Path) -> float:
    """Run a distill command; returns its CPU seconds (user + system of the child)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with log.open("w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc:
        sys.exit(f"{' '.join(cmd)} failed (rc {rc}); see {log}")
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="examples/smollm2/config.yaml")
    ap.add_argument("--store", required=True)
    ap.add_argument("--teacher", required=True, help="the teacher GGUF (make_prompts.py --teacher-path)")
    ap.add_argument("--heldout", default="runs/smollm2/data/heldout.jsonl")
    ap.add_argument("--run-dir", type=Path, default=Path("/tmp/smollm2_levers"))
    ap.add_argument("--levers", nargs="*", default=list(LEVERS), choices=list(LEVERS))
    ap.add_argument("--eval-only", action="store_true")
    ap.add_argument("--no-eval", action="store_true", help="train only (levers trained side by side, one eval after)")
    args = ap.parse_args()
    args.run_dir.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load(Path(args.config).read_text())
    distill = [sys.executable, "-m", "distill.cli"]
    if not args.eval_only:
        for name in args.levers:  # one process per lever: its CPU time is its own
            cfg = args.run_dir / f"{name}.yaml"
            cfg.write_text(yaml.safe_dump(lever_config(base, args, [name]), sort_keys=False))
            cpu = round(run([*distill, "train", str(cfg)], args.run_dir / f"{name}.train.log"), 1)
            (args.run_dir / f"{name}.train_cpu_s").write_text(str(cpu))
            print(f"{name}: trained, {cpu} CPU s", flush=True)
    if args.no_eval:
        return
    trained = [n for n in LEVERS if (args.run_dir / "students" / n / "train_summary.json").exists()]
    cfg = args.run_dir / "eval.yaml"
    cfg.write_text(yaml.safe_dump(lever_config(base, args, trained), sort_keys=False))
    run([*distill, "eval", str(cfg)], args.run_dir / "eval.log")
    results = json.loads((args.run_dir / "eval" / "results.json").read_text())
    teacher = results["teacher"]["score"]
    print(f"teacher score {teacher:.3f} on {results['n_prompts']} held-out prompts")
    print("| lever | steps run | score | % of teacher | train CPU s | stop reason (best step) |")
    print("|---|---|---|---|---|---|")
    for name in trained:
        s = json.loads((args.run_dir / "students" / name / "train_summary.json").read_text())
        entry = results["students"][name]
        best = f" (best step {s['best_step']})" if s.get("best_step") else ""
        cpu_file = args.run_dir / f"{name}.train_cpu_s"
        cpu = float(cpu_file.read_text()) if cpu_file.exists() else float("nan")
        pct = entry.get("percent_of_teacher")
        print(f"| {name} | {s['global_steps']} | {entry['score']:.3f} | {pct if pct is None else f'{pct:.0f}%'} "
              f"| {cpu:.0f} | {s.get('stop_reason')}{best} |")


if __name__ == "__main__":
    main()
