"""Speculative decoding in the serving engine: the student drafts a few tokens, the teacher verifies them in
one forward, and the served output is the teacher's own (greedy: token for token; sampling: the teacher's
distribution, by speculative sampling, Leviathan et al. 2023).

Run as: `distill serve TEACHER_DIR --draft STUDENT_DIR` (/health reports the draft counters).

Why draft-verify inside the engine, not `model.generate(assistant_model=draft)` per row: the row goes on
through the engine's own `RowState`, so every server guarantee holds unchanged (max_tokens, stop strings,
EOS, streaming deltas, cancellation, per-row seeds, prompt logprobs / echo from the same prefill), and the
teacher's logits at every verified position are at hand, so `logprobs` are reported as without a draft (the
teacher's raw logprobs) instead of being refused.

When: a row is drafted while it decodes alone. Transformers' assisted generation and this loop are batch-1,
and under load batching gives more tokens per teacher forward than drafting does; so a batch of several rows
(a busy server, `n > 1`, several prompts) decodes batched as without a draft, and a drafted row hands its
KV cache over to the batched loop as soon as other rows queue up (continuous batching on), the way vLLM turns
speculation off above a batch size. Output does not depend on which path a row took (greedy: the teacher's
argmax either way, up to floating-point near-ties between a one-token and a several-token forward).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distill.serving.engine import (
    Engine,
    Row,
    RowState,
    cache_kwarg,
    cache_of,
    draw,
    plain_dynamic_cache,
    sampling_probs,
)


@dataclass
class Drafter:
    """A draft model for an `Engine` (same vocabulary as the served model, checked at startup).

    tokens: draft tokens proposed per verification at first; per row it grows by 2 after a fully accepted
    round and shrinks by 1 (down to 1) otherwise, transformers' "heuristic" schedule."""

    model: torch.nn.Module
    tokens: int = 5

    def __post_init__(self) -> None:
        self.model.eval()
        self.cache_kw = cache_kwarg(self.model)
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 0) or 0) or None

    @torch.inference_mode()
    def generate(self, engine: Engine, row: Row, join: bool) -> None:
        """Decode one row draft-verify until it finishes, or until other rows queue up (then batched)."""
        live, mask, pos, cache, logits = engine.prefill([row])
        if not live or live[0].finished:
            return
        if not plain_dynamic_cache(cache):  # sliding-window or static caches are not cut back here
            engine.decode(live, mask, pos, cache, logits, join=join)
            return
        st, width = live[0], logits.shape[-1]
        engine.step([st], logits)  # the first token comes from the prefill, as without a draft
        engine.stats.drafted_rows += 1
        seen = len(row.prompt_ids)  # tokens of the sequence in the teacher's cache (the last one never is)
        draft = _DraftState()
        k = max(1, self.tokens)
        while not st.finished:
            if row.cancelled.is_set():
                st.finished = True
                engine.stats.cancelled += 1
                return
            seq = row.prompt_ids + st.ids
            k_now = min(k, st.p.max_tokens - len(st.ids) - 1)  # the teacher adds one token per round
            if (join and engine.queued) or not self._fits(len(seq) + k_now):
                self._hand_over(engine, st, seq, seen, cache, join)
                return
            proposals, qs = self._propose(engine, st, seq, draft, k_now, width)
            out = engine.model(input_ids=torch.tensor([seq[seen:] + proposals], device=engine.device),
                               position_ids=_positions(seen, len(seq) - seen + len(proposals), engine.device),
                               use_cache=True, **{engine.cache_kw: cache})
            cache = cache_of(out)
            n = self._verify(engine, st, proposals, qs, out.logits[0, -(len(proposals) + 1):])
            seen = len(seq) + n  # the accepted drafts are in the teacher's cache; the teacher's own token is not
            _crop(cache, seen)
            draft.keep(seen)
            k = k + 2 if n == len(proposals) else max(1, k - 1)

    def _fits(self, length: int) -> bool:
        return self.context_length is None or length <= self.context_length

    def _propose(self, engine: Engine, st: RowState, seq: list[int], draft: _DraftState, k: int, width: int):
        """k draft tokens after `seq` (greedy, or sampled from the draft's distribution q at the row's
        temperature / top_p, with the row's generator), and q per token (None when greedy)."""
        proposals: list[int] = []
        qs: list[torch.Tensor | None] = []
        feed = seq[draft.seen:]
        for _ in range(k):
            kw = {self.cache_kw: draft.cache} if draft.cache is not None else {}
            out = self.model(input_ids=torch.tensor([feed], device=engine.device),
                             position_ids=_positions(draft.seen, len(feed), engine.device), use_cache=True, **kw)
            draft.cache, draft.seen = cache_of(out), draft.seen + len(feed)
            logits = _to_width(out.logits[0, -1], width)
            if st.p.temperature > 0:
                q = sampling_probs(logits, st.p)
                tid = draw(q, st.generator)
            else:
                q, tid = None, int(logits.argmax())
            proposals.append(tid)
            qs.append(q)
            feed = [tid]
        return proposals, qs

    def _verify(self, engine: Engine, st: RowState, proposals: list[int], qs, logits: torch.Tensor) -> int:
        """Push the accepted draft tokens and the teacher's own next token; returns how many drafts were accepted.

        logits: the teacher's (len(proposals) + 1, vocab) logits, row i predicting proposals[i] (the last row:
        the token after all of them). Greedy: a draft is accepted while it is the teacher's argmax, then the
        argmax follows. Sampling: accepted with probability min(1, p/q), a rejection draws from
        norm(max(0, p - q)), all accepted draws from the last row's p: the teacher's distribution exactly."""
        logp = torch.log_softmax(logits.float(), dim=-1)
        n_alt = st.p.logprobs or 0
        accepted, nxt = 0, None
        for i, (tid, q) in enumerate(zip(proposals, qs)):
            if q is None:
                best = int(logits[i].argmax())
                if best != tid:
                    nxt = best
                    break
            else:
                nxt = accept_or_replace(sampling_probs(logits[i], st.p), q, tid, st.generator)
                if nxt is not None:
                    break
            accepted += 1
            self._push(engine, st, tid, logp[i], n_alt)
            if st.finished:
                break
        engine.stats.draft_verifications += 1
        engine.stats.draft_proposed += len(proposals)
        engine.stats.draft_accepted += accepted
        if st.finished:
            return accepted
        if nxt is None:  # every draft accepted: the teacher's token after them
            last = logits[len(proposals)]
            nxt = draw(sampling_probs(last, st.p), st.generator) if st.p.temperature > 0 else int(last.argmax())
        self._push(engine, st, nxt, logp[accepted], n_alt)
        return accepted

    @staticmethod
    def _push(engine: Engine, st: RowState, tid: int, logp: torch.Tensor, n_alt: int) -> None:
        try:
            st.push(engine.token_info(tid, logp, n_alt))
        except Exception as exc:  # noqa: BLE001  (as in Engine.step: this row fails, with an error event)
            engine.stats.failed += 1
            st.fail(exc)
        engine.stats.generated_tokens += 1
        engine.stats.verified_tokens += 1

    @staticmethod
    def _hand_over(engine: Engine, st: RowState, seq: list[int], seen: int, cache, join: bool) -> None:
        """Go on in the engine's batched loop: feed the tokens the teacher has not seen, then decode (and let
        queued rows join)."""
        out = engine.model(input_ids=torch.tensor([seq[seen:]], device=engine.device),
                           position_ids=_positions(seen, len(seq) - seen, engine.device),
                           use_cache=True, **{engine.cache_kw: cache})
        mask = torch.ones((1, len(seq)), dtype=torch.long, device=engine.device)
        pos = torch.tensor([[len(seq) - 1]], device=engine.device)
        engine.decode([st], mask, pos, cache_of(out), out.logits[:, -1, :], join=join)


