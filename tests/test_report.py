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
from distill.reporting.report import COLUMNS, loss_series, report, table_rows

# the distilled student's log: training losses and a held-out loss every 10 steps
EVAL_LOG = TRAIN_LOG + [{"step": s, "epoch": s / 40, "eval_loss": 2.5 / s**0.5} for s in (10, 20, 30, 40)]


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


def make_verdict() -> dict:
    """results['verdict'] as `distill eval` stores it, over 20 prompts: the teacher right on 18; 'distilled'
    right on 16 with the teacher's spread of answers; 'baseline' answers '3' on 16 prompts (collapsed)."""
    from distill.evaluation.stats import teacher_check
    from distill.evaluation.verdict import student_verdict

    teacher = [1.0] * 18 + [0.0] * 2
    texts = [f"The answer is {i % 7}." for i in range(20)]
    distilled = [1.0] * 15 + [0.0] * 3 + [1.0, 0.0]
    baseline = [1.0] * 6 + [0.0] * 14
    return {
        "level": 0.95, "seed": 7, "precision_points": 5.0,
        "teacher": teacher_check(0.9, 0.15, 20),
        "students": {
            "distilled": student_verdict(distilled, teacher, texts, texts, r"answer is (\d+)", 7),
            "baseline": student_verdict(baseline, teacher, ["The answer is 3."] * 16 + texts[:4], texts,
                                        r"answer is (\d+)", 7),
        },
    }


def make_results(run_dir: Path) -> dict:
    """A results.json as `distill eval` writes it (teacher + two students), and the students' logs."""
    groups = {"1-step": {"n": 1, "score": 1.0}, "2-step": {"n": 1, "score": 0.0}}
    teacher = _entry(0.9, 12_000_000, 50.0, path="org/teacher-model", latency_noisy=True, latency_spread=0.4,
                     groups=groups, latency_pass_p50_ms=[50.0, 30.0, 70.0])
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
            answer_agreement=0.64,
            speedup_noisy=True,
            latency_spread=0.05,
            latency_pass_p50_ms=[10.0, 10.2, 9.8],  # every pass pairing faster than the noisy teacher's
            groups={"1-step": {"n": 1, "score": 1.0}, "2-step": {"n": 1, "score": 0.5}},
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
            latency_pass_p50_ms=[10.0, 60.0, 9.0],  # one slow pass: the ratio straddles 1, no claim
        ),
    }
    results = {
        "metric": "exact_match",
        "n_prompts": 20,
        "n_with_reference": 20,
        "eval_input": "eval.jsonl",
        "device": "cpu",
        "dtype": "auto",
        "cost_per_hour": 1.0,
        "teacher": teacher,
        "students": students,
        "group_field": "group",
        "samples": [
            {
                "prompt": "Q: 2 + 3? A:",
                "reference": "5",
                "group": "1-step",
                "teacher": "2 + 3 = 5. The answer is 5.",
                "students": {"distilled": "The answer is 5.", "baseline": "<script>x</script>"},
                "scores": {"teacher": 1.0, "distilled": 1.0, "baseline": 0.0},
            },
            {
                "prompt": "Q: 9 - 4 + 2? A:",
                "reference": "7",
                "group": "2-step",
                "teacher": "9 - 4 = 5. 5 + 2 = 8. The answer is 8.",
                "students": {"distilled": "9 - 4 = 5. 5 + 2 = 7. The answer is 7.", "baseline": "The answer is 3."},
                "scores": {"teacher": 0.0, "distilled": 1.0, "baseline": 0.0},
            },
        ],
    }
    results["disagreements"] = {"distilled": [results["samples"][1]], "baseline": results["samples"]}
    results["disagreement_counts"] = {"distilled": 1, "baseline": 9}  # all of them; the lists hold those shown
    results["verdict"] = make_verdict()
    results["provenance"] = {"teacher": "org/teacher-model", "teacher_backend": "hf", "eval_input": "eval.jsonl",
                             "train_input": "prompts.jsonl", "seed": 7, "generate_seed": 0,
                             "generation": {"store": "teacher", "rows": 1000, "tokens": 45_000, "seconds": 87.5,
                                            "api": False}}
    (run_dir / "eval").mkdir(parents=True)
    (run_dir / "eval" / "results.json").write_text(json.dumps(results))
    for name in students:
        d = run_dir / "students" / name
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
        (d / "train_log.json").write_text(json.dumps(TRAIN_LOG if name == "baseline" else EVAL_LOG))
    (run_dir / "students" / "distilled" / "train_summary.json").write_text(
        json.dumps({"global_steps": 40, "epochs": 1.0, "examples": 1000, "tokens_seen": 12_345,
                    "train_runtime_s": 12.5})
    )
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
        "learning_rate.png",
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
    assert "| 0.810 | 90.0% | 0.875 | 0.640 | 0.1234 | 1.20M |" in distilled  # token, then answer agreement
    assert "| 10.0 | 12.0 | ±5% | 100 |" in distilled  # p50, p95, p50 spread over the passes, tokens/s
    assert "**distilled**: keeps 90.0% of the teacher's exact_match, 10.0x fewer parameters" in md
    assert "![Training losses](losses.png)" in md
    assert "The answer is 5." in md
    assert "signal `none`, losses cross_entropy" in md  # per-student summary overrides the run config
    assert "signal `offline`, losses forward_kl" in md


