"""`distill report`: report.md, a self-contained report.html, plots and model cards, from eval results."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from test_evaluate import TRAIN_LOG
from typer.testing import CliRunner

from distill.config import load_config, save_config
from distill.reporting.report import loss_series, report, table_rows


def _entry(score, params, p50, **kw):
    base = {
        "path": "x",
        "score": score,
        "n_scored": 4,
        "agreement": None,
        "kl": None,
        "fidelity_note": None,
        "params": params,
        "bytes_on_disk": params * 4,
        "adapter": False,
        "latency_ms_p50": p50,
        "latency_ms_p95": p50 * 1.2,
        "latency_new_tokens": 8,
        "tokens_per_s": 1000.0 / p50,
        "throughput_batch_size": 4,
        "peak_memory_bytes": params * 6,
        "memory_method": "cpu: test",
        "cost_per_million_tokens": 1.0 / 3600 / (1000.0 / p50) * 1e6,
    }
    base.update(kw)
    return base


def make_results(run_dir: Path) -> dict:
    """A results.json as `distill eval` writes it (teacher + two students), and the students' logs."""
    teacher = _entry(0.9, 12_000_000, 50.0, path="org/teacher-model")
    students = {
        "distilled": _entry(
            0.81,
            1_200_000,
            10.0,
            percent_of_teacher=90.0,
            agreement=0.875,
            kl=0.1234,
            speedup=5.0,
            size_ratio=10.0,
            throughput_ratio=5.0,
        ),
        "baseline": _entry(
            0.3,
            1_200_000,
            10.0,
            percent_of_teacher=33.3,
            agreement=0.5,
            kl=0.9,
            speedup=5.0,
            size_ratio=10.0,
            fidelity_note="a note <b>escaped</b>",
        ),
    }
    results = {
        "metric": "exact_match",
        "n_prompts": 4,
        "n_with_reference": 4,
        "eval_input": "eval.jsonl",
        "device": "cpu",
        "dtype": "auto",
        "cost_per_hour": 1.0,
        "teacher": teacher,
        "students": students,
        "samples": [
            {
                "prompt": "Q: 2 + 3? A:",
                "reference": "5",
                "teacher": "2 + 3 = 5. The answer is 5.",
                "students": {"distilled": "The answer is 5.", "baseline": "<script>x</script>"},
            }
        ],
    }
    (run_dir / "eval").mkdir(parents=True)
    (run_dir / "eval" / "results.json").write_text(json.dumps(results))
    for name in students:
        d = run_dir / "students" / name
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
        (d / "train_log.json").write_text(json.dumps(TRAIN_LOG))
    (run_dir / "students" / "baseline" / "train_summary.json").write_text(
        json.dumps({"train_runtime_s": 42.0, "signal": "none", "losses": [{"name": "cross_entropy"}]})
    )
    return results


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("report") / "run"
    results = make_results(run_dir)
    tree = {
        "run_dir": str(run_dir),
        "teacher": {"model": "org/teacher-model"},
        "students": [{"name": "distilled"}, {"name": "baseline", "init": "config"}],
        "train": {"signal": "offline", "learning_rate": 1e-3},
    }
    save_config(load_config(tree), run_dir / "config.yaml")  # the resolved config a run leaves behind
    out = report(load_config({"run_dir": str(run_dir)}))  # training details come from run_dir/config.yaml
    return run_dir, out, results


