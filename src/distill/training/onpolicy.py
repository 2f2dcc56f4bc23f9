"""On-policy distillation (GKD, Agarwal et al. 2024): the student samples, the teacher scores its samples.

With probability `train.onpolicy.lmbda` a training micro-batch is replaced by the student's own completions
of the batch prompts (sampling at `temperature` / `top_p`, up to `max_new_tokens`), so the student learns
where it actually goes instead of only on teacher text (no train/inference mismatch, "exposure bias").
How the teacher scores the samples:
- a local teacher: its dense logits on the sampled sequences, with every divergence of `train.losses`
  (cross_entropy terms are skipped on these batches: their labels are the student's own tokens);
- an API teacher (`Scorer`, e.g. an OpenAI-compatible server of the teacher with the student's tokenizer):
  the logprobs of the sampled tokens only, and the sampled reverse KL of MiniLLM / "on-policy distillation":
  per token, log q_student(x) - log p_teacher(x). Its value is the Monte-Carlo estimate of KL(q || p); its
  gradient is the score-function one, sg(log q - log p) * grad log q (a per-token policy gradient whose
  reward is the teacher's log-likelihood minus the student's), which is unbiased for grad KL(q || p) per token.

Normalisation: the global token count of a sampled batch is not known before sampling, so a sampled
micro-batch is normalised by its own counted tokens times gradient-accumulation steps and processes (equal to
the global count when the micro-batches of a step are of equal size).

Works with LoRA students: generation goes through the (peft-wrapped) model's own `generate`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from distill.config import GenerateConfig
from distill.data.batching import DistillCollator, encode_example, left_pad
from distill.data.prompts import Record
from distill.modeling import cut_at_eos
from distill.teachers.base import Completion, Prompt, TeacherError
from distill.teachers.openai import MalformedResponse, OpenAITeacher

SAMPLED_KEY = "teacher_token_logprobs"  # (batch, seq - 1) teacher logprob of each sampled token, shifted


# ------------------------------------------------------------------------------------------------ sampling


def micro_batch_rng(seed: int, step: int, micro_batch: int) -> random.Random:
    """The generator deciding whether a micro-batch is sampled (lmbda) and with which sampling seed.

    Derived from (seed, optimizer step, micro-batch within the step) rather than carried from batch to batch:
    its state is fully given by the step a checkpoint records, so a run resumed from checkpoint-N samples exactly
    what the uninterrupted run sampled (a single generator seeded once restarted from the seed on resume)."""
    return random.Random(f"distill-onpolicy/{seed}/{step}/{micro_batch}")  # str seeds hash stably (sha512)


def prompts_from_batch(input_ids: torch.Tensor, labels: torch.Tensor) -> list[list[int]]:
    """Each row's prompt ids: everything before its first counted label (labels are -100 on the prompt)."""
    prompts = []
    for ids, lab in zip(input_ids.tolist(), labels.tolist()):
        start = next((j for j, v in enumerate(lab) if v != -100), len(lab))
        prompts.append(ids[: max(start, 1)])
    return prompts


def generation_kwargs(settings: Any, pad_id: int, eos_ids: list[int]) -> dict:
    """model.generate arguments for student sampling (top_k=0: top_p is the only truncation)."""
    return {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p, "top_k": 0,
                "max_new_tokens": settings.max_new_tokens, "pad_token_id": pad_id, "eos_token_id": eos_ids or None,
                "use_cache": True}


@torch.no_grad()
def sample_completions(
    model: torch.nn.Module, prompts: list[list[int]], settings: Any, pad_id: int, eos_ids: list[int],
    seed: int | None = None,
) -> list[list[int]]:
    """The student's sampled completion ids for each prompt (EOS kept when it stopped on one).

    `seed` makes the draw reproducible without disturbing the global RNG the training loop uses.
    """
    device = next(model.parameters()).device
    input_ids, mask = left_pad(prompts, pad_id, device)
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if seed is not None:
                torch.manual_seed(seed)
            out = model.generate(input_ids=input_ids, attention_mask=mask,
                                 **generation_kwargs(settings, pad_id, eos_ids))
    finally:
        model.train(was_training)
    return [cut_at_eos(row, eos_ids) for row in out[:, input_ids.shape[1]:].tolist()]


