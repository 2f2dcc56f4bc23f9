"""The training stage end to end on tiny random models: it must really move the student towards the teacher."""

import json

import pytest
import torch
from conftest import save_sharp_teacher
from typer.testing import CliRunner

from distill.config import load_config
from distill.data.batching import DistillCollator, tokenize_pair
from distill.training.train import train

TRAIN_TEXT = [
    "Q: Tom has 12 apples. He eats 5. How many apples now? A: 12 - 5 = 7. The answer is 7.",
    "Q: Lily has 43 cards. She finds 19 more. How many cards now? A: 43 + 19 = 62. The answer is 62.",
    "The quick brown fox jumps over the lazy dog.",
    "Distillation trains a small student to imitate a large teacher.",
]
WORDS = ["the", "a", "fox", "dog", "cat", "apples", "cards", "pens", "has", "eats", "finds", "sells", "more", "now", "how", "many", "answer", "is", "Q:", "A:", "+", "-", "=", ".", ","]
WORDS += [str(n) for n in range(0, 100, 7)]


def random_text(n: int, seed: int) -> list[str]:
    """Sentences of random words from one vocabulary: held-out text is new but from the same distribution."""
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 16))) for _ in range(n)]


HELDOUT_TEXT = random_text(16, seed=123)


@pytest.fixture(scope="module")
def sharp_teacher_dir(tmp_path_factory, tokenizer):
    """A random teacher with a scaled-up head, so its next-token distributions are peaked (a clear target)."""
    out = tmp_path_factory.mktemp("sharp_teacher")
    save_sharp_teacher(out, tokenizer, layers=4)
    return out


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def heldout_kl(student, teacher, tokenizer) -> float:
    """Token-mean KL(teacher || student) over held-out text."""
    total, count = 0.0, 0
    for text in HELDOUT_TEXT:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():
            t = torch.log_softmax(teacher(ids).logits.float(), -1)
            s = torch.log_softmax(student(ids).logits.float(), -1)
        total += float((t.exp() * (t - s)).sum(-1).sum())
        count += ids.shape[1]
    return total / count


def _cfg(tmp_path, teacher_dir, data, **train_overrides):
    tree = {
        "run_dir": str(tmp_path / "run"),
        "teacher": {"model": str(teacher_dir)},
        "student": {"init": "config", "config": {"hidden_size": 32, "intermediate_size": 64,
                                                  "num_hidden_layers": 2, "num_attention_heads": 4,
                                                  "num_key_value_heads": 4}},
        "train": {"input": str(data), "signal": "online", "max_steps": 60, "learning_rate": 3e-3,
                  "per_device_train_batch_size": 4, "logging_steps": 10, "save_steps": 1000,
                  "losses": [{"name": "forward_kl"}], **train_overrides},
    }
    return load_config(tree)


def test_online_distillation_halves_heldout_kl(tmp_path, sharp_teacher_dir, tokenizer):
    from distill.modeling import count_parameters, load_model
    from distill.students.build import build_student

    data = _write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in random_text(600, seed=0)])
    cfg = _cfg(tmp_path, sharp_teacher_dir, data, max_steps=150, per_device_train_batch_size=8, learning_rate=3e-3, lr_scheduler_type="constant")
    teacher = load_model(sharp_teacher_dir)
    torch.manual_seed(cfg.seed)
    fresh, _info = build_student(cfg.student, teacher_path=str(sharp_teacher_dir))
    before = heldout_kl(fresh, teacher, tokenizer)

    (out,) = train(cfg)
    student = load_model(out)
    after = heldout_kl(student, teacher, tokenizer)
    assert count_parameters(teacher) >= 4 * count_parameters(student)
    assert after <= 0.5 * before, (before, after)

    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["teacher_params"] == count_parameters(teacher)
    assert summary["student_params"] == count_parameters(student)
    log = json.loads((out / "train_log.json").read_text())
    assert any("loss_forward_kl" in entry for entry in log)
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert (tmp_path / "run" / "config.yaml").exists()


def test_weighted_components_are_logged_and_labels_only_works(tmp_path, sharp_teacher_dir):
    rows = [{"prompt": t.split("A:")[0] + "A:", "response": t.split("A:")[1]} for t in TRAIN_TEXT[:2]] * 4
    data = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = _cfg(tmp_path, sharp_teacher_dir, data, max_steps=4, logging_steps=2,
               losses=[{"name": "cross_entropy", "weight": 0.5}, {"name": "forward_kl", "weight": 0.5}])
    (out,) = train(cfg)
    log = [e for e in json.loads((out / "train_log.json").read_text()) if "loss" in e]
    assert log and all("loss_cross_entropy" in e and "loss_forward_kl" in e for e in log)
    for e in log:  # the logged total is the weighted sum of the logged components
        assert e["loss"] == pytest.approx(0.5 * e["loss_cross_entropy"] + 0.5 * e["loss_forward_kl"], rel=0.02)

    base = _cfg(tmp_path, sharp_teacher_dir, data, max_steps=3, signal="none", losses=[{"name": "cross_entropy"}])
    base = load_config(base.model_dump(mode="json"), ["run_dir=" + str(tmp_path / "baseline")])
    (out2,) = train(base)
    assert (out2 / "model.safetensors").exists()


