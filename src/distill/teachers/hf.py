"""A local transformers teacher: batched generation (left padding, KV cache, length-sorted batches), then one
forward pass over prompt + response that records the top-k next-token distribution of every response token.

The capture pass is separate from generation on purpose: it gives the raw temperature-1 distribution (no
sampling temperature, top-p or penalties) that offline logit distillation needs, whatever was used to sample.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch

from distill.config import DataConfig, GenerateConfig, TeacherConfig
from distill.data.batching import left_pad
from distill.data.encoding import encode_prompt, uses_template
from distill.data.prompts import Record, render_prompt
from distill.modeling import cut_at_eos, eos_token_ids, load_model, load_tokenizer_for
from distill.teachers.base import (
    Completion,
    Prompt,
    TeacherError,
    prefix_ids,
    teacher_identity,
    topk_from_logprobs,
    truncate_at_stop,
)

CAPTURE_BUDGET = 1 << 27  # logits elements per capture forward (512 MiB in fp32): bounds memory at large vocab
STATIC_CACHE_BYTES = 1 << 30  # the largest KV cache allocated up front for a batch on CPU (see _static_cache_fits)


class StepCapture:
    """A forward hook that keeps the top-k of the next-token distribution at every step of `generate`.

    Why: these are the raw logits generate picks each token from (before temperature, top-p or penalties), so
    the temperature-1 top-k comes with generation instead of from a second forward over prompt + response (that
    pass was 40% of the demo teacher's generate time). Memory: (steps, batch, k), never (steps, batch, vocab).
    """

    def __init__(self, k: int):
        self.k = k
        self.ids: list[torch.Tensor] = []
        self.logprobs: list[torch.Tensor] = []
        self.missing = False

    def __call__(self, module, args, output) -> None:
        logits = getattr(output, "logits", None)
        if not isinstance(logits, torch.Tensor):  # a model whose forward returns no logits: capture pass instead
            self.missing = True
            return
        logprobs = torch.log_softmax(logits[:, -1].float(), dim=-1)
        values, ids = torch.topk(logprobs, min(self.k, logprobs.shape[-1]), dim=-1)
        self.ids.append(ids)
        self.logprobs.append(values)

    def fill(self, completions: list[Completion], n_new: int) -> bool:
        """Give completion i (row i of the batch) the rows of its kept tokens; False when steps are missing."""
        if self.missing or len(self.ids) < n_new:
            return False
        if not self.ids:  # nothing generated: empty rows
            self.ids, self.logprobs = [torch.zeros((len(completions), self.k), dtype=torch.long)], [
                torch.zeros((len(completions), self.k))]
        ids = torch.stack(self.ids, 1).to(torch.int32).cpu().numpy()  # (batch, steps, k)
        values = torch.stack(self.logprobs, 1).float().cpu()
        tail = (1.0 - values.exp().sum(-1)).clamp_min(0.0).numpy()
        values = values.numpy()
        for i, c in enumerate(completions):
            n = len(c.token_ids)
            c.topk_ids, c.topk_logprobs, c.tail = ids[i, :n], values[i, :n], tail[i, :n]
        return True


class HFTeacher:
    """`Teacher` over a local model; `model`/`tokenizer` can be passed in (tests, benchmarks)."""

    def __init__(self, tcfg: TeacherConfig, dcfg: DataConfig | None = None, model=None, tokenizer=None,
                 device: str | None = None):
        if model is None and not tcfg.model:
            raise TeacherError("teacher.model is not set: give a hub id, a local directory or a .gguf file")
        self.dcfg = dcfg or DataConfig()
        self.identity = teacher_identity(tcfg)
        try:
            if tokenizer is None:
                tokenizer = load_tokenizer_for(tcfg.model, trust_remote_code=tcfg.trust_remote_code)
            if model is None:
                model = load_model(tcfg.model, tcfg.dtype, device or tcfg.device, tcfg.trust_remote_code)
            self.tokenizer, self.model = tokenizer, model
        except OSError as exc:
            raise TeacherError(f"teacher.model '{tcfg.model}': cannot load it ({exc})") from exc
        self.model.eval()
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.templated = uses_template(self.tokenizer, self.dcfg)
        self.eos_ids = eos_token_ids(self.model, self.tokenizer)

    @classmethod
    def from_config(cls, config, device: str | None = None, tokenizer=None) -> HFTeacher:
        """The registry's constructor (distill.teachers.registry)."""
        return cls(config.teacher, config.data, tokenizer=tokenizer, device=device)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def render(self, record: Record) -> str:
        return render_prompt(record, self.tokenizer, self.dcfg)

    def encode(self, text: str) -> list[int]:
        # The one prompt rule: a chat template already wrote BOS; plain prompts get the tokenizer's own.
        return encode_prompt(self.tokenizer, text, self.templated)

    def close(self) -> None:
        self.model = None

    # ------------------------------------------------------------ generation

    def generate(self, prompts: list[Prompt], params: GenerateConfig) -> Iterator[tuple[Prompt, Completion]]:
        """Longest prompts first (an out-of-memory error shows in the first batch, and padding stays low)."""
        encoded = [(p, self.encode(p.text)) for p in prompts]
        encoded.sort(key=lambda pe: -len(pe[1]))
        if params.temperature > 0:
            torch.manual_seed(params.seed)
        for start in range(0, len(encoded), params.batch_size):
            batch = encoded[start:start + params.batch_size]
            completions = self.generate_ids([ids for _, ids in batch], params)
            for (prompt, _), completion in zip(batch, completions):
                yield prompt, completion

    def _generation_config(self, params: GenerateConfig):
        cfg = copy.deepcopy(self.model.generation_config)
        sampling = params.temperature > 0
        cfg.update(
            max_new_tokens=params.max_new_tokens,
            do_sample=sampling,
            # Sampling: top_p is the only truncation (a checkpoint's saved top_k would silently add one).
            temperature=params.temperature if sampling else None,
            top_p=params.top_p if sampling else None,
            top_k=0 if sampling else None,
            min_p=None,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.eos_ids or None,
            stop_strings=list(params.stop) or None,
        )
        return cfg

    def _static_cache_fits(self, batch: int, width: int, params: GenerateConfig) -> bool:
        """A static KV cache on CPU when it fits STATIC_CACHE_BYTES. Why: the dynamic cache copies itself whole at
        every step (torch.cat), which was ~30% of the demo teacher's CPU time; on GPUs that copy is cheap and a
        static cache would trigger torch.compile (recompiled per batch width)."""
        mc = self.model.config.get_text_config(decoder=True)
        heads = getattr(mc, "num_key_value_heads", None) or getattr(mc, "num_attention_heads", None)
        head_dim = getattr(mc, "head_dim", None) or (
            mc.hidden_size // mc.num_attention_heads if getattr(mc, "num_attention_heads", None) else None)
        layers = getattr(mc, "num_hidden_layers", None)
        if self.device.type != "cpu" or not (heads and head_dim and layers):
            return False
        element = torch.finfo(self.model.dtype).bits // 8
        size = 2 * layers * batch * (width + params.max_new_tokens) * heads * head_dim * element
        return size <= STATIC_CACHE_BYTES

    @torch.inference_mode()
    def generate_ids(self, prompt_ids: list[list[int]], params: GenerateConfig) -> list[Completion]:
        """One batch: generate, cut at EOS / stop strings, then capture top-k when params.top_k > 0."""
        input_ids, mask = left_pad(prompt_ids, self.tokenizer.pad_token_id, self.device)
        kwargs = {"tokenizer": self.tokenizer} if params.stop else {}
        cfg = self._generation_config(params)
        if cfg.cache_implementation is None and self._static_cache_fits(len(prompt_ids), input_ids.shape[1], params):
            cfg.cache_implementation = "static"
        steps = StepCapture(params.top_k) if params.top_k > 0 else None
        hook = self.model.register_forward_hook(steps) if steps else None
        try:
            out = self.model.generate(input_ids=input_ids, attention_mask=mask, generation_config=cfg, **kwargs)
        finally:
            if hook:
                hook.remove()
        new = out[:, input_ids.shape[1]:].tolist()
        completions = [self._finish(ids, row, params) for ids, row in zip(prompt_ids, new)]
        if steps and not steps.fill(completions, len(new[0]) if new else 0):
            self.capture(completions, params.top_k)  # the model's output had no logits to read per step
        return completions

    def _finish(self, prompt_ids: list[int], new: list[int], params: GenerateConfig) -> Completion:
        ids = cut_at_eos(new, self.eos_ids)
        finish = "stop" if ids and ids[-1] in self.eos_ids else "length"
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if params.stop:
            kept, hit = truncate_at_stop(text, params.stop)
            if hit:
                ids = prefix_ids(self.tokenizer, ids, kept)
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                finish = "stop"
        return Completion(text=text, finish_reason=finish, token_ids=ids, prompt_ids=list(prompt_ids))

    # ------------------------------------------------------------ top-k capture

    @torch.inference_mode()
    def capture(self, completions: list[Completion], k: int) -> None:
        """Fill topk_ids / topk_logprobs / tail of each completion from one forward over prompt + response.

        Layout: prompts left-padded to one width P, responses right-padded to R, so every response starts at
        column P and `logits_to_keep=R+1` computes only the response positions; position ids follow the mask
        so padded rows see the positions an unpadded forward would.
        """
        vocab = self.model.get_output_embeddings().weight.shape[0]
        rows = [c for c in completions if c.token_ids]
        for c in completions:
            if not c.token_ids:
                c.topk_ids = torch.zeros((0, k), dtype=torch.int32).numpy()
                c.topk_logprobs = torch.zeros((0, k)).numpy()
                c.tail = torch.zeros(0).numpy()
        r_max = max((len(c.token_ids) for c in rows), default=0)
        per_chunk = max(1, CAPTURE_BUDGET // max(1, (r_max + 1) * vocab))
        for start in range(0, len(rows), per_chunk):
            self._capture_chunk(rows[start:start + per_chunk], k)

    def _capture_chunk(self, rows: list[Completion], k: int) -> None:
        prompt_ids, prompt_mask = left_pad([c.prompt_ids for c in rows], self.tokenizer.pad_token_id, self.device)
        width_r = max(len(c.token_ids) for c in rows)
        resp = torch.full((len(rows), width_r), self.tokenizer.pad_token_id, dtype=torch.long)
        resp_mask = torch.zeros((len(rows), width_r), dtype=torch.long)
        for i, c in enumerate(rows):
            resp[i, : len(c.token_ids)] = torch.tensor(c.token_ids)
            resp_mask[i, : len(c.token_ids)] = 1
        ids = torch.cat([prompt_ids, resp.to(self.device)], dim=1)
        mask = torch.cat([prompt_mask, resp_mask.to(self.device)], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        try:
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                logits_to_keep=width_r + 1).logits
        except TypeError:  # models whose forward has no logits_to_keep
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
            logits = logits[:, -(width_r + 1):]
        logits = logits[:, :width_r]  # position P-1+i predicts response token i
        for i, c in enumerate(rows):
            n = len(c.token_ids)
            logprobs = torch.log_softmax(logits[i, :n].float(), dim=-1)
            c.topk_ids, c.topk_logprobs, c.tail = topk_from_logprobs(logprobs, k)
