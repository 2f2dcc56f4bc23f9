"""`student.init: minitron`: width and depth pruning of the teacher by activation-based importance."""

from __future__ import annotations

import json

import pytest
import torch

from distill.config import StudentConfig, load_config
from distill.modeling import count_parameters, load_model
from distill.recipes import math_tutor
from distill.students.build import build_student
from distill.students.minitron import (
    Shape,
    choose_shape,
    importance,
    kl_to_teacher,
    prune,
    random_importance,
    shape_params,
    student_config,
)


@pytest.fixture(scope="module")
def tutor():
    """The shipped math-tutor teacher (0.87M params, trained), its tokenizer, calibration and held-out ids."""
    from transformers import AutoTokenizer

    path = str(math_tutor.teacher_path())
    teacher = load_model(path, dtype="float32", device="cpu")
    tok = AutoTokenizer.from_pretrained(path)
    calib = [tok(p.prompt)["input_ids"] for p in math_tutor.make_problems(48, seed=5)]
    heldout = [tok(p.prompt + p.solution)["input_ids"] for p in math_tutor.make_problems(24, seed=9, split="test")]
    return teacher, tok, importance(teacher, calib, tok.pad_token_id), heldout


def _kl(teacher, student, ids: list[list[int]]) -> float:
    return kl_to_teacher(teacher, student, ids, 0)


def _gqa_teacher():
    """A tiny random Llama with grouped-query attention: 4 query heads over 2 key/value heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=120, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def test_full_shape_prune_is_the_teacher():
    """Keeping every unit must reproduce the teacher's logits: the slicing keeps units in their order."""
    teacher = _gqa_teacher()
    full = Shape(64, 128, 4, 2, 3)
    ids = [[3, 5, 7, 9, 11, 13], [4, 6, 8]]
    student, kept = prune(teacher, full, importance(teacher, ids, 0))
    assert kept == [0, 1, 2]
    x = torch.randint(3, 120, (2, 7))
    torch.testing.assert_close(student(x).logits, teacher(x).logits)


def test_pruned_shape_runs_and_keeps_gqa_groups_whole():
    teacher = _gqa_teacher()
    imp = random_importance(teacher.config, seed=3)
    imp.heads[:] = torch.tensor([0.0, 1.0])  # every layer keeps key/value group 1 (query heads 2 and 3)
    student, kept = prune(teacher, Shape(32, 40, 2, 1, 2), imp)
    c = student.config
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads) == (32, 40, 2, 1)
    assert c.num_hidden_layers == 2 and c.head_dim == 16 and len(kept) == 2
    hid = torch.topk(imp.hidden, 32).indices.sort().values
    t_layer, s_layer = teacher.model.layers[kept[0]], student.model.layers[0]
    torch.testing.assert_close(s_layer.self_attn.q_proj.weight, t_layer.self_attn.q_proj.weight[32:64][:, hid])
    torch.testing.assert_close(s_layer.self_attn.k_proj.weight, t_layer.self_attn.k_proj.weight[16:32][:, hid])
    torch.testing.assert_close(s_layer.input_layernorm.weight, t_layer.input_layernorm.weight[hid])
    torch.testing.assert_close(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight[:, hid])
    out = student.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


def test_kl_to_teacher_is_zero_for_the_teacher_and_positive_otherwise(tutor):
    teacher, _, _, heldout = tutor
    assert kl_to_teacher(teacher, teacher, heldout) == pytest.approx(0.0, abs=1e-6)
    assert kl_to_teacher(teacher, prune(teacher, Shape(64, 96, 2, 2, 2), random_importance(teacher.config))[0],
                         heldout) > 0.1


def test_tied_embeddings_stay_tied(tutor):
    teacher, _, imp, _ = tutor
    student, _ = prune(teacher, Shape(64, 96, 2, 2, 2), imp)
    assert student.config.tie_word_embeddings
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    assert count_parameters(student) == shape_params(teacher.config, Shape(64, 96, 2, 2, 2))


