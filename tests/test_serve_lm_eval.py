"""lm-eval's `local-completions` model against `distill serve`: a multiple_choice task (loglikelihood
requests: `echo: true` with prompt logprobs) and a generate_until task whose 4 stops + lm-eval's EOS
string make 5, both defined from a small JSONL here. Offline: a local tokenizer, no hub."""

from __future__ import annotations

import json

import pytest
import torch
from test_serve import running, save_student

NAME = "tiny-lm-eval"
DOCS = [
    {"question": "Q: 2 + 3 =", "choices": ["5", "6", "seven"], "answer": 0},
    {"question": "The sky is", "choices": ["blue", "green", "made of cheese"], "answer": 0},
    {"question": "Cats say", "choices": ["woof", "meow"], "answer": 1},
    {"question": "One, two,", "choices": ["three", "four", "ten"], "answer": 0},
]
UNTIL = ["\n\n", "Q:", "###", "</x>"]


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    return save_student(tmp_path_factory.mktemp("student"), chat_template=False, hidden=32, seed=5)


def _tasks(tmp_path):
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    common = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)},
                                                         "cache_dir": str(tmp_path / "hf-cache")},
              "test_split": "test", "doc_to_text": "question"}
    mc = {"task": "distill_tiny_mc", "output_type": "multiple_choice", "doc_to_choice": "choices",
          "doc_to_target": "answer", "metric_list": [{"metric": "acc"}], **common}
    gen = {"task": "distill_tiny_gen", "output_type": "generate_until", "doc_to_target": "{{choices[answer]}}",
           "generation_kwargs": {"until": UNTIL, "max_gen_toks": 6, "do_sample": False},
           "metric_list": [{"metric": "exact_match"}], **common}
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for t in (mc, gen):  # JSON is YAML
        (tasks / f"{t['task']}.yaml").write_text(json.dumps(t))
    return tasks


def _loglikelihood(model, tok, context: str, continuation: str) -> float:
    """What lm-eval should get: sum of the continuation's logprobs given the context, split the way
    lm-eval splits it (context tokens = encode(context); continuation = the rest of encode(whole))."""
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    n_ctx = len(tok(context, add_special_tokens=False).input_ids)
    with torch.no_grad():
        logp = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
    return sum(float(logp[i - 1, whole[i]]) for i in range(n_ctx, len(whole)))


def test_lm_eval_multiple_choice_and_generate_until(student_dir, tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from distill.serving.serve import build_app

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("OPENAI_API_KEY", "unused")
    app = build_app(student_dir, served_model_name=NAME, max_batch_size=4, device="cpu", max_tokens_limit=16)
    engine = app.state.engine
    stops: list[tuple[str, ...]] = []
    submit = engine.submit
    monkeypatch.setattr(engine, "submit", lambda rows: (stops.extend(r.params.stop for r in rows), submit(rows)))
    with running(app) as url:
        out = lm_eval.simple_evaluate(
            model="local-completions",
            model_args={"model": NAME, "base_url": url + "/v1/completions", "tokenizer_backend": "huggingface",
                        "tokenizer": str(student_dir), "tokenized_requests": True, "max_retries": 1,
                        "num_concurrent": 1, "max_length": 200},
            tasks=["distill_tiny_mc", "distill_tiny_gen"],
            task_manager=TaskManager(include_path=str(_tasks(tmp_path)), include_defaults=False),
            bootstrap_iters=0, log_samples=True, random_seed=0,
        )
    acc = out["results"]["distill_tiny_mc"]["acc,none"]
    assert isinstance(acc, float) and 0.0 <= acc <= 1.0
    assert isinstance(out["results"]["distill_tiny_gen"]["exact_match,none"], float)

    # lm-eval's loglikelihoods are the model's own (prompt logprobs from echo), and so is its accuracy
    model, tok = engine.model, engine.tok
    samples = sorted(out["samples"]["distill_tiny_mc"], key=lambda s: s["doc_id"])
    right = 0
    for doc, sample in zip(DOCS, samples):
        want = [_loglikelihood(model, tok, doc["question"], " " + c) for c in doc["choices"]]
        got = [resp[0][0] for resp in sample["resps"]]
        assert got == pytest.approx(want, abs=1e-3)
        right += int(max(range(len(want)), key=want.__getitem__) == doc["answer"])
    assert acc == pytest.approx(right / len(DOCS))

    eos = tok.eos_token  # lm-eval appends it to `until` (its synchronous path: num_concurrent 1)
    assert tuple(UNTIL + [eos]) in stops, "lm-eval's generate_until requests did not send 5 stops"
