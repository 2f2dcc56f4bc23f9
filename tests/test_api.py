import importlib
import inspect


def test_public_api_are_functions_even_after_submodule_imports():
    import distill

    for name in ("train", "run", "demo", "generate", "evaluate", "report", "export", "serve"):
        importlib.import_module(f"distill.{'pipeline' if name == 'run' else name}")
        assert inspect.isfunction(getattr(distill, name)), name
        assert name in distill.__all__


def test_import_does_not_load_the_trainer():
    import subprocess
    import sys

    code = "import distill, sys; print('transformers.trainer' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
