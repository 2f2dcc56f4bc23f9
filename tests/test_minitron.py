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
