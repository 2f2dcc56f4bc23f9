"""An API teacher as an offline logit signal: `distill serve` (token ids) teaches a second run's student, which
trains offline on the served model's top-k and gets closer to it; token strings that do not map say why."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_llama, make_tokenizer
from fake_openai_server import FakeOpenAIServer
from test_serve import running

from distill.config import load_config
from distill.data.tokenmap import TokenMap, TokenMapError
from distill.store.shards import read_store
from distill.teachers.generate import generate

KEY = "serve-key"
NAME = "served-teacher"
WORDS = ["the", "a", "fox", "dog", "cat", "apples", "cards", "has", "eats", "finds", "more", "now", "how", "many", "answer", "is", "Q:", "A:", "+", "-", "=", "."]


def _texts(n: int, seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))) for _ in range(n)]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A sharp random teacher (chat template) behind `distill serve` on a free port: (base_url, dir, model)."""
    from distill.serving.serve import build_app

    out = tmp_path_factory.mktemp("served")
    tok = make_tokenizer(chat_template=True)
    model = make_llama(len(tok), hidden=64, layers=2, seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    app = build_app(out, served_model_name=NAME, api_key=KEY, max_batch_size=8, batch_wait_ms=5, device="cpu")
    with running(app) as url:
        yield f"{url}/v1", out, model


def _gen_cfg(tmp_path, url, teacher_dir, api="chat", n=48, seed=0, **extra):
    tmp_path.mkdir(parents=True, exist_ok=True)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in _texts(n, seed=seed)))
    tree = {
        "run_dir": str(tmp_path / "run"),
        "teacher": {"backend": "openai", "model": NAME, "base_url": url, "api_key_env": "DISTILL_TEST_SERVE_KEY",
                    "api": api, "max_concurrency": 4, "tokenizer": str(teacher_dir),
                    "extra_body": {"return_tokens_as_token_ids": True}},
        "generate": {"input": str(prompts), "top_k": 8, "max_new_tokens": 12, "temperature": 0.0,
                     "shard_rows": 16},
        "student": {"init": "config", "model": str(teacher_dir),
                    "config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}},
        "train": {"signal": "offline", "max_steps": 60, "learning_rate": 5e-3, "per_device_train_batch_size": 8,
                  "lr_scheduler_type": "constant", "logging_steps": 10, "save_steps": 1000,
                  "losses": [{"name": "forward_kl"}]},
    }
    for k, v in extra.items():
        tree[k] = {**tree[k], **v}
    return load_config(tree)


def _teacher_topk(model, ids: list[int], n_prompt: int, k: int):
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)[n_prompt - 1:]
    return logp.topk(k, dim=-1)


def _heldout_kl(student, teacher, rows) -> float:
    """Token-mean KL(teacher || student) over the response positions of held-out served rows."""
    total = count = 0
    for row in rows:
        ids, p = torch.tensor([row["prompt_ids"] + row["response_ids"]]), len(row["prompt_ids"])
        with torch.no_grad():
            t = torch.log_softmax(teacher(ids).logits[0, p - 1:-1].float(), -1)
            s = torch.log_softmax(student(ids).logits[0, p - 1:-1].float(), -1)
        total += float((t.exp() * (t - s)).sum())
        count += t.shape[0]
    return total / count


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_served_teacher_rows_carry_the_ids_it_saw(tmp_path, served, monkeypatch, api):
    """Prompt ids + response ids reproduce the served model's own top-k: the ids are exactly what it saw."""
    url, teacher_dir, model = served
    monkeypatch.setenv("DISTILL_TEST_SERVE_KEY", KEY)
    rows = read_store(generate(_gen_cfg(tmp_path, url, teacher_dir, api=api, n=6)))
    assert len(rows) == 6
    for row in rows:
        assert row["prompt_ids"] and row["response_ids"] and row["topk_ids"].shape == (len(row["response_ids"]), 8)
        top = _teacher_topk(model, row["prompt_ids"] + row["response_ids"], len(row["prompt_ids"]), 8)
        np.testing.assert_array_equal(row["topk_ids"][:, 0], top.indices[:, 0].numpy())
        np.testing.assert_allclose(row["topk_logprobs"][:, :3], top.values[:, :3].numpy(), atol=2e-2)


def test_a_student_trains_offline_on_the_served_teacher_and_gets_closer(tmp_path, served, monkeypatch):
    from distill.modeling import load_model
    from distill.students.build import build_student
    from distill.training.train import train

    url, teacher_dir, model = served
    monkeypatch.setenv("DISTILL_TEST_SERVE_KEY", KEY)
    cfg = _gen_cfg(tmp_path, url, teacher_dir, n=96)
    generate(cfg)
    heldout = read_store(generate(_gen_cfg(tmp_path / "heldout", url, teacher_dir, n=16, seed=1)))
    (out,) = train(cfg)  # train.signal=offline on an openai teacher's store
    torch.manual_seed(cfg.seed)
    fresh, _ = build_student(cfg.student)
    before, after = _heldout_kl(fresh, model, heldout), _heldout_kl(load_model(out), model, heldout)
    assert after < 0.7 * before, (before, after)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["signal"] == "offline" and summary["examples"] == 96


def test_api_token_strings_that_map_become_ids_and_the_rest_say_why(tmp_path, monkeypatch):
    """A server returning token strings: with a tokenizer where each is one id the store gets ids; with one where
    they are not, training names the row and the token and points at uld / signal: none."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from distill.data.prompts import DataError
    from distill.training.train import train

    words = ["<pad>", "<s>", "</s>", *(f"w{i}" for i in range(40)), *sorted(set(WORDS))]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tok.save_pretrained(tmp_path / "tok")
    vocab = tok.get_vocab()
    tm = TokenMap(tok)
    assert tm.sequence(["w3", "w17"], "x") == [vocab["w3"], vocab["w17"]]
    with pytest.raises(TokenMapError, match=r"x, token 0: teacher token 'nope'.*no id"):
        tm.sequence(["nope"], "x")
    monkeypatch.setenv("DISTILL_TEST_SERVE_KEY", KEY)
    with FakeOpenAIServer(model=NAME) as srv:
        cfg = _gen_cfg(tmp_path, srv.url, tmp_path / "tok", n=4,
                       teacher={"extra_body": {}}, generate={"top_k": 3})
        rows = read_store(generate(cfg))
    assert all(r["topk_ids"] is not None and r["topk_tokens"] is None for r in rows)
    assert [tok.convert_ids_to_tokens(int(i)) for i in rows[0]["response_ids"]] == rows[0]["response"].split(" ")
    assert rows[0]["prompt_ids"] == tok(rows[0]["prompt"] + " ", add_special_tokens=False).input_ids

    other = make_tokenizer(chat_template=True)  # byte-level BPE: 'w12' is several ids, not one
    other.save_pretrained(tmp_path / "other")
    make_llama(len(other), hidden=32, layers=1).save_pretrained(tmp_path / "other")
    with FakeOpenAIServer(model=NAME) as srv:
        cfg = _gen_cfg(tmp_path / "b", srv.url, tmp_path / "other", n=4,
                       teacher={"extra_body": {}}, generate={"top_k": 3},
                       student={"init": "pretrained", "model": str(tmp_path / "other"), "config": {}})
        rows = read_store(generate(cfg))
    assert rows[0]["topk_ids"] is None and rows[0]["topk_tokens"] is not None  # kept as strings
    with pytest.raises(DataError, match=r"row 0 response, token 0: teacher token 'w\d+' does not map to one "
                                        r"token id.*uld.*signal: none"):
        train(cfg)
