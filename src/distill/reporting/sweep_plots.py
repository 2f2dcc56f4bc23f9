"""The sweep's plot: task score against parameters, p50 latency and $ per million tokens, one panel each, the
teacher marked, every student with its 95% score interval, the Pareto frontier drawn and the recommended
student ringed. Written by `distill sweep` (distill.size_sweep.write_sweep) as RUN_DIR/sweep/sweep.png.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distill.reporting.plots import log_ticks

PANELS = (("params", "parameters (log)"), ("latency_ms_p50", "p50 latency, ms (log)"),
          ("cost_per_million_tokens", "$ per M tokens (log)"))
TEACHER, STUDENT, FRONTIER, PICK = "#555555", "#3b7dd8", "#e07b39", "#2ca02c"


def _panel(ax, rows: list[dict[str, Any]], x_key: str, label: str, frontier: list[str], pick: str | None,
           metric: str) -> None:
    by_name = {r["name"]: r for r in rows}
    for r in rows:
        x, y = r[x_key], r["score"]
        ci = r.get("score_ci")
        err = None if not ci else [[max(0.0, y - ci[0])], [max(0.0, ci[1] - y)]]
        if r["teacher"]:
            ax.errorbar(x, y, yerr=err, fmt="*", markersize=14, color=TEACHER, capsize=3, label="teacher")
        else:
            ax.errorbar(x, y, yerr=err, fmt="o", markersize=7, color=STUDENT, capsize=3)
        if r["name"] == pick:
            ax.scatter([x], [y], s=260, facecolors="none", edgecolors=PICK, linewidths=2, label=f"ship: {pick}",
                       zorder=3)
        ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(6, 6), fontsize="small")
    if len(frontier) > 1:
        ax.plot([by_name[n][x_key] for n in frontier], [by_name[n]["score"] for n in frontier], "--",
                color=FRONTIER, linewidth=1.5, drawstyle="steps-post", label="Pareto frontier", zorder=1)
    ax.set_xscale("log")
    ax.margins(0.2)
    log_ticks(ax, "x")
    ax.set_xlabel(label)
    ax.set_ylabel(metric)
    ax.set_title(f"score vs {label.split(' (')[0].split(',')[0]}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small", loc="lower right")


def plot_sweep(rows: list[dict[str, Any]], frontier: dict[str, list[str]], pick: str | None, metric: str,
               path: Path) -> Path | None:
    """One panel per x axis with data (score and a positive x known); None when no panel has any."""
    from matplotlib.figure import Figure  # no pyplot: no global state

    panels = [(k, label, [r for r in rows if r.get("score") is not None and (r.get(k) or 0) > 0])
              for k, label in PANELS]
    panels = [(k, label, pts) for k, label, pts in panels if pts]
    if not panels:
        return None
    fig = Figure(figsize=(5.2 * len(panels), 4.2), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (key, label, pts) in zip(axes, panels):
        shown = {r["name"] for r in pts}
        _panel(ax, pts, key, label, [n for n in frontier.get(key, []) if n in shown], pick, metric)
    fig.savefig(path)
    return path
