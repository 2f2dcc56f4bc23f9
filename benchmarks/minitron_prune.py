"""Minitron pruning of the shipped math-tutor teacher: KL to the teacher right after pruning (no training), for
units chosen by activation importance vs at random vs a fresh random init, at several student shapes.

Run as: `OMP_NUM_THREADS=1 python benchmarks/minitron_prune.py [--calibration 256] [--heldout 64] [--seeds 4]`

Calibration: train-split prompts (no solutions, as `student.calibration` would give); held-out: test-split
prompts with the teacher-style solutions, KL per real token. Lower is closer to the teacher.
"""

from __future__ import annotations

import argparse

import torch

from distill.modeling import count_parameters, load_model
from distill.recipes import math_tutor
from distill.students.minitron import (
    Shape,
    importance,
    kl_to_teacher,
    prune,
    random_importance,
    student_config,
)

SHAPES = {
    "MLP 384->192": Shape(128, 192, 4, 4, 4),
    "hidden 128->64": Shape(64, 384, 4, 4, 4),
    "heads 4->2": Shape(128, 384, 2, 2, 4),
    "layers 4->3": Shape(128, 384, 4, 4, 3),
    "all, 10x (4 layers)": Shape(40, 128, 1, 1, 4),
    "all, 10x (demo shape)": Shape(64, 120, 2, 2, 2),
}


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--calibration", type=int, default=256)
    ap.add_argument("--heldout", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(1)
    path = str(math_tutor.teacher_path())
    teacher = load_model(path, dtype="float32", device="cpu")
    tok = AutoTokenizer.from_pretrained(path)
    calib = [tok(p.prompt)["input_ids"] for p in math_tutor.make_problems(args.calibration, seed=5)]
    held = [tok(p.prompt + p.solution)["input_ids"]
            for p in math_tutor.make_problems(args.heldout, seed=9, split="test")]
    imp = importance(teacher, calib, tok.pad_token_id)
    print(f"teacher {count_parameters(teacher):,} params; layer importance {[round(x, 3) for x in imp.layers.tolist()]}")
    print(f"{'shape':24s} {'params':>8s} {'importance':>10s} {'random (min..max)':>18s} {'fresh':>6s}")
    for name, shape in SHAPES.items():
        student, _ = prune(teacher, shape, imp)
        randoms = [kl_to_teacher(teacher, prune(teacher, shape, random_importance(teacher.config, s))[0], held)
                   for s in range(args.seeds)]
        torch.manual_seed(0)
        fresh = AutoModelForCausalLM.from_config(student_config(teacher.config, shape, list(range(shape.num_hidden_layers))))
        print(f"{name:24s} {count_parameters(student):>8,d} {kl_to_teacher(teacher, student, held):>10.3f} "
              f"{min(randoms):>8.3f}..{max(randoms):<8.3f} {kl_to_teacher(teacher, fresh, held):>6.3f}")


if __name__ == "__main__":
    main()
