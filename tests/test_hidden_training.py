"""Hidden-state distillation through the training stage (issue 14, defect 3): a layer_map from config sizes
the projections; combinations without a live teacher are refused at config load; the learned projections
are saved with every checkpoint and restored on resume (with the optimizer state that belongs to them)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_llama

from distill.config import ConfigError, load_config
from distill.training.train import train

TEXT = [
    "Q: Tom has 12 apples. He eats 5. How many apples now? A: 12 - 5 = 7. The answer is 7.",
    "The quick brown fox jumps over the lazy dog.",
    "Distillation trains a small student to imitate a large teacher.",
]
NARROW = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 4}


@pytest.fixture(scope="module")
def hidden_teacher_dir(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("hidden_teacher")
    make_llama(len(tokenizer), hidden=64, layers=4, seed=3).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def _tree(tmp_path, teacher_dir, student=None, **train):
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in TEXT * 4) + "\n")
    return {
        "run_dir": str(tmp_path / "run"),
        "teacher": {"model": str(teacher_dir)},
        "student": student or {"init": "config", "config": NARROW},
        "train": {"input": str(data), "signal": "online", "max_steps": 2, "learning_rate": 1e-3,
                  "per_device_train_batch_size": 4, "logging_steps": 1, "save_steps": 1000, **train},
    }


def _summary_log(out):
    return [e for e in json.loads((out / "train_log.json").read_text()) if "loss" in e]


@pytest.mark.parametrize("layer_map", [None, [[0, 0], [2, 4]]])
def test_hidden_loss_trains_with_and_without_a_layer_map(tmp_path, hidden_teacher_dir, layer_map):
    params = {"layer_map": layer_map} if layer_map else {}
    cfg = load_config(_tree(tmp_path, hidden_teacher_dir, losses=[
        {"name": "forward_kl"}, {"name": "hidden_mse", "weight": 0.5, "params": params}]))
    (out,) = train(cfg)
    log = _summary_log(out)
    assert log and all(e["loss_hidden_mse"] > 0 for e in log)


def test_hidden_loss_with_a_pruned_student(tmp_path, hidden_teacher_dir):
    cfg = load_config(_tree(tmp_path, hidden_teacher_dir, student={"init": "prune", "num_layers": 2},
                            losses=[{"name": "hidden_cosine", "params": {"layer_map": [[1, 1], [2, 4]]}}]))
    (out,) = train(cfg)
    assert all(e["loss_hidden_cosine"] >= 0 for e in _summary_log(out))


def test_hidden_loss_with_a_lora_student_and_onpolicy_batches(tmp_path, hidden_teacher_dir, tokenizer):
    base = tmp_path / "base"
    make_llama(len(tokenizer), hidden=32, layers=1, seed=5).save_pretrained(base)
    tokenizer.save_pretrained(base)
    cfg = load_config(_tree(tmp_path, hidden_teacher_dir, max_steps=3,
                            student={"init": "lora", "model": str(base), "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
                            losses=[{"name": "reverse_kl"}, {"name": "hidden_mse", "weight": 0.5}],
                            onpolicy={"lmbda": 0.5, "max_new_tokens": 4}))
    (out,) = train(cfg)
    assert all(e["loss_hidden_mse"] > 0 for e in _summary_log(out))


@pytest.mark.parametrize("train_section, message", [
    ({"signal": "offline"}, "train.signal=offline"),
    ({"signal": "none"}, "train.signal=none"),
])
def test_hidden_loss_without_a_live_teacher_is_refused_at_config_load(tmp_path, hidden_teacher_dir,
                                                                      train_section, message):
    tree = _tree(tmp_path, hidden_teacher_dir, losses=[{"name": "hidden_mse"}], **train_section)
    with pytest.raises(ConfigError, match=rf"hidden_mse needs the teacher's hidden states.*{message}"):
        load_config(tree)
    tree["train"].update(signal="online")
    tree["teacher"].update(backend="openai")
    with pytest.raises(ConfigError, match="teacher.backend=openai"):
        load_config(tree)


def test_bad_layer_maps_are_refused(tmp_path, hidden_teacher_dir):
    tree = _tree(tmp_path, hidden_teacher_dir, losses=[{"name": "hidden_mse", "params": {"layer_map": [[0]]}}])
    with pytest.raises(ConfigError, match=r"layer_map.*pairs"):
        load_config(tree)
    tree["train"]["losses"] = [{"name": "hidden_mse", "params": {"layer_map": [[0, 0]]}},
                               {"name": "hidden_cosine", "params": {"layer_map": [[1, 1]]}}]
    with pytest.raises(ConfigError, match="the same layer_map"):
        load_config(tree)
    tree["train"]["losses"] = [{"name": "hidden_mse", "params": {"layer_map": [[0, 0], [3, 4]]}}]
    cfg = load_config(tree)  # in range only once the models are known: the student has 3 hidden states
    with pytest.raises(ValueError, match=r"layer_map\[1\] = \(3, 4\).*3 student"):
        train(cfg)


def test_projections_are_checkpointed_and_restored_on_resume(tmp_path, hidden_teacher_dir):
    from safetensors.torch import load_file

    from distill.training.trainer import PROJECTIONS_FILE

    losses = [{"name": "forward_kl"}, {"name": "hidden_mse"}]
    common = {"losses": losses, "save_steps": 2, "lr_scheduler_type": "constant", "learning_rate": 1e-2}
    cfg = load_config(_tree(tmp_path, hidden_teacher_dir, max_steps=2, **common))
    train(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "student" / "checkpoint-2"
    saved = load_file(str(ckpt / PROJECTIONS_FILE))
    assert saved and all(v.abs().sum() > 0 for v in saved.values())

    seen = {}
    import distill.training.trainer as trainer_mod

    real_train = trainer_mod.DistillationTrainer.train

    def spy(self, *args, **kwargs):  # the projections the resumed run starts its step 3 with
        result = None
        original = self.create_optimizer

        def capture(*a, **k):
            opt = original(*a, **k)
            seen["start"] = {k2: v.detach().clone() for k2, v in self.projections.state_dict().items()}
            return opt

        self.create_optimizer = capture
        result = real_train(self, *args, **kwargs)
        seen["end"] = {k2: v.detach().clone() for k2, v in self.projections.state_dict().items()}
        return result

    trainer_mod.DistillationTrainer.train = spy
    try:
        train(load_config(_tree(tmp_path, hidden_teacher_dir, max_steps=3, **common)))
    finally:
        trainer_mod.DistillationTrainer.train = real_train
    for key, value in saved.items():
        assert torch.equal(seen["start"][key], value), key  # restored, not re-initialised
        assert not torch.equal(seen["end"][key], value), key  # and trained on from there
    assert (tmp_path / "run" / "checkpoints" / "student" / "checkpoint-3" / PROJECTIONS_FILE).exists()


def test_projection_gradients_are_clipped_with_the_students(tmp_path, tokenizer):
    """max_grad_norm bounds the global norm of student + learned projections (issue 18: the Trainer clipped only
    the model, so a huge hidden-state loss moved the projections by its full gradient)."""
    import math

    from transformers import TrainerCallback, TrainingArguments

    from distill.data.batching import DistillCollator, tokenize_pair
    from distill.losses import make_projections
    from distill.training.trainer import DistillationTrainer, LossSpec

    teacher = make_llama(len(tokenizer), hidden=64, layers=2, seed=3)
    student = make_llama(len(tokenizer), hidden=32, layers=1, seed=4)
    projections = make_projections(32, 64, 2)  # embeddings and the one layer, onto the teacher's width
    seen = []

    def norm(params) -> float:
        return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))

    class Spy(TrainerCallback):  # the gradients the optimizer is about to apply (after clipping)
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            seen.append((norm(projections.parameters()), norm(student.parameters())))

    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=2,
                             learning_rate=1e-3, max_grad_norm=1.0, logging_steps=1, save_strategy="no",
                             report_to=["none"], use_cpu=True, remove_unused_columns=False, disable_tqdm=True)
    trainer = DistillationTrainer(
        model=student, args=args, train_dataset=[tokenize_pair(tokenizer, "Q: 2 + 3? A:", " 5.", 64)] * 8,
        data_collator=DistillCollator(tokenizer.pad_token_id), processing_class=tokenizer, teacher=teacher,
        losses=[LossSpec("hidden_mse", weight=1e6)], vocab_size=len(tokenizer), projections=projections,
        callbacks=[Spy()],
    )
    trainer.train()
    logged = [e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e]
    assert len(seen) == 2 and min(logged) > 1e3  # the norm before clipping: a huge loss
    for proj, stud in seen:
        assert proj > 0 and math.hypot(proj, stud) <= 1.0 + 1e-4, (proj, stud)
