"""`distill serve` given something that is not a model, or a port that cannot be bound: one line, exit code 2,
saying what it got and what to serve instead (issues 18 and 21), before any model is loaded."""

from __future__ import annotations

import pytest
from test_serve import save_student
from typer.testing import CliRunner

from distill.cli import app


def _serve(*args: str):
    res = CliRunner().invoke(app, ["serve", *map(str, args)])
    lines = [line for line in res.output.splitlines() if line.strip()]
    return res, lines


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory as `distill run` leaves it: a config, a store and two students."""
    run = tmp_path_factory.mktemp("run")
    (run / "config.yaml").write_text(f"run_dir: {run}\n")
    (run / "teacher").mkdir()
    (run / "teacher" / "store.json").write_text("{}")
    (run / "teacher" / "shards").mkdir()
    for name in ("distilled", "labels-only"):
        save_student(run / "students" / name, hidden=32)
    return run


def test_a_run_dir_names_its_students(run_dir):
    res, lines = _serve(run_dir)
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert "run directory" in lines[0]
    assert str(run_dir / "students" / "distilled") in res.output.replace("\n", "")
    assert str(run_dir / "students" / "labels-only") in res.output.replace("\n", "")


def test_a_config_file_is_refused_naming_the_students(run_dir):
    res, lines = _serve(run_dir / "config.yaml")
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert "config file" in lines[0] and "students" in res.output


def test_a_store_dir_is_refused(run_dir):
    res, lines = _serve(run_dir / "teacher")
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert "teacher store" in lines[0]


def test_an_empty_dir_is_refused(tmp_path):
    res, lines = _serve(tmp_path)
    assert res.exit_code == 2 and len(lines) == 1 and "no model" in lines[0], res.output


@pytest.mark.parametrize("port", ["99999", "-1"])
def test_a_port_out_of_range_is_one_line(run_dir, port):
    res, lines = _serve(run_dir / "students" / "distilled", "--port", port)
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert f"--port {port}" in lines[0] and "65535" in lines[0]
