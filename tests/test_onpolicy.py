"""On-policy distillation: sampled batches are the student's own, and training on them moves it to the teacher."""

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import make_llama

from distill.config import OnPolicyConfig, load_config
from distill.data.batching import tokenize_pair
from distill.training.onpolicy import (
    SAMPLED_KEY,
    LocalScorer,
    OpenAIScorer,
    prompts_from_batch,
    rebuild_batch,
    sample_completions,
    sampled_reverse_kl,
)

PROMPTS = [f"Q: Tom has {a} apples. He eats {b}. How many apples now? A:" for a, b in
           [(12, 5), (20, 3), (9, 4), (15, 7), (30, 11), (8, 2), (44, 13), (17, 9)]]
SETTINGS = OnPolicyConfig(lmbda=1.0, max_new_tokens=8, temperature=1.0)


@pytest.fixture(scope="module")
def sharp_teacher(tokenizer):
    model = make_llama(len(tokenizer), hidden=64, layers=2, seed=1)
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)
    return model.eval()


def _pairs_file(tmp_path, n=4):
    rows = [{"prompt": p, "response": " The answer is 7."} for p in PROMPTS] * n
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _dense_reverse_kl(student, teacher, prompts, completions) -> float:
    """Token-mean exact KL(student || teacher) over the given sampled sequences."""
    total, count = 0.0, 0
    for p, c in zip(prompts, completions):
        ids = torch.tensor([p + c])
        with torch.no_grad():
            ls = torch.log_softmax(student(input_ids=ids).logits[0, len(p) - 1:-1].float(), -1)
            lt = torch.log_softmax(teacher(input_ids=ids).logits[0, len(p) - 1:-1].float(), -1)
        total += float((ls.exp() * (ls - lt)).sum())
        count += len(c)
    return total / max(count, 1)


def _onpolicy_divergence(student, teacher, tokenizer, seed=123) -> float:
    """Reverse KL to the teacher on the student's own samples of the prompts (fixed seed)."""
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    completions = sample_completions(student, prompts, SETTINGS, tokenizer.pad_token_id, [2], seed=seed)
    return _dense_reverse_kl(student, teacher, prompts, completions)


# ------------------------------------------------------------------------------------------------- units


def test_prompts_and_rebuilt_batch(tokenizer):
    from distill.data.batching import DistillCollator

    exs = [tokenize_pair(tokenizer, p, " The answer is 7.", 64) for p in PROMPTS[:3]]
    batch = DistillCollator(tokenizer.pad_token_id)(exs)
    prompts = prompts_from_batch(batch["input_ids"], batch["labels"])
    assert prompts == [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS[:3]]
    completions = [[5, 6, 2], [7], [8, 9, 10, 11]]
    rebuilt = rebuild_batch(prompts, completions, tokenizer.pad_token_id)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        row = rebuilt["labels"][i]
        assert row[: len(p)].eq(-100).all()
        assert row[len(p): len(p) + len(c)].tolist() == c
        assert rebuilt["input_ids"][i, : len(p) + len(c)].tolist() == p + c
        assert row[len(p) + len(c):].eq(-100).all()


def test_sampled_reverse_kl_value_and_gradient():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 9, requires_grad=True)
    targets = torch.randint(0, 9, (2, 5))
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
    teacher_lp = -torch.rand(2, 5) * 3
    logq = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    diff = logq - teacher_lp
    loss = sampled_reverse_kl(logits, targets, teacher_lp, mask)
    torch.testing.assert_close(loss, diff[mask].sum() / mask.sum())  # value: the Monte-Carlo estimate
    (grad,) = torch.autograd.grad(loss, logits)
    surrogate = (diff.detach() * logq)[mask].sum() / mask.sum()  # gradient: sg(log q - log p) grad log q
    (want,) = torch.autograd.grad(surrogate, logits)
    torch.testing.assert_close(grad, want)
    # a teacher equal to the student: zero value, zero gradient
    same = sampled_reverse_kl(logits, targets, logq.detach(), mask)
    (g0,) = torch.autograd.grad(same, logits)
    assert float(same.detach()) == pytest.approx(0.0, abs=1e-6) and g0.abs().max() < 1e-6


