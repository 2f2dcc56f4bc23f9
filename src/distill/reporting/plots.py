"""The report's plots (matplotlib, no pyplot state): training and held-out losses on a log scale, the
learning rate, task scores, and score against size and latency.

Each function returns the PNG path it wrote, or None when there is no data for it.
"""

from __future__ import annotations

import math
from pathlib import Path


def loss_series(log: list[dict]) -> dict[str, tuple[list[float], list[float]]]:
    """{'loss': (steps, values), 'loss_forward_kl': ...} for every loss key that has values (older logs named
    the components 'loss/forward_kl': read too)."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for entry in log:
        if "step" not in entry:
            continue
        for key, value in entry.items():
            if (key in ("loss", "eval_loss") or key.startswith(("loss_", "loss/"))) and isinstance(value, (int, float)):
                steps, values = series.setdefault(key, ([], []))
                steps.append(entry["step"])
                values.append(float(value))
    return series


# ---------------------------------------------------------------- plots


def _figure(width: float = 6.0, height: float = 4.0):
    from matplotlib.figure import Figure  # no pyplot: no global state, and Agg renders the PNGs

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def compact_number(value: float) -> str:
    """2000000 -> '2M', 20000 -> '20k', 0.3 -> '0.3': short tick labels."""
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= div:
            return f"{value / div:g}{unit}"
    return f"{value:.3g}"


MAX_LOG_LABELS = 8


def log_ticks(ax, which: str) -> None:
    """Labels on a log axis that cannot collide: powers of 10 over a wide range, 1-2-5 over one or two
    decades, every digit only within a fraction of a decade (at least 3 labels when the range allows); minor
    ticks are marked but never labelled (matplotlib labels them on short ranges: '0.9' ran into '1').
    Call after the data and margins are set: the ticks are fixed for the axis limits then."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

    axis = ax.yaxis if which == "y" else ax.xaxis
    lo, hi = sorted(ax.get_ylim() if which == "y" else ax.get_xlim())
    if lo <= 0:
        return
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    ticks: list[float] = []
    for subs in ((1,), (1, 2, 5), tuple(range(1, 10))):
        ticks = [m * 10.0**e for e in decades for m in subs if lo <= m * 10.0**e * (1 + 1e-9) and m * 10.0**e <= hi]
        if len(ticks) >= 3:
            break
    ticks = ticks[:: math.ceil(len(ticks) / MAX_LOG_LABELS)] if ticks else ticks
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_major_formatter(FuncFormatter(lambda v, _: compact_number(v)))
    axis.set_minor_locator(LogLocator(subs="auto"))
    axis.set_minor_formatter(NullFormatter())


def _log_values(log: list[dict], key: str) -> tuple[list[float], list[float]]:
    pairs = [(e["step"], float(e[key])) for e in log if "step" in e and isinstance(e.get(key), (int, float))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def loss_figure(logs: dict[str, list[dict]]):
    """One panel per student, log y axis (the components differ by orders of magnitude late in training and
    overlap on a linear one): the total training loss bold, its components thin and dashed, the held-out loss
    (`eval_loss`, from train.eval_fraction) as dots. None without any logged loss."""
    with_data = {name: loss_series(log) for name, log in logs.items()}
    with_data = {name: s for name, s in with_data.items() if s}
    if not with_data:
        return None
    fig = _figure(5.0 * len(with_data), 3.6)
    axes = fig.subplots(1, len(with_data), squeeze=False)[0]
    for ax, (name, series) in zip(axes, with_data.items()):
        for key, (steps, values) in sorted(series.items()):
            final = f" (last {values[-1]:.3g})"  # readable even where lines lie on top of each other
            if key == "eval_loss":
                ax.plot(steps, values, "o-", color="#d62728", markersize=4, label="held-out loss" + final)
            elif key == "loss":
                ax.plot(steps, values, color="#222222", linewidth=2, label="training loss" + final)
            else:
                ax.plot(steps, values, "--", linewidth=1, label=key + final)
        if all(v > 0 for _, vs in series.values() for v in vs):
            ax.set_yscale("log")
            log_ticks(ax, "y")
        ax.set_title(f"{name}: losses")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (log)")
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3, which="both")
    return fig


def learning_rate_figure(logs: dict[str, list[dict]]):
    """The learning rate each student was trained at, step by step (warm-up and decay made visible)."""
    curves = {name: _log_values(log, "learning_rate") for name, log in logs.items()}
    curves = {name: c for name, c in curves.items() if c[0]}
    if not curves:
        return None
    fig = _figure(6.0, 3.2)
    ax = fig.subplots()
    for name, (steps, values) in curves.items():
        ax.plot(steps, values, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_title("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return fig


def _save(fig, path: Path) -> Path | None:
    if fig is None:
        return None
    fig.savefig(path)
    return path


def _scored(results: dict) -> list[tuple[str, dict]]:
    models = [("teacher", results["teacher"]), *results["students"].items()]
    return [(n, e) for n, e in models if e.get("score") is not None]


def plot_scores(results: dict, path: Path) -> Path | None:
    models = _scored(results)
    if not models:
        return None
    fig = _figure(max(4.0, 1.2 * len(models) + 2), 3.6)
    ax = fig.subplots()
    names, scores = [n for n, _ in models], [e["score"] for _, e in models]
    bars = ax.bar(names, scores, color=["#555555" if n == "teacher" else "#3b7dd8" for n in names])
    for bar, (name, entry) in zip(bars, models):
        pct = entry.get("percent_of_teacher")
        label = f"{entry['score']:.3f}" + (f"\n{pct:.0f}%" if pct is not None and name != "teacher" else "")
        ax.annotate(
            label,
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize="small",
        )
    ax.set_ylabel(results["metric"])
    ax.set_ylim(0, max(max(scores) * 1.25, 1e-9))
    ax.set_title("task score: teacher vs students")
    fig.savefig(path)
    return path


def plot_scatter(results: dict, x_key: str, x_label: str, path: Path) -> Path | None:
    models = [(n, e) for n, e in _scored(results) if e.get(x_key)]
    if not models:
        return None
    fig = _figure()
    ax = fig.subplots()
    for name, entry in models:
        ax.scatter(entry[x_key], entry["score"], s=60, color="#555555" if name == "teacher" else "#3b7dd8")
        ax.annotate(
            name, (entry[x_key], entry["score"]), textcoords="offset points", xytext=(5, 5), fontsize="small"
        )
    ax.set_xscale("log")
    ax.margins(0.15)
    log_ticks(ax, "x")
    ax.set_xlabel(x_label)
    ax.set_ylabel(results["metric"])
    ax.set_title(f"score vs {x_label.split(' (')[0]}")
    ax.grid(alpha=0.3, which="both")
    fig.savefig(path)
    return path


def make_plots(results: dict, logs: dict[str, list[dict]], out: Path) -> dict[str, Path]:
    """Every plot there is data for: {title: png path}."""
    made = {
        "Training losses": _save(loss_figure(logs), out / "losses.png"),
        "Learning rate": _save(learning_rate_figure(logs), out / "learning_rate.png"),
        "Score: teacher vs students": plot_scores(results, out / "scores.png"),
        "Score vs parameters": plot_scatter(
            results, "params", "parameters (log)", out / "score_vs_params.png"
        ),
        "Score vs latency": plot_scatter(
            results, "latency_ms_p50", "p50 latency, ms (log)", out / "score_vs_latency.png"
        ),
    }
    return {title: p for title, p in made.items() if p is not None}
