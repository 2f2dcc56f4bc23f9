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
from distill.data import DataError

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
    from distill.generate import generate as run_generate
    from distill.store import StoreError, store_stats
    from distill.teachers import TeacherError

    cfg = _config(config, [*(overrides or []), *([f"generate.shard={shard}"] if shard else [])])
    try:
        path = run_generate(cfg)
    except (TeacherError, StoreError) as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
    s = store_stats(path)
    per = f"{s['bytes_per_entry']:.2f} bytes per (token, k) entry (k={s['k']})" if s["bytes_per_entry"] else "no top-k"
    console.print(f"store: {s['rows']} rows, {s['tokens']} tokens, {s['bytes'] / 1e6:.2f} MB in {s['shards']} "
                  f"shards; {per}", highlight=False)
    print(path)


@app.command()
@main_guard
def train(config: Path = CONFIG_ARG, overrides: Optional[List[str]] = OVERRIDES_ARG) -> None:
    """Train the student(s) of CONFIG; writes run_dir/students/NAME (HF format) and its training log."""
    from distill.train import train as run_train

    cfg = _config(config, overrides)
    for out in run_train(cfg):
        console.print(f"[green]student written:[/] {out}")


if __name__ == "__main__":
    app()