def test_openai_scorer_reads_echoed_prompt_logprobs(tokenizer, sharp_teacher, monkeypatch):
    """OpenAIScorer against a fake client that echoes the local teacher's logprobs: same as LocalScorer."""
    local = LocalScorer(sharp_teacher, tokenizer.pad_token_id)
    calls = []

    def create(model, prompt, max_tokens, echo, logprobs, temperature):
        calls.append({"model": model, "echo": echo, "logprobs": logprobs})
        ids = torch.tensor([prompt])
        with torch.no_grad():
            lp = torch.log_softmax(sharp_teacher(input_ids=ids).logits[0].float(), -1)
        tok_lp = [None] + [float(lp[j - 1, prompt[j]]) for j in range(1, len(prompt))] + [-0.1]
        return SimpleNamespace(choices=[SimpleNamespace(logprobs=SimpleNamespace(token_logprobs=tok_lp))])

    from distill.config import TeacherConfig

    scorer = OpenAIScorer(TeacherConfig(backend="openai", model="teacher", base_url="http://127.0.0.1:9/v1"))
    scorer.pool.clients = [SimpleNamespace(completions=SimpleNamespace(create=create))]  # the pool's one client
    prompts, completions = [[1, 40, 41], [1, 50]], [[7, 8, 2], [9]]
    got = scorer.token_logprobs(prompts, completions)
    want = local.token_logprobs(prompts, completions)
    for g, w in zip(got, want):
        assert g == pytest.approx(w, abs=1e-5)
    assert calls[0] == {"model": "teacher", "echo": True, "logprobs": 0}


# ----------------------------------------------------------------------------------------------- training


def _direct_trainer(tmp_path, student, teacher, tokenizer, data, *, scorer=None, hook=None, steps=30, losses=None, lr=3e-3, batch=8,
                    onpolicy=SETTINGS, **args):
    """A DistillationTrainer built by hand (as train.py does) so tests can pass a hook or a scorer; `args`
    override TrainingArguments."""
    from transformers import TrainingArguments

    from distill.data.batching import DistillCollator
    from distill.training.trainer import DistillationTrainer, LossSpec

    examples = [tokenize_pair(tokenizer, r["prompt"], r["response"], 64)
                for r in map(json.loads, data.read_text().splitlines())]
    args = TrainingArguments(**{"output_dir": str(tmp_path / "out"), "per_device_train_batch_size": batch,
                                "max_steps": steps, "learning_rate": lr, "lr_scheduler_type": "constant",
                                "logging_steps": 5, "save_steps": 10_000, "report_to": ["none"], "use_cpu": True,
                                "remove_unused_columns": False, "seed": 0, "disable_tqdm": True, **args})
    return DistillationTrainer(model=student, args=args, train_dataset=examples,
                               data_collator=DistillCollator(tokenizer.pad_token_id), processing_class=tokenizer,
                               teacher=None if scorer else teacher, losses=losses or [LossSpec("reverse_kl")],
                               vocab_size=len(tokenizer), onpolicy=onpolicy, scorer=scorer, onpolicy_hook=hook)


def test_onpolicy_batches_are_the_students_samples(tmp_path, tokenizer, sharp_teacher):
    student = make_llama(len(tokenizer), hidden=32, layers=1, seed=3)
    data = _pairs_file(tmp_path, n=1)
    seen = []

    def hook(event):
        # what the student itself gives for these prompts with the same seed, straight from HF generate
        model, prompts, seed = event["model"], event["prompts"], event["seed"]
        width = max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
        was = model.training
        model.eval()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0,
                                 top_k=0, max_new_tokens=8, pad_token_id=0, eos_token_id=[2])
        model.train(was)
        expected = []
        for row in out[:, width:].tolist():
            expected.append(row[: row.index(2) + 1] if 2 in row else row)
        seen.append((event["completions"], expected, event["batch"]))

    trainer = _direct_trainer(tmp_path, student, sharp_teacher, tokenizer, data, hook=hook, steps=3)
    trainer.train()
    assert len(seen) == 3
    response_ids = tokenizer(" The answer is 7.", add_special_tokens=False)["input_ids"] + [2]
    for completions, expected, batch in seen:
        assert completions == expected  # the trained-on tokens are exactly the student's samples
        assert all(c != response_ids for c in completions)  # not the dataset's (teacher's) responses
        assert any(len(c) > 1 for c in completions)
        for i, c in enumerate(completions):  # and they are what the batch trains on (labels)
            assert [t for t in batch["labels"][i].tolist() if t != -100] == c


