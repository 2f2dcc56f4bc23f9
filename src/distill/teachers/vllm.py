"""vLLM's offline engine as a teacher (optional extra: `pip install "distill[vllm]"`, Linux + NVIDIA GPU).

vLLM batches and schedules by itself; we hand it token ids (the prompt rendered with the teacher's own
tokenizer, as the hf backend does) in chunks so finished rows reach the store as they come. vLLM v1 returns
*raw* logprobs (before temperature and penalties), the same temperature-1 distribution the hf backend
captures; `SamplingParams(logprobs=k)` gives the top-k plus the sampled token, and only ranks 1..k are kept.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from distill.config import DataConfig, GenerateConfig, TeacherConfig
from distill.data.encoding import encode_prompt, uses_template
from distill.data.prompts import Record, render_prompt
from distill.teachers.base import (
    Completion,
    Prompt,
    TeacherError,
    prefix_ids,
    teacher_identity,
    truncate_at_stop,
)

VLLM_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # our aliases -> vLLM's names
CHUNK = 1024  # prompts per engine call: large enough to keep vLLM's scheduler full


def import_vllm():
    """The vllm module, or a TeacherError that says how to get it or what to use instead."""
    try:
        import vllm
    except ImportError as exc:
        raise TeacherError(
            "teacher.backend=vllm needs vLLM, which is not installed: `pip install \"distill[vllm]\"` on Linux "
            "with an NVIDIA GPU; or use teacher.backend=hf (local, any device) or teacher.backend=openai "
            f"against a running vLLM server ({exc})"
        ) from None
    import torch

    if not torch.cuda.is_available():
        raise TeacherError(
            "teacher.backend=vllm needs a CUDA GPU and torch sees none; use teacher.backend=hf on this machine, "
            "or teacher.backend=openai with teacher.base_url pointing at a GPU server"
        )
    return vllm


class VLLMTeacher:
    """`Teacher` over `vllm.LLM`."""

    def __init__(self, tcfg: TeacherConfig, dcfg: DataConfig | None = None, top_k: int = 0, seed: int = 0):
        vllm = import_vllm()
        if not tcfg.model:
            raise TeacherError("teacher.model is not set: give a hub id or a local directory")
        self.dcfg = dcfg or DataConfig()
        self.identity = teacher_identity(tcfg)
        self._vllm = vllm
        self.llm = vllm.LLM(
            model=tcfg.model,
            dtype=VLLM_DTYPES.get(tcfg.dtype, tcfg.dtype),
            tensor_parallel_size=tcfg.tensor_parallel_size,
            gpu_memory_utilization=tcfg.gpu_memory_utilization,
            trust_remote_code=tcfg.trust_remote_code,
            max_logprobs=max(20, top_k),
            seed=seed,
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.templated = uses_template(self.tokenizer, self.dcfg)

    @classmethod
    def from_config(cls, config, device: str | None = None, tokenizer=None) -> VLLMTeacher:
        """The registry's constructor (distill.teachers.registry); vLLM places and tokenizes itself."""
        return cls(config.teacher, config.data, top_k=config.generate.top_k, seed=config.generate.seed)

    def render(self, record: Record) -> str:
        return render_prompt(record, self.tokenizer, self.dcfg)

    def close(self) -> None:
        self.llm = None

    def sampling_params(self, params: GenerateConfig):
        return self._vllm.SamplingParams(
            n=1,
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=params.max_new_tokens,
            stop=list(params.stop) or None,
            seed=params.seed if params.temperature > 0 else None,
            logprobs=params.top_k if params.top_k > 0 else None,
        )

    def generate(self, prompts: list[Prompt], params: GenerateConfig) -> Iterator[tuple[Prompt, Completion]]:
        sampling = self.sampling_params(params)
        for start in range(0, len(prompts), CHUNK):
            chunk = prompts[start:start + CHUNK]
            ids = [encode_prompt(self.tokenizer, p.text, self.templated) for p in chunk]
            outputs = self.llm.generate([{"prompt_token_ids": i} for i in ids], sampling, use_tqdm=False)
            for prompt, prompt_ids, out in zip(chunk, ids, outputs):
                yield prompt, self._completion(out.outputs[0], prompt_ids, params)

    def _completion(self, out, prompt_ids: list[int], params: GenerateConfig) -> Completion:
        text, _ = truncate_at_stop(out.text, list(params.stop))  # vLLM already drops the stop string
        ids = list(out.token_ids)
        if isinstance(getattr(out, "stop_reason", None), str):
            # ended on a stop string: its tokens are in token_ids but not in the text; keep the two in step
            ids = prefix_ids(self.tokenizer, ids, text)
        c = Completion(text=text, finish_reason=str(out.finish_reason or "stop"), token_ids=ids,
                       prompt_ids=list(prompt_ids))
        if params.top_k > 0 and out.logprobs is not None:
            c.topk_ids, c.topk_logprobs, c.tail = topk_from_vllm(list(out.logprobs)[: len(ids)], params.top_k)
        return c


def topk_from_vllm(logprobs, k: int):
    """Per position {token_id: Logprob(logprob, rank)} -> (ids (n, k) int32, logprobs (n, k), tail (n,))."""
    n = len(logprobs)
    ids = np.zeros((n, k), dtype=np.int32)  # empty slots: id 0 with logprob -inf (safe to gather)
    lps = np.full((n, k), -np.inf, dtype=np.float32)
    for i, pos in enumerate(logprobs):
        ranked = sorted(pos.items(), key=lambda item: item[1].rank if item[1].rank is not None else 1 << 30)
        top = [(tid, lp) for tid, lp in ranked if lp.rank is not None and lp.rank <= k][:k]
        for j, (tid, lp) in enumerate(top):
            ids[i, j], lps[i, j] = tid, lp.logprob
    tail = np.clip(1.0 - np.exp(lps).sum(-1), 0.0, None).astype(np.float32)
    return ids, lps, tail