def test_pruned_student_is_closer_to_the_teacher_than_a_fresh_one(tutor):
    from transformers import AutoModelForCausalLM

    teacher, _, imp, heldout = tutor
    shape = Shape(64, 192, 4, 4, 3)
    pruned, _ = prune(teacher, shape, imp)
    torch.manual_seed(0)
    fresh = AutoModelForCausalLM.from_config(student_config(teacher.config, shape, [0, 1, 2]))
    kl_pruned, kl_fresh = _kl(teacher, pruned, heldout), _kl(teacher, fresh, heldout)
    assert kl_pruned < 0.8 * kl_fresh, (kl_pruned, kl_fresh)


@pytest.mark.parametrize("shape", [Shape(64, 384, 4, 4, 4), Shape(128, 192, 4, 4, 4), Shape(96, 192, 2, 2, 4)])
def test_importance_ranking_beats_random_choice(tutor, shape):
    """Same shape, units chosen by importance vs at random: importance is closer to the teacher than every one
    of three random choices (hidden channels, MLP channels and heads, separately and together)."""
    teacher, _, imp, heldout = tutor
    ranked = _kl(teacher, prune(teacher, shape, imp)[0], heldout)
    randoms = [_kl(teacher, prune(teacher, shape, random_importance(teacher.config, s))[0], heldout) for s in range(3)]
    assert ranked < min(randoms), (ranked, randoms)


def test_layer_importance_drops_the_least_useful_layer(tutor):
    teacher, _, imp, heldout = tutor
    kept = prune(teacher, Shape(128, 384, 4, 4, 3), imp)[1]
    dropped = ({0, 1, 2, 3} - set(kept)).pop()
    kls = {}
    for layer in range(4):
        keep = [i for i in range(4) if i != layer]
        kls[layer] = _kl(teacher, prune(teacher, Shape(128, 384, 4, 4, 3), _with_layers(imp, keep))[0], heldout)
    assert kls[dropped] <= sorted(kls.values())[1], kls  # the chosen layer is among the two cheapest to drop


def _with_layers(imp, keep):
    import dataclasses

    scores = torch.zeros_like(imp.layers)
    scores[keep] = 1.0
    return dataclasses.replace(imp, layers=scores)


