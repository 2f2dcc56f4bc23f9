"""The `distill` command line: one thin command per stage; the work lives in the stage modules.

Run as: `distill --help`, `distill train cfg.yaml train.learning_rate=3e-4`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from distill.config import ConfigError, load_config
from distill.data.prompts import DataError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])
console = Console(stderr=True)

CONFIG_ARG = typer.Argument(..., help="YAML config file", exists=False)
OVERRIDES_ARG = typer.Argument(None, help="dotted overrides, e.g. train.learning_rate=3e-4")


def _config(path: Path, overrides: Optional[List[str]]):
    return load_config(path, overrides or [])


def main_guard(fn):
    """Turn expected user errors (config, data) into one clear line and exit code 2, not a traceback."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ConfigError, DataError, FileNotFoundError, ValueError) as exc:
            if not isinstance(exc, (ConfigError, DataError)) and "--debug" in sys.argv:
                raise
            console.print(f"[bold red]error:[/] {exc}", highlight=False)
            raise typer.Exit(2) from None

    return wrapper


@app.command()
@main_guard
def generate(
    config: Path = CONFIG_ARG,
    overrides: Optional[List[str]] = OVERRIDES_ARG,
    shard: Optional[str] = typer.Option(None, "--shard", help="'i/n': this worker takes every n-th prompt from i"),
) -> None:
    """Teacher outputs for generate.input into the store (resumable); prints the store path and its stats."""
    from distill.store.shards import StoreError, store_stats
    from distill.teachers import TeacherError
    from distill.teachers.generate import generate as run_generate

    cfg = _config(config, [*(overrides or []), *([f"generate.shard={shard}"] if shard else [])])
    try:
        path = run_generate(cfg)
    except (TeacherError, StoreError) as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
    s = store_stats(path)
    per = f"{s['bytes_per_entry']:.2f} bytes per (token, k) entry (k={s['k']})" if s["bytes_per_entry"] else "no top-k"
    console.print(f"store: {s['rows']} rows, {s['tokens']} tokens, {s['bytes'] / 1e6:.2f} MB in {s['shards']} "
                  f"shards; {per}", highlight=False, soft_wrap=True)
    print(path)


@app.command()
@main_guard
def train(config: Path = CONFIG_ARG, overrides: Optional[List[str]] = OVERRIDES_ARG) -> None:
    """Train the student(s) of CONFIG; writes run_dir/students/NAME (HF format) and its training log."""
    from distill.training.train import train as run_train

    cfg = _config(config, overrides)
    for out in run_train(cfg):
        console.print(f"[green]student written:[/] {out}")


@app.command()
@main_guard
def run(
    config: Path = CONFIG_ARG,
    overrides: Optional[List[str]] = OVERRIDES_ARG,
    force: bool = typer.Option(False, "--force", help="rerun every stage even when its inputs are unchanged"),
) -> None:
    """generate → train → eval → report; stages whose inputs (hashed) are unchanged are skipped."""
    from distill.pipeline import run as run_pipeline

    cfg = _config(config, overrides)
    outcome = run_pipeline(cfg, force=force)
    console.print("  ".join(f"{k}: {v}" for k, v in outcome.items()), highlight=False)
    print(Path(cfg.run_dir) / "report" / "report.md")


@app.command()
@main_guard
def demo(
    quick: bool = typer.Option(False, "--quick", help="a fast smoke run (tiny data, a few steps)"),
    run_dir: Path = typer.Option(Path("runs/demo"), help="where every artifact goes"),
    teacher: Optional[Path] = typer.Option(None, help="another teacher directory (default: the shipped one)"),
    threads: int = typer.Option(2, help="torch CPU threads (pinned for stable timings)"),
    force: bool = typer.Option(False, "--force", help="rerun every stage"),
    seed: int = typer.Option(0, help="draws the problems and seeds the students' init and data order"),
    overrides: Optional[List[str]] = OVERRIDES_ARG,
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
def eval_(config: Path = CONFIG_ARG, overrides: Optional[List[str]] = OVERRIDES_ARG) -> None:
    """Teacher and students on eval.input: score, % of teacher kept, agreement, KL, speed, memory, $/M tokens."""
    from distill.evaluation.evaluate import evaluate as run_eval
    from distill.teachers import TeacherError

    cfg = _config(config, overrides)
    try:
        run_eval(cfg)
    except TeacherError as exc:  # an API teacher that cannot answer: one line, like `distill generate`
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
    print(Path(cfg.run_dir) / "eval" / "results.json")


@app.command()
@main_guard
def report(config: Path = CONFIG_ARG, overrides: Optional[List[str]] = OVERRIDES_ARG) -> None:
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
    api_key: Optional[str] = typer.Option(None, help="required bearer key (default: $DISTILL_API_KEY; none if unset)"),
    served_model_name: Optional[str] = typer.Option(None, help="the `model` clients send (default: dir name)"),
    max_batch_size: int = typer.Option(8, help="most rows (prompt x n) generated together"),
    batch_wait_ms: float = typer.Option(5.0, help="how long the batcher waits for more requests"),
    max_prompt_tokens: Optional[int] = typer.Option(None, help="prompt length limit (default: context length)"),
    max_tokens_limit: int = typer.Option(1024, help="largest max_tokens a request may ask for"),
    max_body_bytes: int = typer.Option(1_000_000, help="request body size limit (413 above)"),
    return_tokens_as_token_ids: bool = typer.Option(
        False, help="logprob tokens as 'token_id:N' unless a request says otherwise (vLLM's flag)"),
    dtype: str = typer.Option("auto", help="auto | float32 | bfloat16 | float16"),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
) -> None:
    """Serve MODEL_DIR behind an OpenAI-compatible API (/v1/completions, /v1/chat/completions, /v1/models)."""
    from distill.serving.serve import serve as run_serve

    run_serve(model_dir, host=host, port=port, api_key=api_key, served_model_name=served_model_name,
              max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms, max_prompt_tokens=max_prompt_tokens,
              max_tokens_limit=max_tokens_limit, max_body_bytes=max_body_bytes,
              return_tokens_as_token_ids=return_tokens_as_token_ids, dtype=dtype, device=device)


@app.command()
@main_guard
def export(
    model_dir: Path = typer.Argument(..., help="student directory (HF format, or a LoRA adapter dir)"),
    out: Path = typer.Option(..., "--out", help="output directory"),
    quantize: Optional[str] = typer.Option(None, help="int8: dynamic int8 copy in OUT/int8 + parity report"),
    onnx: bool = typer.Option(False, "--onnx", help="also write OUT/onnx/model.onnx, checked with onnxruntime"),
    prompts: Optional[Path] = typer.Option(None, help="held-out prompts file for the int8 parity report"),
    limit: int = typer.Option(32, help="at most this many held-out prompts"),
) -> None:
    """Merged HF model + model card in OUT; optional int8 (with parity and sizes) and ONNX; OUT/export_report.json."""
    from distill.exporting.export import export as run_export

    report = run_export(model_dir, out, quantize=quantize, onnx=onnx, prompts=prompts, limit=limit)
    if "int8" in report:
        p = report["int8"]["parity"]
        console.print(f"int8: {report['int8']['size_ratio']:.0%} of the size, greedy-token agreement "
                      f"{p['greedy_token_agreement']:.1%}, top-1 agreement {p['top1_agreement']:.1%}")
    if "onnx" in report:
        console.print(f"onnx: max abs diff vs torch {report['onnx']['max_abs_diff']:.2e}")
    print(Path(out) / "export_report.json")


if __name__ == "__main__":
    app()