def rebuild_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int, max_length: int | None = None
                  ) -> dict[str, torch.Tensor]:
    """A training batch of prompt + sampled completion, labels on the completion only (as DistillCollator)."""
    examples = []
    for p, c in zip(prompts, completions):
        ex = encode_example(p, c, max_length or len(p) + len(c)) if c else None
        if ex is None:  # an empty completion: keep the row, with nothing counted
            ex = {"input_ids": list(p), "labels": [-100] * len(p), "prompt_len": len(p)}
        examples.append(ex)
    return DistillCollator(pad_token_id=pad_id)(examples)


# ------------------------------------------------------------------------------------------------- scoring


class Scorer(Protocol):
    """A teacher that returns the log-probability of given completion tokens (an API teacher)."""

    def token_logprobs(self, prompts: list[list[int]], completions: list[list[int]]) -> list[list[float]]:
        """log p_teacher(completion[j] | prompt + completion[:j]) for every completion token."""


class LocalScorer:
    """`Scorer` over a local model (the sampled estimator with a local teacher; also what tests compare to)."""

    def __init__(self, model: torch.nn.Module, pad_id: int):
        self.model, self.pad_id = model.eval(), pad_id

    @torch.no_grad()
    def token_logprobs(self, prompts: list[list[int]], completions: list[list[int]]) -> list[list[float]]:
        out = []
        device = next(self.model.parameters()).device
        for p, c in zip(prompts, completions):
            ids = torch.tensor([p + c], device=device)
            logp = torch.log_softmax(self.model(input_ids=ids).logits[0, len(p) - 1: -1].float(), -1)
            out.append(logp.gather(-1, torch.tensor(c, device=device)[:, None])[:, 0].tolist())
        return out


@dataclass
class ScoringPrompt(Prompt):
    """One (prompt ids, sampled completion ids) pair to score, in the teacher pool's `Prompt` shape."""

    prompt_ids: list[int] = field(default_factory=list)
    completion_ids: list[int] = field(default_factory=list)


class EchoScoring(OpenAITeacher):
    """The openai teacher's client (thread pool, round robin over every teacher.base_url, our retry policy,
    fatal errors after the finished requests) with one different request: prompt + completion as token ids,
    `echo=True, logprobs=0`, read back as the teacher's logprob of each completion token."""

    def _request(self, client, prompt: ScoringPrompt, params) -> Completion:
        kwargs: dict[str, Any] = {"model": self.tcfg.model, "prompt": prompt.prompt_ids + prompt.completion_ids,
                                  "max_tokens": 1, "echo": True, "logprobs": 0, "temperature": 0.0}
        if self.tcfg.extra_body:
            kwargs["extra_body"] = dict(self.tcfg.extra_body)
        resp = client.completions.create(**kwargs)
        choices = getattr(resp, "choices", None)
        if not isinstance(choices, list) or not choices:
            raise MalformedResponse(f"reply has no choices: {str(resp)[:200]}")  # retried like a 5xx
        logprobs = getattr(choices[0], "logprobs", None)
        lps = list(getattr(logprobs, "token_logprobs", None) or [])
        p, c = len(prompt.prompt_ids), len(prompt.completion_ids)
        got = lps[p: p + c]
        if len(got) != c or any(v is None for v in got):
            raise TeacherError(
                f"teacher endpoint returned {len(got)} prompt logprobs for {c} sampled tokens: it must "
                "support echo=True with logprobs on token-id prompts (vLLM / SGLang completions API)"
            )
        return Completion(text="", finish_reason="stop", extra={"token_logprobs": [float(v) for v in got]})


