"""distill: train a small student model to imitate a large teacher, measure it, and serve it.

Public API (each stage also runs from the CLI as `distill STAGE CONFIG [key=value ...]`):
    load_config(path, overrides)     the typed config
    generate(config)                 teacher outputs into the resumable store (distill.store.read_store)
    train(config)                    student training (online logits, offline top-k, or labels)
    run(config)                      every stage, skipping those whose inputs are unchanged
    sweep(config, sizes, init, threshold)  one student per size, score vs size/latency/cost, which to ship
    demo(run_dir, quick=False)       the built-in math-tutor demo
    evaluate(config)                 teacher vs students: score, fidelity, cost -> run_dir/eval/results.json
    report(config)                   report.md / report.html with plots, model card in each student dir
    export(model_dir, out_dir, ...)  merged HF model + model card, int8 with parity report, GGUF, ONNX
    serve(model_dir, host, port)     OpenAI-compatible server (distill.serving.serve.build_app: the app alone)
"""

from distill.config import Config, ConfigError, load_config, save_config
from distill.evaluation.evaluate import evaluate
from distill.exporting.export import export
from distill.pipeline import run
from distill.recipes.demo import demo
from distill.reporting.report import report
from distill.serving.serve import serve
from distill.signals import SparseSignal
from distill.size_sweep import sweep
from distill.teachers.generate import generate
from distill.training.train import train

__version__ = "0.1.0"

__all__ = ["Config", "ConfigError", "SparseSignal", "demo", "evaluate", "export", "generate", "load_config",
           "report", "run", "save_config", "serve", "sweep", "train", "__version__"]
