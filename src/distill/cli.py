"""The `distill` command line: one thin command per stage; the work lives in the stage modules.

Run as: `distill --help`, `distill train cfg.yaml train.learning_rate=3e-4`.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from distill.config import load_config
from distill.errors import UserError, bounded, disk_error_message, is_user_error, register

# transformers imports torchao (the int8 extra) on every model load, which logs optional kernels it cannot load
# and torch.compile deprecation notes: noise on every command, not something the user can act on
for _noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])
console = Console(stderr=True)
DEBUG = {"on": False}  # set by --debug (or DISTILL_DEBUG=1): user errors keep their traceback


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"distill {version('distill')}")
        except PackageNotFoundError:
            print("distill (not installed)")
        raise typer.Exit()


@app.callback()
def main(
    debug: bool = typer.Option(False, "--debug", help="full tracebacks for every error (also DISTILL_DEBUG=1)"),
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_version, help="print the version"),
) -> None:
    """Distill a large teacher into a small student. `distill config` lists every setting."""
    DEBUG["on"] = debug or os.environ.get("DISTILL_DEBUG", "") not in ("", "0")

CONFIG_ARG = typer.Argument(..., help="YAML config file", exists=False)
OVERRIDES_ARG = typer.Argument(None, help="dotted overrides, e.g. train.learning_rate=3e-4")


def _config(path: Path, overrides: list[str] | None):
    return load_config(path, overrides or [])


def _is_user_error(exc: BaseException) -> bool:
    """Errors the user can fix: distill's UserError, the backends' and store's own error classes, a file we
    named that is missing (raised with a message, not by the OS), a full or read-only disk."""
    import importlib

    for module, name in (("distill.store.shards", "StoreError"), ("distill.teachers.base", "TeacherError"),
                         ("distill.losses.vocab", "VocabMismatchError")):
        try:  # a moved class must not turn the error report itself into a crash
            register(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    if isinstance(exc, FileNotFoundError) and exc.errno is None:
        return True
    return is_user_error(exc)


class _UserMessage(UserError):
    """A stage's ValueError whose message is known to name the user's option or file."""


def main_guard(fn):
    """A user error is one line (naming the setting or file) and exit code 2; a bug keeps its traceback;
    Ctrl-C says that finished work is kept (exit code 130). `distill --debug` shows every traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            if DEBUG["on"]:
                raise
            console.print("[bold yellow]interrupted:[/] finished work is kept; rerun the same command to resume",
                          highlight=False)
            raise typer.Exit(130) from None
        except Exception as exc:
            if DEBUG["on"] or not _is_user_error(exc):
                raise
            # bounded: a 10,000-item value in a message is not a 30 KB line; escaped: '[/tmp/x]' is text, not markup
            message = escape(bounded(disk_error_message(exc) or str(exc)))
            console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


@app.command()
@main_guard
def generate(
    config: Path = CONFIG_ARG,
    overrides: list[str] | None = OVERRIDES_ARG,
    shard: str | None = typer.Option(None, "--shard", help="'i/n': this worker takes every n-th prompt from i"),
) -> None:
    """Teacher outputs for generate.input into the store (resumable); prints the store path and its stats."""
    from distill.store.shards import StoreError, store_stats
    from distill.teachers import TeacherError
    from distill.teachers.generate import generate as run_generate

    cfg = _config(config, [*(overrides or []), *([f"generate.shard={shard}"] if shard else [])])
    try:
        path = run_generate(cfg)
    except (TeacherError, StoreError) as exc:
        console.print(f"[bold red]error:[/] {escape(bounded(str(exc)))}", highlight=False,
                      soft_wrap=True)  # one line, even when long
        # an unreachable teacher may come back (1: retry later); a damaged or locked store is the user's to fix (2)
        raise typer.Exit(1 if isinstance(exc, TeacherError) else 2) from None
    s = store_stats(path)
    per = f"{s['bytes_per_entry']:.2f} bytes per (token, k) entry (k={s['k']})" if s["bytes_per_entry"] else "no top-k"
    console.print(f"store: {s['rows']} rows, {s['tokens']} tokens, {s['bytes'] / 1e6:.2f} MB in {s['shards']} "
                  f"shards; {per}", highlight=False, soft_wrap=True)
    print(path)


@app.command("config")
@main_guard
def config_(section: str | None = typer.Argument(None, help="a section (train, eval, ...) or dotted key")) -> None:
    """Every config key with its type, default and description (override any of them as key=value)."""
    from distill.config import describe

    rows = describe(section)
    wk = max(len(r[0]) for r in rows)
    wt = min(max(len(r[1]) for r in rows), 26)
    wd = min(max(len(r[2]) for r in rows), 22)
    for key, typ, default, desc in rows:
        print(f"{key:<{wk}}  {typ:<{wt}}  {default:<{wd}}  {desc}".rstrip())