def test_html_is_self_contained_and_escaped(reported):
    _, out, _ = reported
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 5  # losses, learning rate, scores, two scatters
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


def test_noisy_latency_is_flagged(reported):
    _, out, results = reported
    rows = {r[0]: r for r in table_rows(results)}
    p50 = 1 + [key for _, key, _ in COLUMNS].index("latency_ms_p50")
    assert rows["teacher"][p50] == "50.0 (noisy)" and rows["distilled"][p50] == "10.0"
    md = (out / "report.md").read_text()
    assert "5.00x faster at batch 1 (p50; passes 2.94-7.14x)" in md  # the noisy teacher is still slower every time
    baseline = next(line for line in md.splitlines() if line.startswith("- **baseline**: keeps"))
    assert "no measurable latency difference" in baseline and "faster" not in baseline
    speedup = 1 + [key for _, key, _ in COLUMNS].index("speedup")
    assert rows["distilled"][speedup] == "5.00x" and rows["baseline"][speedup] == "5.00x (n.s.)"
    assert "gives the teacher's answer on 64.0% of prompts (token agreement 0.875)" in md


def test_samples_are_marked_right_or_wrong(reported):
    _, out, _ = reported
    md = (out / "report.md").read_text()
    samples = md.split("## Sample outputs")[1]
    second = samples.split("### Sample 2")[1]
    assert "**teacher ✗ wrong**" in second and "**distilled ✓ correct**" in second  # a teacher error is flagged
    assert "**teacher ✓ correct**" in samples.split("### Sample 2")[0]
    html = (out / "report.html").read_text()
    assert "<b class='bad'>teacher ✗ wrong</b>" in html and "<b class='ok'>distilled ✓ correct</b>" in html


def test_error_breakdown_by_group(reported):
    _, out, _ = reported
    md = (out / "report.md").read_text()
    section = md.split("## Score by group")[1].split("\n## ")[0]
    assert "| Group | Prompts | teacher | distilled | baseline |" in section
    assert "| 1-step | 1 | 1.000 | 1.000 | — |" in section
    assert "| 2-step | 1 | 0.000 | 0.500 | — |" in section


def test_disagreement_section_lists_each_students_prompts(reported):
    _, out, _ = reported
    md = (out / "report.md").read_text()
    section = md.split("## Where the students and the teacher disagree")[1].split("\n## ")[0]
    assert section.count("### distilled: example 1 of 1 shown (1 of 20 prompts disagree)") == 1
    assert "### baseline: example 2 of 2 shown (9 of 20 prompts disagree)" in section  # the total, not those shown
    assert "9 - 4 = 5. 5 + 2 = 7. The answer is 7." in section
    assert "**distilled ✓ correct**" in section and "**teacher ✗ wrong**" in section


