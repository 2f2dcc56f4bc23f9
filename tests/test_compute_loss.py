"""DistillationTrainer.compute_loss: what it feeds each registered loss, and the names it logs them under."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_llama

from distill.data.batching import DistillCollator
from distill.training.trainer import DistillationTrainer, LossSpec


def make_trainer(tmp_path: Path, model, losses, **kw) -> DistillationTrainer:
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], per_device_train_batch_size=2,
                             logging_steps=1, max_steps=kw.pop("max_steps", 1), save_strategy="no", learning_rate=1e-3,
                             disable_tqdm=True)  # fmt: skip
    return DistillationTrainer(model=model, args=args, losses=losses, **kw)


def a_batch(vocab: int, batch: int = 2, seq: int = 12, prompt: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = -100
    labels[1, -3:] = -100  # a shorter second row
    attention = (labels != -100) | (torch.arange(seq) < prompt)
    return {"input_ids": ids, "attention_mask": attention.long(), "labels": labels}


def test_cross_entropy_cuts_padded_vocab_rows(tmp_path):
    """Defect 4: with 3 padding rows in the student's embedding, cross_entropy must not spread mass over them."""
    true_vocab = 37
    model = make_llama(true_vocab + 3, hidden=32, seed=3)
    with torch.no_grad():
        model.lm_head.weight[true_vocab:] += 5.0  # padding rows that would take real probability mass
    trainer = make_trainer(tmp_path, model, [LossSpec("cross_entropy")], vocab_size=true_vocab)
    batch = a_batch(true_vocab)
    got = trainer.compute_loss(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    want = F.cross_entropy(logits[..., :true_vocab].reshape(-1, true_vocab), targets.reshape(-1), ignore_index=-100)
    uncut = F.cross_entropy(logits.reshape(-1, true_vocab + 3), targets.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert abs(float(uncut.detach()) - float(want.detach())) > 0.1


def _metric_store(root: Path, names: set[str]) -> None:
    """What MLflow's file store does with metric names: one file per name, '/' making folders."""
    for name in sorted(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("0\n")


def test_no_logged_metric_name_is_a_path_prefix_of_another(tmp_path, tokenizer):
    from distill.data.batching import tokenize_pair

    vocab = len(tokenizer)
    student, teacher = make_llama(vocab, hidden=32, seed=0), make_llama(vocab, hidden=32, seed=1)
    examples = [tokenize_pair(tokenizer, f"q{i}: how many", f"answer {i} is {i * 7}", 64) for i in range(4)]
    losses = [LossSpec("cross_entropy", 0.5), LossSpec("forward_kl", 0.3), LossSpec("jsd", 0.2, params={"beta": 0.3})]
    trainer = make_trainer(tmp_path, student.train(), losses, teacher=teacher, max_steps=2, train_dataset=examples,
                           data_collator=DistillCollator(tokenizer.pad_token_id), processing_class=tokenizer)  # fmt: skip
    trainer.train()
    names = {key for entry in trainer.state.log_history for key in entry}
    assert {"loss", "loss_cross_entropy", "loss_forward_kl", "loss_jsd"} <= names
    clashes = [(a, b) for a in names for b in names if b.startswith(a + "/")]
    assert not clashes, clashes
    _metric_store(tmp_path / "metrics", names)  # raises NotADirectoryError on a clash, as MLflow did


def test_report_reads_new_and_old_component_names():
    from distill.reporting.report import loss_series

    log = [{"step": 1, "loss": 2.0, "loss_forward_kl": 1.5}, {"step": 2, "loss": 1.0, "loss/forward_kl": 0.5}]
    series = loss_series(log)
    assert series["loss_forward_kl"] == ([1], [1.5]) and series["loss/forward_kl"] == ([2], [0.5])


@pytest.mark.parametrize("name", ["hidden_mse", "hidden_cosine"])
def test_hidden_losses_get_hidden_states_from_the_registry_entry(tmp_path, name):
    model, teacher = make_llama(40, hidden=32, seed=0), make_llama(40, hidden=32, seed=1)
    trainer = make_trainer(tmp_path, model, [LossSpec(name)], teacher=teacher)
    batch = a_batch(40)
    got = trainer.compute_loss(model, batch)
    from distill.losses import LOSSES

    s = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    want = LOSSES[name](s.hidden_states, t.hidden_states, batch["labels"] != -100,
                        num_items_in_batch=(batch["labels"][:, 1:] != -100).sum())  # fmt: skip
    torch.testing.assert_close(got, want)