def test_report_files_and_plots(reported):
    run_dir, out, _ = reported
    assert out == run_dir / "report"
    for name in (
        "report.md",
        "report.html",
        "losses.png",
        "scores.png",
        "score_vs_params.png",
        "score_vs_latency.png",
    ):
        path = out / name
        assert path.exists() and path.stat().st_size > 0, name
    assert (out / "losses.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_markdown_table_and_samples(reported):
    _, out, _ = reported
    md = (out / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| Model"))
    for col in (
        "Score",
        "% of teacher",
        "Agreement",
        "KL",
        "Params",
        "Size (MB)",
        "p50 (ms)",
        "p95 (ms)",
        "Tokens/s",
        "Memory (MB)",
        "$/M tokens",
        "Speedup",
    ):
        assert col in header
    distilled = next(line for line in md.splitlines() if line.startswith("| distilled"))
    assert "| 0.810 | 90.0% | 0.875 | 0.1234 | 1.20M |" in distilled
    assert "| 10.0 | 12.0 | 100 |" in distilled  # p50, p95, tokens/s
    assert "**distilled**: keeps 90.0% of the teacher's exact_match, 10.0x fewer parameters" in md
    assert "![Training losses](losses.png)" in md
    assert "The answer is 5." in md
    assert "signal `none`, losses cross_entropy" in md  # per-student summary overrides the run config
    assert "signal `offline`, losses forward_kl" in md


def test_html_is_self_contained_and_escaped(reported):
    _, out, _ = reported
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4
    assert not re.search(r"""(src|href)\s*=\s*['"]?https?:""", html)
    assert "<link" not in html and "<script>" not in html
    assert "&lt;script&gt;x&lt;/script&gt;" in html
    assert "a note &lt;b&gt;escaped&lt;/b&gt;" in html


def test_model_card_has_the_students_numbers(reported):
    run_dir, _, _ = reported
    card = (run_dir / "students" / "distilled" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "transformers"
    assert front["tags"] == ["distill", "distillation"]
    assert front["base_model"] == "org/teacher-model"
    assert "keeps 90.0% of the teacher's `exact_match` score with 1.20M parameters (10.00x fewer" in card
    assert "| Score | 0.900 | 0.810 |" in card
    assert "| Agreement | — | 0.875 |" in card
    assert "| KL | — | 0.1234 |" in card
    assert "- Losses: forward_kl (weight 1.0, T=1.0)" in card
    assert "Final logged training loss" in card
    assert f"distill serve {run_dir / 'students' / 'distilled'}" in card
    assert "AutoModelForCausalLM.from_pretrained" in card
    baseline = (run_dir / "students" / "baseline" / "README.md").read_text()
    assert "| Score | 0.900 | 0.300 |" in baseline and "Training time: 42 s" in baseline


def test_loss_series_collects_every_component():
    series = loss_series(TRAIN_LOG)
    assert set(series) == {"loss", "loss/forward_kl", "loss/cross_entropy"}
    steps, values = series["loss/forward_kl"]
    assert steps == [e["step"] for e in TRAIN_LOG if "loss/forward_kl" in e]
    assert values[0] == pytest.approx(2.0)


def test_null_figures_render_as_dash(tmp_path):
    results = make_results(tmp_path / "run")
    results["teacher"]["score"] = None
    rows = table_rows(results)
    assert rows[0][0] == "teacher" and rows[0][1] == "—"


def test_report_without_eval_results_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `distill eval CONFIG` first"):
        report(load_config({"run_dir": str(tmp_path / "nothing")}))


def test_cli_report(tmp_path):
    from distill.cli import app

    run_dir = tmp_path / "run"
    make_results(run_dir)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(
        yaml.safe_dump({"run_dir": str(run_dir), "students": [{"name": "distilled"}, {"name": "baseline"}]})
    )
    result = CliRunner().invoke(app, ["report", str(cfg_file)])
    assert result.exit_code == 0, result.output
    assert (run_dir / "report" / "report.html").exists()
    missing = CliRunner().invoke(app, ["report", str(cfg_file), f"run_dir={tmp_path / 'none'}"])
    assert missing.exit_code == 2 and "distill eval" in missing.output


def test_report_from_a_real_evaluation(tmp_path, teacher_dir, tokenizer):
    """End to end on tiny models: eval then report; the card carries the measured numbers."""
    from test_evaluate import make_run_dir

    from distill.evaluation.evaluate import evaluate

    tree = make_run_dir(tmp_path, teacher_dir, tokenizer)
    tree["eval"].update(measure_memory=False, latency_requests=1, metric="rouge_l")
    tree["train"] = {"threads": 1}
    cfg = load_config(tree)
    results = evaluate(cfg)
    out = report(cfg)
    assert (out / "report.html").exists()
    card = (Path(cfg.run_dir) / "students" / "small" / "README.md").read_text()
    small = results["students"]["small"]
    assert f"| Agreement | — | {small['agreement']:.3f} |" in card
    assert (
        f"| p50 (ms) | {results['teacher']['latency_ms_p50']:.1f} | {small['latency_ms_p50']:.1f} |" in card
    )