def test_training_table_shows_what_each_student_saw(reported):
    _, out, _ = reported
    md = (out / "report.md").read_text()
    assert "| Student | Steps | Epochs | Examples | Tokens seen | Time (s) | Final loss | Held-out loss |" in md
    final = TRAIN_LOG[-2]["loss"]
    assert f"| distilled | 40 | 1.00 | 1,000 | 12.35k | 12 | {final:.4f} | {2.5 / 40**0.5:.4f} |" in md
    assert f"| baseline | — | — | — | — | 42 | {final:.4f} | — |" in md


def test_html_notes_have_no_literal_backticks(reported):
    _, out, _ = reported
    html = (out / "report.html").read_text()
    assert "`" not in html
    assert "<code>exact_match</code>" in html and "<code>eval.jsonl</code>" in html
    assert "<b>distilled</b>:" in html  # the summary's markdown bold became a tag


def test_loss_plot_is_log_scale_with_held_out_curve_and_lr_plot(reported):
    from distill.reporting.plots import learning_rate_figure, loss_figure

    _, out, _ = reported
    fig = loss_figure({"distilled": EVAL_LOG, "baseline": TRAIN_LOG})
    first, second = fig.axes[:2]
    assert first.get_yscale() == "log" and second.get_yscale() == "log"
    labels = [line.get_label() for line in first.get_lines()]
    assert f"held-out loss (last {2.5 / 40**0.5:.3g})" in labels
    assert f"training loss (last {TRAIN_LOG[-2]['loss']:.3g})" in labels
    held_out = next(line for line in first.get_lines() if line.get_label().startswith("held-out loss"))
    assert list(held_out.get_xdata()) == [10, 20, 30, 40]
    assert not any(line.get_label().startswith("held-out") for line in second.get_lines())
    lr = learning_rate_figure({"distilled": EVAL_LOG})
    (curve,) = lr.axes[0].get_lines()
    assert list(curve.get_ydata()) == [e["learning_rate"] for e in TRAIN_LOG if "learning_rate" in e]
    assert (out / "learning_rate.png").exists()
    assert learning_rate_figure({"x": [{"step": 1, "loss": 1.0}]}) is None


