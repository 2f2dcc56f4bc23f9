"""distill: train a small student model to imitate a large teacher, measure it, and serve it.

Public API (each stage also runs from the CLI as `distill STAGE CONFIG [key=value ...]`):
    load_config(path, overrides)     the typed config
    generate(config)                 teacher outputs into the resumable store (distill.store.read_store)
    train(config)                    student training (online logits, offline top-k, or labels)
    run(config)                      every stage, skipping those whose inputs are unchanged
    demo(run_dir, quick=False)       the built-in math-tutor demo
    evaluate(config)                 teacher vs students: score, fidelity, cost -> run_dir/eval/results.json
    report(config)                   report.md / report.html with plots, model card in each student dir
    export(model_dir, out_dir, ...)  merged HF model + model card, int8 with parity report, ONNX
    serve(model_dir, host, port)     OpenAI-compatible server (distill.serve.build_app for the app alone)
"""

from distill.config import Config, ConfigError, load_config, save_config
from distill.signals import SparseSignal
from distill.generate import generate  # eager (no torch import): binds the function over the submodule name
from distill.evaluate import evaluate  # eager for the same reason: `distill.evaluate` stays the function
from distill.report import report
from distill.export import export  # eager: `distill.export` stays the function (module loads no torch)
from distill.serve import serve  # eager for the same reason
from distill.train import train  # eager for the same reason (imports torch, not transformers.Trainer)
from distill.pipeline import run  # generate -> train -> eval -> report with stage skipping
from distill.demo import demo

__version__ = "0.1.0"

__all__ = ["Config", "ConfigError", "SparseSignal", "demo", "evaluate", "export", "generate", "load_config",
           "report", "run", "save_config", "serve", "train", "__version__"]