def test_onpolicy_training_lowers_divergence_on_student_samples(tmp_path, tokenizer, teacher_dir):
    """Through `distill.train`: lmbda=1 with a local teacher and reverse KL."""
    from distill.modeling import load_model
    from distill.students.build import build_student
    from distill.training.train import train

    teacher = load_model(teacher_dir)
    with torch.no_grad():  # a sharp teacher (peaked distributions): a clear target
        teacher.lm_head.weight.mul_(10.0)
    sharp_dir = tmp_path / "sharp"
    teacher.save_pretrained(sharp_dir)
    tokenizer.save_pretrained(sharp_dir)
    cfg = load_config({
        "run_dir": str(tmp_path / "run"),
        "teacher": {"model": str(sharp_dir)},
        "student": {"init": "config", "config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                                  "num_attention_heads": 4, "num_key_value_heads": 4}},
        "train": {"input": str(_pairs_file(tmp_path)), "signal": "online", "max_steps": 30, "learning_rate": 3e-3,
                  "per_device_train_batch_size": 8, "logging_steps": 10, "save_steps": 1000,
                  "lr_scheduler_type": "constant", "losses": [{"name": "reverse_kl"}, {"name": "cross_entropy"}],
                  "onpolicy": {"lmbda": 1.0, "max_new_tokens": 8}},
    })
    torch.manual_seed(cfg.seed)
    fresh, _ = build_student(cfg.student, teacher_path=str(sharp_dir))
    before = _onpolicy_divergence(fresh, teacher, tokenizer)
    (out,) = train(cfg)
    after = _onpolicy_divergence(load_model(out), teacher, tokenizer)
    assert after < 0.5 * before, (before, after)
    log = [e for e in json.loads((out / "train_log.json").read_text()) if "loss" in e]
    assert log and all("loss_reverse_kl" in e and "loss_cross_entropy" not in e for e in log)


def test_api_teacher_sampled_reverse_kl_lowers_divergence(tmp_path, tokenizer, sharp_teacher):
    """A scorer (here a local one standing in for an API) gives only sampled-token logprobs."""
    student = make_llama(len(tokenizer), hidden=32, layers=1, seed=4)
    before = _onpolicy_divergence(student, sharp_teacher, tokenizer)
    batches = []
    trainer = _direct_trainer(tmp_path, student, sharp_teacher, tokenizer, _pairs_file(tmp_path),
                              scorer=LocalScorer(sharp_teacher, tokenizer.pad_token_id),
                              hook=lambda e: batches.append(e["batch"]), steps=40, lr=2e-2, batch=16)
    trainer.train()
    after = _onpolicy_divergence(student, sharp_teacher, tokenizer)
    assert all(SAMPLED_KEY in b for b in batches) and len(batches) == 40
    assert after < 0.85 * before, (before, after)
    assert any("loss_sampled_reverse_kl" in e for e in trainer.state.log_history)


def test_onpolicy_with_a_lora_student(tmp_path, tokenizer, teacher_dir, monkeypatch):
    import distill.training.trainer as trainer_mod
    from distill.modeling import load_model
    from distill.training.train import train

    base = tmp_path / "base"
    make_llama(len(tokenizer), hidden=32, layers=1, seed=5).save_pretrained(base)
    tokenizer.save_pretrained(base)
    calls = []
    real = trainer_mod.onpolicy_inputs

    def counting(model, *args, **kwargs):
        calls.append(type(model).__name__)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(trainer_mod, "onpolicy_inputs", counting)
    cfg = load_config({
        "run_dir": str(tmp_path / "run"),
        "teacher": {"model": str(teacher_dir)},
        "student": {"init": "lora", "model": str(base), "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "train": {"input": str(_pairs_file(tmp_path, n=1)), "signal": "online", "max_steps": 4,
                  "learning_rate": 1e-2, "per_device_train_batch_size": 4, "save_steps": 1000,
                  "losses": [{"name": "forward_kl"}], "onpolicy": {"lmbda": 0.5, "max_new_tokens": 6}},
    })
    (out,) = train(cfg)
    assert 1 <= len(calls) <= 4 and all(name.startswith("Peft") for name in calls)
    from peft import PeftModel

    trained = PeftModel.from_pretrained(load_model(base), out)
    lora_b = [p for n, p in trained.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # lora_B starts at 0: it was trained


def test_onpolicy_config_errors(tmp_path, teacher_dir):
    from distill.training.train import train

    cfg = load_config({"run_dir": str(tmp_path / "r"), "teacher": {"model": str(teacher_dir)},
                       "train": {"input": str(_pairs_file(tmp_path)), "signal": "online", "max_steps": 1,
                                 "losses": [{"name": "cross_entropy"}], "onpolicy": {"lmbda": 0.5}}})
    with pytest.raises(ValueError, match="divergence"):
        train(cfg)
    with pytest.raises(Exception, match="lmbda"):
        load_config({"train": {"onpolicy": {"lmbda": 1.5}}})


class BigramTeacher(torch.nn.Module):
    """A teacher that answers every prompt ending in ":" with "7" "." EOS: next token by the previous one alone
    (":" -> "7", "." -> EOS, anything else -> "."), sharp logits. Tiny, exact and it always stops."""

    def __init__(self, tokenizer):
        super().__init__()
        ids = {s: tokenizer(s, add_special_tokens=False)["input_ids"] for s in (":", "7", ".")}
        assert all(len(v) == 1 for v in ids.values())
        colon, seven, dot = ids[":"][0], ids["7"][0], ids["."][0]
        table = torch.full((len(tokenizer), len(tokenizer)), -10.0)
        table[:, dot] = 10.0
        table[colon, dot], table[colon, seven] = -10.0, 10.0
        table[dot, dot], table[dot, tokenizer.eos_token_id] = -10.0, 10.0
        self.table = torch.nn.Embedding.from_pretrained(table, freeze=True)

    def forward(self, input_ids, attention_mask=None, **_):
        return SimpleNamespace(logits=self.table(input_ids))


def _stops(student, tokenizer, prompts, max_new_tokens=8) -> float:
    """Share of greedy completions that end with EOS within max_new_tokens."""
    from distill.data.batching import left_pad

    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    with torch.no_grad():
        out = student.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return sum(tokenizer.eos_token_id in row for row in out[:, ids.shape[1]:].tolist()) / len(prompts)


@pytest.mark.parametrize("pad", ["pad", "eos"])
def test_onpolicy_student_learns_to_end_its_answers(tmp_path, tokenizer, pad):
    """Only sampled batches (lmbda=1), scored by a teacher that always stops: the student learns to stop,
    also when the pad token is the EOS token (the EOS of a sampled row must be trained on, padding not)."""
    import copy

    from distill.training.trainer import LossSpec

    tok = copy.deepcopy(tokenizer)
    if pad == "eos":
        tok.pad_token = tok.eos_token
    teacher = BigramTeacher(tok)
    student = make_llama(len(tok), hidden=32, layers=1, seed=6)
    student.generation_config.pad_token_id = tok.pad_token_id
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    assert _stops(student, tok, prompts) < 0.5
    batches = []
    trainer = _direct_trainer(tmp_path, student, teacher, tok, _pairs_file(tmp_path, n=1), steps=40, lr=1e-2,
                              losses=[LossSpec("reverse_kl")], hook=lambda e: batches.append(e))
    trainer.train()
    student.eval()
    assert _stops(student, tok, prompts) == 1.0
    for event in batches[-3:]:  # the sampled rows that stopped train on their EOS, and on nothing after it
        for i, c in enumerate(event["completions"]):
            counted = [t for t in event["batch"]["labels"][i].tolist() if t != -100]
            assert counted == c


def test_onpolicy_starts_after_the_offline_phase(tmp_path, tokenizer, sharp_teacher):
    """onpolicy.start_step: the first optimizer steps train on the dataset's (teacher's) text, then sampling."""
    student = make_llama(len(tokenizer), hidden=32, layers=1, seed=7)
    seen = []
    trainer = _direct_trainer(tmp_path, student, sharp_teacher, tokenizer, _pairs_file(tmp_path, n=1), steps=5,
                              hook=lambda e: seen.append(e))
    trainer.onpolicy = OnPolicyConfig(lmbda=1.0, max_new_tokens=4, start_step=3)
    trainer.train()
    assert len(seen) == 2  # steps 3 and 4 of 0..4


def test_a_resumed_run_samples_what_an_uninterrupted_one_does(tmp_path, tokenizer, sharp_teacher):
    """6 steps straight vs 3 steps, stopped, resumed from checkpoint-3 for 3 more (lmbda=0.5, 2 micro-batches a
    step): the same batches are sampled, with the same samples, and the weights end equal (issue 18: the
    sampler's generator restarted from the seed on resume)."""
    from transformers import TrainerCallback

    data = _pairs_file(tmp_path, n=2)
    settings = OnPolicyConfig(lmbda=0.5, max_new_tokens=6)

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 3

    def run(out, resume=None, stop=False):
        seen = []
        student = make_llama(len(tokenizer), hidden=32, layers=1, seed=3)
        trainer = _direct_trainer(out, student, sharp_teacher, tokenizer, data, steps=6, batch=2, onpolicy=settings,
                                  hook=lambda e: seen.append((trainer.state.global_step, e["completions"])),
                                  gradient_accumulation_steps=2, save_steps=3)
        if stop:
            trainer.add_callback(StopAt())
        trainer.train(resume_from_checkpoint=resume)
        return seen, student.state_dict()

    straight, weights = run(tmp_path / "straight")
    first, _ = run(tmp_path / "resumed", stop=True)
    second, resumed_weights = run(tmp_path / "resumed", resume=str(tmp_path / "resumed" / "out" / "checkpoint-3"))
    assert first == [s for s in straight if s[0] < 3] and second == [s for s in straight if s[0] >= 3]
    assert 0 < len(second) < 6  # some of the resumed micro-batches were sampled, not all
    for key, value in weights.items():
        torch.testing.assert_close(resumed_weights[key], value, msg=key)
