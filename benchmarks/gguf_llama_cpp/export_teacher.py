"""Export the shipped math-tutor teacher to GGUF (f16 and q8_0) and record transformers' greedy answers on 100
held-out problems, for run.mjs to compare llama.cpp against.

Run as: `OMP_NUM_THREADS=1 python benchmarks/gguf_llama_cpp/export_teacher.py OUT_DIR`, then
`node benchmarks/gguf_llama_cpp/run.mjs OUT_DIR` (in a folder with `npm i -E node-llama-cpp@3.21.1`: it ships
prebuilt llama.cpp binaries). Prints the export reports and the transformers exact match.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from distill.exporting.export import export, load_student
from distill.recipes.math_tutor import exact_match, greedy_solve, make_problems, teacher_path


def main(out: Path) -> None:
    torch.set_num_threads(1)
    files = {}
    for kind in ("f16", "q8_0"):
        report = export(teacher_path(), out / f"teacher-{kind}", gguf=True, gguf_type=kind)
        files[kind] = report["gguf"]["path"]
        print(kind, report["gguf"])
    model, tok, _ = load_student(teacher_path(), dtype="float32", device="cpu")
    problems = make_problems(100, seed=0, split="test")
    outs = greedy_solve(model, tok, [p.prompt for p in problems])
    print("transformers exact match", sum(exact_match(o, p.answer) for o, p in zip(outs, problems)) / len(problems))
    rows = [{"prompt": p.prompt, "answer": p.answer, "transformers": o} for p, o in zip(problems, outs)]
    (out / "reference.json").write_text(json.dumps({"files": files, "rows": rows}, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
