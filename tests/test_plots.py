"""The report's plots: tick labels on log axes never overlap (matplotlib labels the minor ticks of a short log
range, and '0.9' ran into '1'), and a short range still gets enough labels to be read."""

from __future__ import annotations

import pytest
from test_report import EVAL_LOG, TRAIN_LOG, make_results

from distill.reporting import plots
from distill.reporting.plots import compact_number, loss_figure


def tick_labels(fig) -> dict[str, list]:
    """Drawn, non-empty tick labels inside each axis' view: {'0x': [(text, bbox), ...], '0y': ...}."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    out = {}
    for i, ax in enumerate(fig.axes):
        for name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
            lo, hi = sorted(axis.get_view_interval())
            labels = []
            for label in axis.get_ticklabels(which="both"):
                at = label.get_position()[0 if name == "x" else 1]
                if label.get_visible() and label.get_text() and lo <= at <= hi:
                    labels.append((label.get_text(), label.get_window_extent(renderer)))
            out[f"{i}{name}"] = labels
    return out


def overlaps(fig) -> list[tuple[str, str]]:
    found = []
    for labels in tick_labels(fig).values():
        found += [(a, b) for k, (a, box) in enumerate(labels) for b, other in labels[k + 1:] if box.overlaps(other)]
    return found


LONG = [{"step": s, "loss": 3.0 / s**0.3, "loss_forward_kl": 2.0 / s**0.3} for s in range(1, 200, 5)]
SHORT = [{"step": s, "loss": 0.9 - 0.001 * s} for s in range(1, 300, 10)]  # 0.6..0.9: a third of a decade


@pytest.mark.parametrize("logs", [{"a": EVAL_LOG, "b": TRAIN_LOG}, {"a": LONG}, {"a": SHORT}],
                         ids=["two-panels", "long", "short"])
def test_loss_plot_log_tick_labels_do_not_overlap(logs):
    fig = loss_figure(logs)
    assert fig.axes[0].get_yscale() == "log"
    assert overlaps(fig) == []
    assert len(tick_labels(fig)["0y"]) >= 2  # still readable: at least two labelled values


def _scatter_figure(results, key, monkeypatch, tmp_path):
    made = []
    real = plots._figure
    monkeypatch.setattr(plots, "_figure", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    plots.plot_scatter(results, key, key, tmp_path / f"{key}.png")
    return made[0]


@pytest.mark.parametrize("spread", [1.5, 10.0, 1e4])
def test_score_scatter_log_tick_labels_do_not_overlap(spread, monkeypatch, tmp_path):
    results = make_results(tmp_path / "run")
    results["teacher"]["params"] = int(1_000_000 * spread)
    results["students"]["baseline"]["params"] = 900_000
    fig = _scatter_figure(results, "params", monkeypatch, tmp_path)
    assert overlaps(fig) == []
    assert len(tick_labels(fig)["0x"]) >= 2


def test_compact_number():
    assert [compact_number(v) for v in (2e6, 2e4, 0.3, 1.5e9, 50.0)] == ["2M", "20k", "0.3", "1.5B", "50"]