class OpenAIScorer:
    """`Scorer` over OpenAI-compatible completions endpoints (vLLM, SGLang) serving the teacher.

    Sends prompt + completion as token ids with `echo=True, logprobs=0` and reads the echoed prompt
    logprobs back: the server must use the student's tokenizer (same-family teacher), since the ids are sent.
    Requests go through the same client as generation (`EchoScoring`, an `OpenAITeacher`): up to
    teacher.max_concurrency in flight, spread over every teacher.base_url, retried by teacher.max_retries /
    retry_base_delay / retry_max_delay (Retry-After honoured).
    """

    def __init__(self, tcfg: Any, policy: Any = None):
        self.pool = EchoScoring(tcfg, policy=policy)

    def token_logprobs(self, prompts: list[list[int]], completions: list[list[int]]) -> list[list[float]]:
        items = [ScoringPrompt(i, Record(source=f"on-policy sample {i}"), "", prompt_ids=list(p),
                               completion_ids=list(c)) for i, (p, c) in enumerate(zip(prompts, completions))]
        out: list[list[float]] = [[] for _ in items]
        todo = [item for item in items if item.completion_ids]  # nothing to score in an empty sample
        for item, completion in self.pool.generate(todo, GenerateConfig(seed=0)):
            out[item.index] = completion.extra["token_logprobs"]
        return out

    def close(self) -> None:
        self.pool.close()


def scored_batch(batch: dict[str, torch.Tensor], prompts: list[list[int]], completions: list[list[int]],
                 scorer: Scorer) -> dict[str, torch.Tensor]:
    """Add the teacher's sampled-token logprobs at the shifted positions (row j-1 scores token j)."""
    lps = scorer.token_logprobs(prompts, completions)
    width = batch["input_ids"].shape[1] - 1
    out = torch.zeros((len(prompts), width), dtype=torch.float32)
    for i, (p, c, lp) in enumerate(zip(prompts, completions, lps)):
        n = min(len(c), width - (len(p) - 1))
        out[i, len(p) - 1: len(p) - 1 + n] = torch.tensor(lp[:n], dtype=torch.float32)
    batch[SAMPLED_KEY] = out
    return batch


# --------------------------------------------------------------------------------------------------- loss


def sampled_reverse_kl(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Sampled KL(q_student || p_teacher) on the student's own tokens.

    student_logits: (batch, seq, vocab) shifted; targets: (batch, seq) sampled ids; teacher_logprobs: (batch,
    seq) log p_teacher(target); mask: (batch, seq). Value: sum of (log q - log p) over counted tokens / count;
    gradient: sum of sg(log q - log p) * grad log q / count (see module docstring).
    """
    logq_all = torch.log_softmax(student_logits.float(), dim=-1)
    idx = torch.where(mask, targets, 0)
    logq = logq_all.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
    diff = (logq - teacher_logprobs.to(logq.dtype)).detach()
    per_token = diff + diff * (logq - logq.detach())
    total = torch.where(mask, per_token, 0.0).sum()
    count = num_items_in_batch if num_items_in_batch is not None else mask.sum().clamp_min(1)
    if torch.is_tensor(count):
        count = count.to(total.device)
    return total / count


# -------------------------------------------------------------------------------------------- the trainer


def onpolicy_inputs(
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    settings: Any,
    *,
    pad_id: int,
    eos_ids: list[int],
    seed: int | None,
    scorer: Scorer | None = None,
    max_length: int | None = None,
    hook: Callable[[dict], None] | None = None,
    scale: int = 1,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Replace a batch by the student's samples of its prompts; returns (batch, its token count x scale).

    `hook`, when given, sees {"model", "prompts", "completions", "seed", "batch"} before training on them.
    """
    prompts = prompts_from_batch(inputs["input_ids"], inputs["labels"])
    completions = sample_completions(model, prompts, settings, pad_id, eos_ids, seed)
    batch = rebuild_batch(prompts, completions, pad_id, max_length)
    if scorer is not None:
        batch = scored_batch(batch, prompts, completions, scorer)
    if hook is not None:
        hook({"model": model, "prompts": prompts, "completions": completions, "seed": seed, "batch": batch})
    device = inputs["input_ids"].device
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["onpolicy"] = torch.ones((), dtype=torch.bool, device=device)
    count = (batch["labels"][:, 1:] != -100).sum() * scale
    return batch, count