def accept_or_replace(p: torch.Tensor, q: torch.Tensor, tid: int, generator: torch.Generator | None) -> int | None:
    """Speculative sampling's rule for draft token `tid` drawn from q (vocab,), the teacher's distribution p:
    None (accepted) with probability min(1, p/q), else a token drawn from norm(max(0, p - q)); the token
    that comes out is distributed as p (Leviathan et al. 2023, Theorem 1)."""
    u = torch.rand((), generator=generator) if generator is not None else torch.rand(())
    if float(u) * float(q[tid]) < float(p[tid]):
        return None
    residual = (p - q.to(p.device)).clamp(min=0)
    return draw(residual / residual.sum() if residual.sum() > 0 else p, generator)


class _DraftState:
    """The draft's KV cache for one row and how many tokens of the sequence it holds."""

    def __init__(self) -> None:
        self.cache = None
        self.seen = 0

    def keep(self, length: int) -> None:
        """Forget rejected draft tokens: keep at most the first `length` tokens."""
        if self.cache is not None and self.seen > length:
            _crop(self.cache, length)
            self.seen = length


def _to_width(logits: torch.Tensor, width: int) -> torch.Tensor:
    """Draft logits (vocab_d,) as the teacher's width: padding rows cut, or -inf rows added (never proposed)."""
    if logits.shape[-1] >= width:
        return logits[:width]
    return torch.cat([logits, logits.new_full((width - logits.shape[-1],), float("-inf"))])


def _positions(start: int, length: int, device) -> torch.Tensor:
    return torch.arange(start, start + length, device=device)[None]


def _crop(cache, length: int) -> None:
    """Keep the first `length` positions of a KV cache (transformers' crop takes minus the tokens to drop)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)