def test_held_out_loss_and_tokens_seen_from_training(tmp_path, teacher_dir):
    """train.eval_fraction + train.eval_steps give a held-out loss curve in train_log.json; the summary
    records steps, epochs and tokens seen."""
    from distill.training.train import train

    data = tmp_path / "train.jsonl"
    rows = [{"prompt": f"Q: {a} + {b}? A:", "response": f" {a + b}."} for a in range(4) for b in range(4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config({
        "run_dir": str(tmp_path / "run"),
        "teacher": {"model": str(teacher_dir)},
        "student": {"init": "prune", "num_layers": 1},
        "train": {"input": str(data), "signal": "online", "max_steps": 4, "per_device_train_batch_size": 4,
                  "logging_steps": 1, "save_steps": 1000, "eval_fraction": 0.25, "eval_steps": 2, "threads": 1},
    })
    out = train(cfg)[0]
    log = json.loads((out / "train_log.json").read_text())
    assert [e["step"] for e in log if "eval_loss" in e] == [2, 4]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["global_steps"] == 4 and summary["examples"] == 12
    assert summary["epochs"] == pytest.approx(4 * 4 / 12, abs=0.01)
    assert summary["tokens_seen"] > 4 * 4 * 5  # at least five real tokens per example


def test_verdict_section_comes_first_with_warnings_intervals_and_provenance(reported):
    """The verdict opens the report: teacher, data, seed and generation cost named; the collapsed student
    flagged; intervals, the paired test and the precision warning per student; break-even."""
    _, out, _ = reported
    md = (out / "report.md").read_text()
    verdict = md.split("## Verdict")[1].split("\n## ")[0]
    assert md.index("## Verdict") < md.index("## Teacher vs students")
    assert ("Teacher `org/teacher-model` (hf backend); held-out data `eval.jsonl` (20 prompts); training prompts "
            "`prompts.jsonl`; seed 7; generation: 1,000 rows, 45,000 teacher tokens in 88 s.") in verdict
    assert "scores 0.900 vs 0.150 for always giving the most common reference answer" in verdict
    assert "⚠ **baseline collapsed**: gives '3' on 85% of prompts" in verdict  # 16 + texts[3]
    assert "distilled collapsed" not in verdict
    line = next(x for x in verdict.splitlines() if x.startswith("- **distilled**: exact_match"))
    assert "90.0% of the teacher (95% CI " in line and "exact McNemar vs the teacher" in line
    assert "p = 0.625: no significant difference" in line  # b = 1, c = 3: 2 * 5/16
    assert "Too few prompts for this precision" in line
    assert "**baseline**: exact_match 0.300" in verdict and "student worse" in verdict
    # $1/hour x (12.5 s training + 87.5 s generation) / ($13.8889 - $2.7778 per M tokens) = 2.5k tokens
    assert "**distilled** pays for itself after 2.5k served tokens" in verdict
    html = (out / "report.html").read_text()
    assert "<h2>Verdict</h2>" in html and "⚠ <b>baseline collapsed</b>" in html


def test_a_teacher_that_cannot_do_the_task_is_flagged_in_report_and_card(tmp_path):
    from distill.evaluation.stats import teacher_check

    run_dir = tmp_path / "run"
    results = make_results(run_dir)
    results["verdict"]["teacher"] = teacher_check(0.0, 0.15, 20)
    (run_dir / "eval" / "results.json").write_text(json.dumps(results))
    report(load_config({"run_dir": str(run_dir), "students": [{"name": "distilled"}, {"name": "baseline"}]}))
    md = (run_dir / "report" / "report.md").read_text()
    assert "⚠ **The teacher cannot do this task on your data**: the teacher scores 0.000 on 20 prompts" in md
    card = (run_dir / "students" / "distilled" / "README.md").read_text()
    assert "The teacher cannot do this task on your data" in card.split("## Training")[0]


def test_model_card_names_teacher_data_seed_and_claims_no_noisy_speedup(reported):
    run_dir, _, _ = reported
    card = (run_dir / "students" / "baseline" / "README.md").read_text()
    assert "Teacher `org/teacher-model`" in card and "held-out data `eval.jsonl`" in card and "seed 7" in card
    assert "| Speedup | — | no measurable difference |" in card  # a 5.00x from passes that straddle 1
    assert "5.00x" not in card
    assert "⚠ **baseline collapsed**" in card.split("## Training")[0]  # prominent: before the details
    assert "(95% CI " in card
    distilled = (run_dir / "students" / "distilled" / "README.md").read_text()
    assert "| Speedup | — | 5.00x faster |" in distilled


def test_results_from_an_older_eval_still_render(tmp_path):
    """results.json without verdict, provenance, pass timings or disagreement totals: the report is written,
    the speed is not claimed and the lines that need the missing figures are left out."""
    run_dir = tmp_path / "run"
    results = make_results(run_dir)
    for key in ("verdict", "provenance", "disagreement_counts"):
        del results[key]
    for entry in (results["teacher"], *results["students"].values()):
        entry.pop("latency_pass_p50_ms", None)
    (run_dir / "eval" / "results.json").write_text(json.dumps(results))
    out = report(load_config({"run_dir": str(run_dir), "students": [{"name": "distilled"}, {"name": "baseline"}]}))
    md = (out / "report.md").read_text()
    assert "Teacher `org/teacher-model`; held-out data `eval.jsonl` (20 prompts); seed not recorded." in md
    assert "5.00x faster" not in md and "latency not measured" in md
    assert "### baseline: example 1 of 2 shown" in md