def _one_sgd_step(tmp_path, teacher_dir, data, batch, accum, tag):
    cfg = _cfg(tmp_path / tag, teacher_dir, data, max_steps=1, per_device_train_batch_size=batch,
               gradient_accumulation_steps=accum, learning_rate=1.0, lr_scheduler_type="constant",
               args={"optim": "sgd", "max_grad_norm": 0.0, "dataloader_drop_last": False,
                     "data_seed": 0},
               losses=[{"name": "forward_kl"}, {"name": "cross_entropy"}])
    from distill.modeling import load_model

    (out,) = train(cfg)
    return load_model(out).state_dict()


def test_gradient_accumulation_equals_one_big_batch(tmp_path, sharp_teacher_dir):
    # sequences of very different lengths: a per-micro-batch mean would weight them differently
    rows = [{"text": TRAIN_TEXT[0]}, {"text": "Hi."}, {"text": TRAIN_TEXT[3]}, {"text": "The answer is 7."}]
    data = _write_jsonl(tmp_path / "gaccum.jsonl", rows)
    big = _one_sgd_step(tmp_path, sharp_teacher_dir, data, batch=4, accum=1, tag="big")
    small = _one_sgd_step(tmp_path, sharp_teacher_dir, data, batch=2, accum=2, tag="small")
    for key in big:
        torch.testing.assert_close(big[key], small[key], rtol=1e-4, atol=1e-5)


def test_resume_from_checkpoint_continues(tmp_path, sharp_teacher_dir):
    data = _write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in TRAIN_TEXT * 4])
    cfg = _cfg(tmp_path, sharp_teacher_dir, data, max_steps=4, save_steps=2, logging_steps=1)
    ckpt_root = tmp_path / "run" / "checkpoints" / "student"
    part = load_config(cfg.model_dump(mode="json"), ["train.max_steps=2"])
    train(part)
    assert (ckpt_root / "checkpoint-2").is_dir()
    (out,) = train(cfg)  # picks up checkpoint-2 and runs steps 3-4 only
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-2")
    assert summary["global_steps"] == 4


def test_offline_sparse_signal_trains(tmp_path, sharp_teacher_dir, tokenizer):
    """Top-k rows from a store: the student moves towards the teacher without a live teacher."""
    from distill.modeling import load_model

    teacher = load_model(sharp_teacher_dir)
    rows = []
    for i, text in enumerate(TRAIN_TEXT * 3):
        prompt, response = text[:10], text[10:]
        ex = tokenize_pair(tokenizer, prompt, response, 128)
        ids = torch.tensor([ex["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(teacher(ids).logits[0, :-1].float(), -1)[ex["prompt_len"] - 1:]
        top = logp.topk(8, dim=-1)
        rows.append({
            "index": i, "prompt": prompt, "response": response,
            "prompt_ids": ex["input_ids"][: ex["prompt_len"]], "response_ids": ex["input_ids"][ex["prompt_len"]:],
            "topk_ids": top.indices.numpy().astype("int32"), "topk_logprobs": top.values.numpy(),
            "tail": (1 - top.values.exp().sum(-1)).clamp_min(0).numpy(),
            "key": f"k{i}", "finish_reason": "stop", "teacher": "hf:tiny",
        })
    from distill.store.shards import Store

    with Store(tmp_path / "run" / "teacher", shard_rows=5) as store:
        for row in rows:
            store.add(row)
    cfg = _cfg(tmp_path, sharp_teacher_dir, "unused", signal="offline", max_steps=40)
    cfg = load_config(cfg.model_dump(mode="json"), ["train.input=null"])
    fresh_kl = None
    (out,) = train(cfg)
    student = load_model(out)
    from distill.students.build import build_student

    torch.manual_seed(cfg.seed)
    fresh, _ = build_student(cfg.student, teacher_path=str(sharp_teacher_dir))
    fresh_kl = heldout_kl(fresh, teacher, tokenizer)
    assert heldout_kl(student, teacher, tokenizer) < fresh_kl


def test_cli_train_and_clear_errors(tmp_path, sharp_teacher_dir):
    from distill.cli import app

    data = _write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in TRAIN_TEXT])
    cfg = _cfg(tmp_path, sharp_teacher_dir, data, max_steps=2)
    cfg_path = tmp_path / "cfg.yaml"
    from distill.config import save_config

    save_config(cfg, cfg_path)
    runner = CliRunner()
    res = runner.invoke(app, ["train", str(cfg_path), "train.max_steps=1"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "run" / "students" / "student" / "model.safetensors").exists()

    res = runner.invoke(app, ["train", str(cfg_path), "train.learnin_rate=1"])
    assert res.exit_code == 2 and "learning_rate" in res.output

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"prompt": "no response here"}\n')
    res = runner.invoke(app, ["train", str(cfg_path), f"train.input={bad}"])
    assert res.exit_code == 2 and "bad.jsonl:2" in res.output and "response" in res.output


def test_collator_pads_with_pad_id(tokenizer):
    batch = DistillCollator(tokenizer.pad_token_id)([tokenize_pair(tokenizer, "a", "b", 16),
                                                    tokenize_pair(tokenizer, "abc def", "b", 16)])
    assert batch["input_ids"].shape[0] == 2


def test_loss_chunking_is_on_by_default():
    from distill.training.train import loss_chunk_size

    assert loss_chunk_size(None) == 1024
    assert loss_chunk_size(0) is None
    assert loss_chunk_size(256) == 256
