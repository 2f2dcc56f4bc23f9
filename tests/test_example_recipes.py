"""Every shipped recipe under examples/recipes/ loads against the schema and says what its method needs."""

from pathlib import Path

import pytest

from distill.config import load_config
from distill.losses import CROSS_TOKENIZER_LOSSES

RECIPES = Path(__file__).resolve().parents[1] / "examples" / "recipes"
FILES = sorted(RECIPES.glob("*.yaml"))


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_recipe_loads(path):
    cfg = load_config(path)
    assert cfg.run_dir.endswith(path.stem)  # each recipe writes its own run directory
    assert cfg.train.losses and cfg.eval.input


def test_one_recipe_per_method_at_one_student_size():
    cfgs = {p.stem: load_config(p) for p in FILES}
    assert {"labels_only", "response_level", "logit_level", "chain_of_thought", "on_policy"} <= set(cfgs)
    sizes = {str(c.student.config) for name, c in cfgs.items() if name != "cross_tokenizer"}
    assert len(sizes) == 1  # the same student everywhere: the comparison is between methods

    names = {k: {t.name for t in c.train.losses} for k, c in cfgs.items()}
    assert cfgs["labels_only"].train.signal == "none" and cfgs["labels_only"].train.input
    assert cfgs["response_level"].train.signal == "none" and not cfgs["response_level"].train.input
    assert names["response_level"] == {"cross_entropy"}
    assert cfgs["logit_level"].train.signal == "offline" and cfgs["logit_level"].generate.top_k > 0
    cot = cfgs["chain_of_thought"]
    assert cot.generate.reasoning and cot.train.cot.mode == "two_task"
    assert cot.generate.answer_marker in cot.generate.reasoning_prompt
    onp = cfgs["on_policy"]
    assert onp.train.signal == "online" and 0 < onp.train.onpolicy.lmbda <= 1
    assert names["on_policy"] - {"cross_entropy"}
    cross = cfgs["cross_tokenizer"]
    assert names["cross_tokenizer"] - {"cross_entropy"} <= CROSS_TOKENIZER_LOSSES and cross.train.signal == "online"