def test_choose_shape_fits_the_target_and_the_given_sizes(tutor):
    teacher = tutor[0]
    total = count_parameters(teacher)
    shape = choose_shape(teacher.config, StudentConfig(init="minitron", target_params=total // 10))
    params = shape_params(teacher.config, shape)
    assert total // 12 < params <= total // 10
    assert shape.num_hidden_layers == 4  # width is pruned before depth
    fixed = choose_shape(teacher.config, StudentConfig(init="minitron", num_layers=2, config={"hidden_size": 64},
                                                       target_params=total // 10))
    assert fixed.num_hidden_layers == 2 and fixed.hidden_size == 64
    assert shape_params(teacher.config, fixed) <= total // 10
    exact = choose_shape(teacher.config, StudentConfig(init="minitron", config={"intermediate_size": 100}))
    assert exact == Shape(128, 100, 4, 4, 4)


def test_choose_shape_errors(tutor):
    teacher = tutor[0]
    with pytest.raises(ValueError, match="target_params or sizes"):
        choose_shape(teacher.config, StudentConfig(init="minitron"))
    with pytest.raises(ValueError, match="hidden_size=512: must be between 1"):
        choose_shape(teacher.config, StudentConfig(init="minitron", config={"hidden_size": 512}))
    with pytest.raises(ValueError, match="minitron sets only"):
        choose_shape(teacher.config, StudentConfig(init="minitron", config={"vocab_size": 50}))
    with pytest.raises(ValueError, match="even the narrowest"):
        choose_shape(teacher.config, StudentConfig(init="minitron", target_params=100))
    gqa = _gqa_teacher()
    with pytest.raises(ValueError, match="kept whole"):
        choose_shape(gqa.config, StudentConfig(init="minitron", config={"num_attention_heads": 3}))


def test_build_student_and_train_with_minitron(tmp_path, teacher_dir, prompts_file):
    student, info = build_student(
        StudentConfig(init="minitron", config={"hidden_size": 32, "intermediate_size": 64}, num_layers=2),
        teacher_path=str(teacher_dir), calibration=[[1, 5, 9, 11], [1, 7]], pad_id=0,
    )
    assert student.config.hidden_size == 32 and info.init == "minitron" and len(info.kept_layers) == 2
    assert info.compression > 1 and "calibration prompts" in info.notes[0]
    with pytest.raises(ValueError, match="calibration prompts"):
        build_student(StudentConfig(init="minitron", target_params=10_000), teacher_path=str(teacher_dir))

    from distill.training.train import train

    cfg = load_config({
        "run_dir": str(tmp_path / "run"),
        "teacher": {"model": str(teacher_dir)},
        "student": {"init": "minitron", "target_params": info.teacher_params // 3, "calibration": str(prompts_file),
                    "calibration_samples": 4},
        "train": {"input": str(tmp_path / "train.jsonl"), "signal": "online", "max_steps": 2,
                  "per_device_train_batch_size": 2, "save_steps": 1000, "losses": [{"name": "forward_kl"}]},
    })
    rows = [{"prompt": "Q: 2 + 3? A:", "response": " 5."}, {"prompt": "Q: 4 - 1? A:", "response": " 3."}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = train(cfg)[0]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["init"] == "minitron" and summary["student_params"] <= info.teacher_params // 3
    assert "4 calibration prompts" in summary["notes"][0]


# ---------------------------------------------------------------- shapes that save (issue 18)


def _teacher(cls: str = "Llama", **kw):
    import transformers

    torch.manual_seed(0)
    cfg = getattr(transformers, f"{cls}Config")(max_position_embeddings=64, tie_word_embeddings=True, **kw)
    return getattr(transformers, f"{cls}ForCausalLM")(cfg).eval()


def _cut_and_save(teacher, shape, tmp_path):
    """Cut `shape` out of the teacher, run it, save it: what the first checkpoint does."""
    student, _ = prune(teacher, shape, random_importance(teacher.config))
    assert count_parameters(student) == shape_params(teacher.config, shape)
    out = student(torch.tensor([[1, 5, 9, 3]])).logits
    assert torch.isfinite(out).all()
    student.save_pretrained(tmp_path)  # runs the config's own validation
    return student


def test_all_heads_kept_gives_a_hidden_size_that_saves(tmp_path):
    """SmolLM-135M's attention (9 heads over 3 key/value heads, head_dim 64): with every head kept, main chose
    hidden 104 for this target, and save_pretrained refused it at the first checkpoint."""
    teacher = _teacher(vocab_size=64, hidden_size=576, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=9, num_key_value_heads=3)
    cfg = StudentConfig(init="minitron", target_params=370_000, config={"num_attention_heads": 9})
    student, info = build_student(cfg, teacher=teacher, calibration=[[1, 5, 9, 11], [1, 7]], pad_id=0)
    c = student.config
    assert c.num_attention_heads == 9 and c.hidden_size % 9 == 0 and info.student_params <= 370_000
    student.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["hidden_size"] == c.hidden_size


TEACHERS = {  # family, shape: odd head counts, grouped-query attention, a head_dim wider than hidden / heads
    "llama_9h_gqa3": ("Llama", dict(hidden_size=72, intermediate_size=192, num_hidden_layers=4,
                                    num_attention_heads=9, num_key_value_heads=3)),
    "llama_12h_gqa4": ("Llama", dict(hidden_size=96, intermediate_size=256, num_hidden_layers=3,
                                     num_attention_heads=12, num_key_value_heads=4)),
    "llama_15h_gqa5": ("Llama", dict(hidden_size=120, intermediate_size=320, num_hidden_layers=2,
                                     num_attention_heads=15, num_key_value_heads=5)),
    "qwen3_headdim32": ("Qwen3", dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, head_dim=32,
                                      num_attention_heads=4, num_key_value_heads=2)),
    "mistral_6h": ("Mistral", dict(hidden_size=48, intermediate_size=128, num_hidden_layers=3,
                                   num_attention_heads=6, num_key_value_heads=6)),
}


@pytest.mark.parametrize("name", list(TEACHERS))
def test_every_chosen_shape_builds_runs_and_saves(tmp_path, name):
    """Property: over targets from 5% to 90% of the teacher, with the heads free or all kept, every chosen shape
    is a valid config (hidden a multiple of the heads, whole key/value groups), builds with the predicted
    parameter count, runs and passes save_pretrained; and depth goes before the MLP falls under a quarter."""
    from distill.students.minitron import MIN_WIDTH, teacher_shape

    cls, kw = TEACHERS[name]
    teacher = _teacher(cls, vocab_size=64, **kw)
    t = teacher_shape(teacher.config)
    total = count_parameters(teacher)
    checked = 0
    for fraction in (0.05, 0.12, 0.25, 0.45, 0.9):
        for sizes in ({}, {"num_attention_heads": t.num_attention_heads}):
            cfg = StudentConfig(init="minitron", target_params=int(total * fraction), config=sizes)
            try:
                shape = choose_shape(teacher.config, cfg)
            except ValueError as err:  # only a target below the smallest student may be refused
                assert "even the narrowest" in str(err)
                continue
            assert shape.hidden_size % shape.num_attention_heads == 0
            assert shape.num_attention_heads % shape.num_key_value_heads == 0
            assert shape_params(teacher.config, shape) <= cfg.target_params
            if shape.num_hidden_layers > 1:  # widths at a quarter of the teacher's or more, else fewer layers
                assert shape.intermediate_size >= MIN_WIDTH * t.intermediate_size - 8, shape
            _cut_and_save(teacher, shape, tmp_path / f"{fraction}_{len(sizes)}")
            checked += 1
    assert checked >= 6


def test_small_targets_drop_layers_before_a_narrow_mlp():
    """A 30x target on a teacher whose layers hold most parameters: fewer layers at sane widths, not every
    layer at hidden 16 (main: all 8 layers, hidden 16, MLP 80 on this teacher at this target)."""
    teacher = _teacher(vocab_size=64, hidden_size=128, intermediate_size=512, num_hidden_layers=8,
                       num_attention_heads=4, num_key_value_heads=4)
    shape = choose_shape(teacher.config, StudentConfig(init="minitron", target_params=count_parameters(teacher) // 30))
    assert shape.num_hidden_layers < 8 and shape.hidden_size >= 32 and shape.intermediate_size >= 128, shape


def test_an_invalid_given_shape_is_refused_at_preflight_in_one_line(tmp_path, prompts_file):
    from distill.errors import ConfigError
    from distill.preflight import preflight

    _teacher(vocab_size=64, hidden_size=72, intermediate_size=192, num_hidden_layers=2, num_attention_heads=9,
             num_key_value_heads=3).save_pretrained(tmp_path / "teacher")
    tree = {"run_dir": str(tmp_path / "run"), "teacher": {"model": str(tmp_path / "teacher")},
            "generate": {"input": str(prompts_file)}, "eval": {"input": str(prompts_file)},
            "student": {"init": "minitron", "config": {"hidden_size": 60, "num_attention_heads": 9}}}
    with pytest.raises(ConfigError) as err:
        preflight(load_config(tree))
    message = str(err.value)
    assert "\n" not in message and "student.config" in message and "hidden_size=60" in message, message
    tree["student"]["config"] = {"hidden_size": 36, "num_attention_heads": 9}
    preflight(load_config(tree))  # a valid one passes
    tree["students"] = [{"name": "a", "init": "minitron", "target_params": 10}]
    del tree["student"]
    with pytest.raises(ConfigError, match=r"^students\[0\]\.target_params=10: even the narrowest"):
        preflight(load_config(tree))
