"""Built-in recipes: a task generator, its config and the small teacher shipped for it.

Each recipe is a module (the task: problems, answers, scoring) plus a data folder of the same name
(tokenizer, teacher weights, recipe YAML) installed as package data.
"""

from __future__ import annotations

from pathlib import Path

RECIPES_DIR = Path(__file__).resolve().parent


def recipe_dir(name: str) -> Path:
    """The data folder of a built-in recipe, e.g. `recipe_dir("math_tutor") / "teacher"`."""
    path = RECIPES_DIR / name
    if not path.is_dir():
        known = sorted(p.name for p in RECIPES_DIR.iterdir() if p.is_dir() and not p.name.startswith("_"))
        raise FileNotFoundError(f"no built-in recipe '{name}' in {RECIPES_DIR} (known: {', '.join(known)})")
    return path


__all__ = ["RECIPES_DIR", "recipe_dir"]
