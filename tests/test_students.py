import pytest
import torch
from conftest import make_llama

from distill.config import StudentConfig
from distill.modeling import count_parameters
from distill.students.build import build_student, evenly_spaced, prune_layers


def test_evenly_spaced_keeps_ends():
    assert evenly_spaced(12, 6) == [0, 2, 4, 7, 9, 11]
    assert evenly_spaced(4, 2) == [0, 3]
    assert evenly_spaced(4, 4) == [0, 1, 2, 3]
    assert evenly_spaced(4, 1) == [3]


def test_prune_copies_kept_layers_and_matches_identity_prune():
    teacher = make_llama(300, layers=4)
    full = prune_layers(teacher, [0, 1, 2, 3])
    x = torch.randint(3, 300, (2, 9))
    torch.testing.assert_close(full(x).logits, teacher(x).logits)
    student = prune_layers(teacher, [0, 3])
    assert student.config.num_hidden_layers == 2
    sd_t, sd_s = teacher.state_dict(), student.state_dict()
    torch.testing.assert_close(sd_s["model.layers.1.mlp.up_proj.weight"], sd_t["model.layers.3.mlp.up_proj.weight"])
    torch.testing.assert_close(sd_s["lm_head.weight"], sd_t["lm_head.weight"])
    # generation with the KV cache works on the re-indexed layers
    out = student.generate(x[:, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (2, 7)


def test_build_student_modes(teacher_dir):
    s, info = build_student(StudentConfig(init="prune", num_layers=2), teacher_path=str(teacher_dir))
    assert info.kept_layers == [0, 3] and info.teacher_params > info.student_params
    assert info.compression > 1
    s2, info2 = build_student(
        StudentConfig(init="config", config={"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64}),
        teacher_path=str(teacher_dir),
    )
    assert s2.config.hidden_size == 32 and info2.student_params == count_parameters(s2)
    assert info2.teacher_params == info.teacher_params  # counted from the config, weights not loaded
    s3, info3 = build_student(StudentConfig(init="lora", model=str(teacher_dir)), teacher_path=str(teacher_dir))
    assert 0 < info3.trainable_params < info3.student_params


def test_build_student_errors(teacher_dir):
    import pytest

    with pytest.raises(ValueError, match="no field 'hiden_size'"):
        build_student(StudentConfig(init="config", config={"hiden_size": 8}), teacher_path=str(teacher_dir))
    with pytest.raises(ValueError, match="between 1 and"):
        build_student(StudentConfig(init="prune", num_layers=9), teacher_path=str(teacher_dir))
    with pytest.raises(ValueError, match="student.model"):
        build_student(StudentConfig(init="lora"), teacher_path=str(teacher_dir))
    # a shape the first forward pass would reject mid-training (rotary needs an even head dimension: 52 / 4 = 13)
    with pytest.raises(ValueError, match="head dimension 13 .* must be even .* hidden_size=56"):
        build_student(StudentConfig(init="config", config={"hidden_size": 52, "num_attention_heads": 4,
                                                           "num_key_value_heads": 4}), teacher_path=str(teacher_dir))
    with pytest.raises(ValueError, match="multiple of num_key_value_heads=3"):
        build_student(StudentConfig(init="config", config={"num_attention_heads": 4, "num_key_value_heads": 3}),
                      teacher_path=str(teacher_dir))


def test_config_student_keeps_head_dim_consistent_with_width(tmp_path, tokenizer):
    """A teacher config that spells head_dim out (hidden/heads) must not keep the old head_dim at a new width."""
    teacher = make_llama(len(tokenizer), hidden=64, layers=2, head_dim=16)
    teacher.save_pretrained(tmp_path)
    student, _ = build_student(StudentConfig(init="config", config={"hidden_size": 32}), teacher_path=str(tmp_path))
    assert student.config.head_dim == 8
    assert student.model.layers[0].self_attn.q_proj.weight.shape == (32, 32)
    explicit, _ = build_student(StudentConfig(init="config", config={"hidden_size": 32, "head_dim": 16}),
                                teacher_path=str(tmp_path))
    assert explicit.config.head_dim == 16


# ---------------------------------------------------------------- precision (issue 18): fp32 parameters


@pytest.fixture(scope="module")
def bf16_teacher_dir(tmp_path_factory, tokenizer):
    """A teacher saved in bfloat16 (config.json says so), as most released checkpoints are."""
    out = tmp_path_factory.mktemp("bf16_teacher")
    make_llama(len(tokenizer), hidden=64, layers=4, seed=2).to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize("student", [
    StudentConfig(init="prune", num_layers=2),
    StudentConfig(init="minitron", config={"hidden_size": 32, "intermediate_size": 64}, num_layers=2),
    StudentConfig(init="config", config={"num_hidden_layers": 1}),
], ids=["prune", "minitron", "config"])
def test_students_of_a_bf16_teacher_have_fp32_parameters(bf16_teacher_dir, student):
    from distill.modeling import load_model

    teacher = load_model(bf16_teacher_dir, dtype="bfloat16", device="cpu")  # e.g. teacher.dtype auto on a GPU
    model, _ = build_student(student, teacher=teacher, teacher_path=str(bf16_teacher_dir),
                             calibration=[[1, 5, 9, 11], [1, 7]], pad_id=0)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.config.dtype == torch.float32
    assert next(teacher.parameters()).dtype == torch.bfloat16  # the teacher itself is left as loaded


@pytest.mark.parametrize("args", [{}, {"bf16": True}], ids=["fp32", "autocast_bf16"])
def test_training_a_pruned_student_of_a_bf16_teacher_updates_fp32_weights(tmp_path, bf16_teacher_dir, args):
    """Pure bf16 training would leave every weight a bf16 value; fp32 master weights move off that grid, also
    under the mixed precision a user asks for (train.args bf16: autocast, parameters stay fp32)."""
    import json

    from safetensors.torch import load_file

    from distill.config import load_config
    from distill.training.train import train

    data = tmp_path / "train.jsonl"
    rows = [{"prompt": "Q: 2 + 3? A:", "response": " 5."}, {"prompt": "Q: 4 - 1? A:", "response": " 3."}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config({
        "run_dir": str(tmp_path / "run"),
        "teacher": {"model": str(bf16_teacher_dir), "dtype": "bfloat16"},
        "student": {"init": "prune", "num_layers": 2},
        "train": {"input": str(data), "signal": "online", "max_steps": 2, "learning_rate": 1e-4,
                  "per_device_train_batch_size": 2, "save_steps": 1000, "losses": [{"name": "forward_kl"}],
                  "args": args},
    })
    (out,) = train(cfg)
    weights = load_file(str(out / "model.safetensors"))
    assert {w.dtype for w in weights.values()} == {torch.float32}
    moved = weights["model.layers.0.mlp.up_proj.weight"]
    assert not torch.equal(moved, moved.to(torch.bfloat16).float())  # updated below bf16's resolution