@app.command()
@main_guard
def train(config: Path = CONFIG_ARG, overrides: list[str] | None = OVERRIDES_ARG) -> None:
    """Train the student(s) of CONFIG; writes run_dir/students/NAME (HF format) and its training log.

    Every setting (train.*, student.*, ...) with its type, default and meaning: `distill config train`.
    """
    from distill.training.train import train as run_train

    cfg = _config(config, overrides)
    for out in run_train(cfg):
        console.print(f"[green]student written:[/] {out}")


@app.command()
@main_guard
def run(
    config: Path = CONFIG_ARG,
    overrides: list[str] | None = OVERRIDES_ARG,
    force: bool = typer.Option(False, "--force", help="rerun every stage even when its inputs are unchanged"),
) -> None:
    """generate → train → eval → report; a stage is skipped when its inputs (hashed) are unchanged and its
    outputs are still the files it wrote. Every setting: `distill config`."""
    from distill.pipeline import run as run_pipeline

    cfg = _config(config, overrides)
    outcome = run_pipeline(cfg, force=force)
    console.print("  ".join(f"{k}: {v}" for k, v in outcome.items()), highlight=False)
    print(Path(cfg.run_dir) / "report" / "report.md")


@app.command()
@main_guard
def sweep(
    config: Path = CONFIG_ARG,
    overrides: list[str] | None = OVERRIDES_ARG,
    sizes: str | None = typer.Option(None, "--sizes", help="how many times smaller than the teacher, comma-"
                                        "separated (default: 3,10,30,100, those the teacher's shape can reach)"),
    init: str | None = typer.Option(None, "--init", help="config (fresh) | minitron (cut from the teacher); "
                                       "default: student.init when it is one of them, else config"),
    threshold: float = typer.Option(0.9, "--threshold", help="fraction of the teacher's score the shipped student "
                                    "must keep at the 95% lower bound"),
    force: bool = typer.Option(False, "--force", help="rerun every stage even when its inputs are unchanged"),
) -> None:
    """Which student to ship: one student per size on one store, all evaluated on the same held-out prompts,
    score vs parameters / latency / $ per M tokens in RUN_DIR/sweep/, and the smallest that keeps enough."""
    from distill.size_sweep import sweep as run_sweep

    summary = run_sweep(_config(config, overrides), sizes=sizes, init=init, threshold=threshold, force=force)
    console.print("  ".join(f"{k}: {v}" for k, v in summary["outcome"].items()), highlight=False)
    for warning in summary["warnings"]:
        console.print(f"[bold yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    print(summary["recommendation"]["text"])
    print(summary["markdown"])


@app.command()
@main_guard
def demo(
    quick: bool = typer.Option(False, "--quick", help="a fast smoke run (tiny data, a few steps)"),
    run_dir: Path = typer.Option(Path("runs/demo"), help="where every artifact goes"),
    teacher: Path | None = typer.Option(None, help="another teacher directory (default: the shipped one)"),
    threads: int = typer.Option(2, help="torch CPU threads (pinned for stable timings)"),
    force: bool = typer.Option(False, "--force", help="rerun every stage"),
    seed: int = typer.Option(0, help="draws the problems and seeds the students' init and data order"),
    overrides: list[str] | None = OVERRIDES_ARG,
) -> None:
    """The built-in math-tutor demo: teacher → store → distilled student + labels-only baseline → report."""
    from rich.table import Table

    from distill.recipes.demo import demo as run_demo

    res = run_demo(run_dir, quick=quick, teacher=teacher, threads=threads, force=force, overrides=overrides,
                   seed=seed)
    table = Table(title=f"math tutor: exact match on {res['n_prompts']} held-out problems")
    for col in ("model", "params", "exact match", "% of teacher", "size ratio", "p50 latency ms"):
        table.add_column(col, justify="right")
    t = res["teacher"]
    table.add_row("teacher", f"{t['params']:,}", f"{t['score']:.1%}", "100%", "1x", f"{t['latency_ms_p50']:.1f}")
    for name, s in res["students"].items():
        pct = s.get("percent_of_teacher")
        size = s.get("size_ratio")
        table.add_row(name, f"{s['params']:,}", f"{s['score']:.1%}", "-" if pct is None else f"{pct:.1f}%",
                      "-" if size is None else f"{size:.1f}x", f"{s['latency_ms_p50']:.1f}")
    Console().print(table)
    console.print(f"wall time {res['wall_time_s']:.0f}s; report: {run_dir / 'report' / 'report.html'}", highlight=False)


@app.command("eval")
@main_guard
def eval_(config: Path = CONFIG_ARG, overrides: list[str] | None = OVERRIDES_ARG) -> None:
    """Teacher and students on eval.input: score, % of teacher kept, agreement, KL, speed, memory, $/M tokens."""
    from distill.evaluation.evaluate import evaluate as run_eval
    from distill.teachers import TeacherError

    cfg = _config(config, overrides)
    try:
        run_eval(cfg)
    except TeacherError as exc:  # an API teacher that cannot answer: one line, like `distill generate`
        console.print(f"[bold red]error:[/] {escape(bounded(str(exc)))}", highlight=False)
        raise typer.Exit(1) from None
    print(Path(cfg.run_dir) / "eval" / "results.json")


@app.command()
@main_guard
def report(config: Path = CONFIG_ARG, overrides: list[str] | None = OVERRIDES_ARG) -> None:
    """report.md + self-contained report.html (tables, plots, samples) and a model card in each student dir."""
    from distill.reporting.report import report as run_report

    cfg = _config(config, overrides)
    print(run_report(cfg))


@app.command()
@main_guard
def serve(
    model_dir: Path = typer.Argument(..., help="student directory (HF format, or a LoRA adapter dir)"),
    host: str = typer.Option("127.0.0.1", help="interface to bind; 0.0.0.0 exposes it to the network"),
    port: int = typer.Option(8000, help="TCP port"),
    api_key: str | None = typer.Option(None, help="required bearer key (default: $DISTILL_API_KEY; none if unset)"),
    served_model_name: str | None = typer.Option(None, help="the `model` clients send (default: dir name)"),
    max_batch_size: int = typer.Option(8, help="most rows (prompt x n) generated together"),
    batch_wait_ms: float = typer.Option(5.0, help="how long the batcher waits for more requests"),
    max_prompt_tokens: int | None = typer.Option(None, help="prompt length limit (default: context length)"),
    max_tokens_limit: int = typer.Option(1024, help="largest max_tokens a request may ask for"),
    max_body_bytes: int = typer.Option(1_000_000, help="request body size limit (413 above)"),
    max_request_rows: int = typer.Option(1024, help="most sequences (prompts x n) one request may ask for (400 above)"),
    return_tokens_as_token_ids: bool = typer.Option(
        False, help="logprob tokens as 'token_id:N' unless a request says otherwise (vLLM's flag)"),
    dtype: str = typer.Option("auto", help="auto | float32 | bfloat16 | float16"),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    draft: Path | None = typer.Option(
        None, help="speculative decoding: a smaller model with MODEL_DIR's vocabulary (e.g. its student) drafts, "
        "MODEL_DIR verifies; same output, faster when the draft is accepted often"),
    draft_tokens: int = typer.Option(5, help="draft tokens proposed per verification at first (adapts per row)"),
) -> None:
    """Serve MODEL_DIR behind an OpenAI-compatible API (/v1/completions, /v1/chat/completions, /v1/models)."""
    from distill.serving.serve import serve as run_serve

    run_serve(model_dir, host=host, port=port, api_key=api_key, served_model_name=served_model_name,
              max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms, max_prompt_tokens=max_prompt_tokens,
              max_tokens_limit=max_tokens_limit, max_body_bytes=max_body_bytes, max_request_rows=max_request_rows,
              return_tokens_as_token_ids=return_tokens_as_token_ids, dtype=dtype, device=device, draft=draft,
              draft_tokens=draft_tokens)


@app.command()
@main_guard
def export(
    model_dir: Path = typer.Argument(..., help="student directory (HF format, or a LoRA adapter dir)"),
    out: Path = typer.Option(..., "--out", help="output directory"),
    quantize: str | None = typer.Option(None, help="int8: torchao int8 copy in OUT/int8 + parity report"),
    int8_scheme: str = typer.Option("weight-only", help="int8 (torchao): weight-only | dynamic (int8 activations too)"),
    gguf: bool = typer.Option(False, "--gguf", help="also write OUT/NAME-TYPE.gguf (llama.cpp, Ollama, LM Studio)"),
    gguf_type: str = typer.Option("f16", help="GGUF weights: f16 | q8_0"),
    onnx: bool = typer.Option(False, "--onnx", help="also write OUT/onnx/model.onnx, checked with onnxruntime"),
    prompts: Path | None = typer.Option(None, help="held-out prompts file for the int8 parity report"),
    limit: int = typer.Option(32, help="at most this many held-out prompts"),
) -> None:
    """Merged HF model + model card in OUT; optional int8, GGUF and ONNX, each checked; OUT/export_report.json."""
    from distill.exporting.export import export as run_export

    try:
        report = run_export(model_dir, out, quantize=quantize, onnx=onnx, prompts=prompts, limit=limit, gguf=gguf,
                            gguf_type=gguf_type, int8_scheme=int8_scheme)
    except ValueError as exc:  # export's ValueErrors name the option or file (e.g. --quantize, adapter_config)
        if isinstance(exc, UserError):
            raise
        raise _UserMessage(str(exc)) from exc
    if "int8" in report:
        p = report["int8"]["parity"]
        console.print(f"int8: {report['int8']['size_ratio']:.0%} of the size, greedy-token agreement "
                      f"{p['greedy_token_agreement']:.1%}, top-1 agreement {p['top1_agreement']:.1%}")
    if "gguf" in report:
        console.print(f"gguf: {report['gguf']['path']} ({report['gguf']['type']}), max abs logit diff vs the "
                      f"student {report['gguf']['max_abs_logit_diff']:.2e}")
    if "onnx" in report:
        console.print(f"onnx: max abs diff vs torch {report['onnx']['max_abs_diff']:.2e}")
    print(Path(out) / "export_report.json")


if __name__ == "__main__":
    app()
