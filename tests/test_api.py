import importlib
import inspect


def test_public_api_are_functions_even_after_submodule_imports():
    import distill

    stage_modules = {"train": "training.train", "run": "pipeline", "demo": "recipes.demo",
                     "generate": "teachers.generate", "evaluate": "evaluation.evaluate",
                     "report": "reporting.report", "export": "exporting.export", "serve": "serving.serve",
                     "sweep": "size_sweep"}
    for name, module in stage_modules.items():
        importlib.import_module(f"distill.{module}")
        assert inspect.isfunction(getattr(distill, name)), name
        assert name in distill.__all__


def test_import_does_not_load_the_trainer():
    import subprocess
    import sys

    code = "import distill, sys; print('transformers.trainer' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
