"""The generation engine behind the server: one worker thread that batches rows from all requests.

Requests put *rows* (one prompt, one sample) on a queue, one group per request, taken round-robin between
requests (distill.serving.rowqueue) so a big request never starves a small one. The worker takes a row, waits up to
`batch_wait_ms` for more (up to `max_batch_size`), left-pads them and decodes them together with the KV
cache in one loop; between steps finished rows leave and queued rows join (continuous batching). A
hand-written loop instead of `model.generate` lets every row keep its own temperature, top_p, seed, stop
strings, max_tokens and logprobs count inside the same batch, and report raw (temperature 1) logprobs,
the teacher signal distillation wants. Each row streams events
(text delta + its tokens) back through a callback, so streaming and plain requests share one path.

Rows are isolated: what can fail for one row (its seed, its sampling, its prompt logprobs, its stop
strings) fails only that row, with an error event; the rest of the batch goes on. Only a failure of the
batched forward itself fails every row in it. A cancelled row (its client went away) leaves the queue or
the running batch at the next step and is counted in `EngineStats.cancelled`.
"""

from __future__ import annotations

import inspect
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from distill.modeling import eos_token_ids
from distill.serving.rowqueue import FairQueue, Group


@dataclass(frozen=True)
class Alt:
    """One token: id, its text, its exact bytes and its logprob (None for a first prompt token)."""

    id: int
    text: str
    bytes: bytes
    logprob: float | None


@dataclass(frozen=True)
class TokenInfo(Alt):
    top: tuple[Alt, ...] = ()


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: none reported; k >= 0: chosen token + k alternatives
    seed: int | None = None
    # None: no prompt logprobs; k >= 0: one event with every prompt token's teacher-forced logprob (+ k
    # alternatives) before any generated token. max_tokens 0 then scores the prompt and generates nothing.
    prompt_logprobs: int | None = None


@dataclass
class RowEvent:
    text: str = ""
    tokens: list[TokenInfo] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" when the row is done ("error" with `error`)
    error: str | None = None
    prompt_tokens: list[TokenInfo] = field(default_factory=list)  # the prompt-logprobs event only


@dataclass
class Row:
    prompt_ids: list[int]
    params: SamplingParams
    sink: Callable[[RowEvent], None]  # called on the worker thread
    cancelled: threading.Event = field(default_factory=threading.Event)
    done: bool = False  # its final event was sent


@dataclass
class EngineStats:
    batches: int = 0
    rows: int = 0
    max_rows_in_batch: int = 0
    joined: int = 0  # rows that joined a batch already decoding
    steps: int = 0  # decode steps
    step_rows: int = 0  # rows summed over decode steps (step_rows / steps = mean batch size)
    generated_tokens: int = 0
    cancelled: int = 0  # rows dropped (queued or mid-decode) because their request was abandoned
    failed: int = 0  # rows answered with an error event
    # with a draft model (distill.serving.speculative): rows decoded draft-verify, teacher forwards that
    # verified drafts, the tokens those forwards produced, draft tokens proposed and accepted (acceptance =
    # accepted / proposed)
    drafted_rows: int = 0
    draft_verifications: int = 0
    verified_tokens: int = 0
    draft_proposed: int = 0
    draft_accepted: int = 0


def _bytes_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte-to-unicode table used by byte-level BPE tokenizers."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class Pieces:
    """Text and exact bytes of single tokens (cached); byte-level BPE pieces map back to raw bytes,
    so a token holding half of a UTF-8 character still reports its true bytes."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self.byte_level = type(decoder).__name__ == "ByteLevel"
        self.byte_map = _bytes_decoder() if self.byte_level else {}
        self.get = lru_cache(maxsize=65536)(self._piece)

    def _piece(self, token_id: int) -> tuple[str, bytes]:
        text = self.tok.decode([token_id], skip_special_tokens=False)
        if self.byte_level and token_id not in self.tok.all_special_ids:
            raw = self.tok.convert_ids_to_tokens(token_id)
            if isinstance(raw, str) and all(c in self.byte_map for c in raw):
                return text, bytes(self.byte_map[c] for c in raw)
        return text, text.encode("utf-8")


class RowState:
    """Decoding state of one row: turns tokens into text deltas, holding back text that could still
    become a stop string (or an incomplete UTF-8 character) so streamed text never has to be taken back."""

    def __init__(self, row: Row, tokenizer, pieces: Pieces, eos_ids: set[int]):
        self.row, self.tok, self.pieces, self.eos_ids = row, tokenizer, pieces, eos_ids
        self.p = row.params
        self.ids: list[int] = []
        self.infos: list[TokenInfo] = []
        self.prefix_lens = [0]  # prefix_lens[k] = len(decode(ids[:k]))
        self.sent_chars = 0
        self.sent_tokens = 0
        self.finished = False
        self.last = 0  # the token chosen at the latest step (the next forward's input)
        self.max_stop = max((len(s) for s in self.p.stop), default=0)
        self.generator = None
        if self.p.seed is not None:  # any int: torch takes 64 bits, so it wraps (seed + j for n > 1 too)
            self.generator = torch.Generator().manual_seed(int(self.p.seed) % 2**64)

    def _emit(self, text_end: int, token_end: int, text: str, finish: str | None = None) -> None:
        ev = RowEvent(text=text[self.sent_chars:text_end], tokens=self.infos[self.sent_tokens:token_end],
                      finish_reason=finish)
        self.sent_chars, self.sent_tokens = max(self.sent_chars, text_end), max(self.sent_tokens, token_end)
        if finish:
            self.finished = self.row.done = True
        if ev.text or ev.tokens or finish:
            self.row.sink(ev)

    def push(self, info: TokenInfo) -> None:
        if self.finished:
            return
        self.last = info.id
        self.ids.append(info.id)
        self.infos.append(info)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        self.prefix_lens.append(len(text))
        if info.id in self.eos_ids:
            self._emit(len(text), len(self.ids), text, "stop")
            return
        if self.p.stop:
            hit = self._find_stop(text)
            if hit is not None:
                # smallest token prefix covering the kept text; a token straddling the stop is kept
                k = next(k for k in range(len(self.prefix_lens)) if self.prefix_lens[k] >= hit)
                self._emit(hit, max(k, self.sent_tokens), text, "stop")
                return
        if len(self.ids) >= self.p.max_tokens:
            self._emit(len(text), len(self.ids), text, "length")
            return
        safe = len(text)
        while safe > self.sent_chars and text[safe - 1] == "\ufffd":
            safe -= 1
        for s in self.p.stop:
            for n in range(min(len(s) - 1, safe - self.sent_chars), 0, -1):
                if text[safe - n:safe] == s[:n]:
                    safe -= n
                    break
        k = next(k for k in range(len(self.prefix_lens) - 1, -1, -1) if self.prefix_lens[k] <= safe)
        if safe > self.sent_chars or k > self.sent_tokens:
            self._emit(safe, max(k, self.sent_tokens), text)

    def fail(self, exc: BaseException) -> None:
        """This row alone ends with an error event."""
        self.finished = True
        _fail(self.row, exc)

    def _find_stop(self, text: str) -> int | None:
        start = max(0, self.sent_chars - self.max_stop)
        hits = [i for i in (text.find(s, start) for s in self.p.stop) if i >= 0]
        return min(hits) if hits else None


class Engine:
    """Owns the model; `submit(rows)` from any thread, events come back through each row's sink."""

    def __init__(self, model, tokenizer, max_batch_size: int = 8, batch_wait_ms: float = 5.0,
                 continuous: bool = True, draft=None):
        self.model, self.tok = model.eval(), tokenizer
        self.draft = draft  # a distill.serving.speculative.Drafter: rows decoding alone are drafted
        self.max_batch_size, self.batch_wait = max(1, max_batch_size), batch_wait_ms / 1000.0
        self.continuous = continuous
        self._running: list[Row] = []
        self.device = next(model.parameters()).device
        self.pieces = Pieces(tokenizer)
        self.eos_ids = _eos_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids, default=0)
        self.context_length = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
        self.cache_kw = cache_kwarg(model)
        self.stats = EngineStats()
        self.keep_kw = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._queue: FairQueue[Row] = FairQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="distill-batcher", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._thread = None

    def submit(self, rows: list[Row]) -> Group[Row]:
        """Queue one request's rows (they share the engine fairly with other requests' rows); the handle
        is what `withdraw` takes."""
        return self._queue.put_group(rows)

    def withdraw(self, group: Group[Row]) -> None:
        """Drop a request's still-queued rows at once (its client left), counted as cancelled; its running
        rows leave the batch at the next step through their `cancelled` events."""
        self.stats.cancelled += self._queue.withdraw(group)

    # ---- batching --------------------------------------------------------------------------------
    def _collect(self) -> list[Row]:
        try:
            first = self._queue.get(timeout=0.1)
        except queue.Empty:
            return []
        batch = self._running = [first]  # counted as running while the batch is collected
        deadline = time.monotonic() + self.batch_wait
        while len(batch) < self.max_batch_size:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except queue.Empty:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(self._queue.get(timeout=remaining))
            except queue.Empty:
                break
        return self._live(batch)

    def _live(self, rows: list[Row]) -> list[Row]:
        """Rows still wanted; abandoned ones are dropped here and counted."""
        kept = [r for r in rows if not r.cancelled.is_set()]
        self.stats.cancelled += len(rows) - len(kept)
        return kept

    def _take(self, n: int) -> list[Row]:
        """Up to n queued rows without waiting (rows that join a running batch)."""
        rows: list[Row] = []
        while len(rows) < n:
            try:
                row = self._queue.get_nowait()
            except queue.Empty:
                break
            rows.extend(self._live([row]))
        return rows

    def _loop(self) -> None:
        while not self._stop.is_set():
            batch = self._collect()
            if not batch:
                self._running = []
                continue
            self.stats.batches += 1
            self._running = list(batch)
            try:
                self.generate(batch, join=self.continuous)
            except Exception as exc:  # noqa: BLE001  (a failed batch answers its rows, never hangs them)
                for row in self._running:
                    if not row.done:
                        self.stats.failed += 1
                        _fail(row, exc)
            self._running = []

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    @property
    def running(self) -> int:
        return sum(not r.done for r in self._running)

    # ---- decoding --------------------------------------------------------------------------------
    def _states(self, rows: list[Row]) -> list[RowState]:
        """A decoding state per row; a row whose state cannot be made (say, its seed) fails alone."""
        states = []
        for r in rows:
            try:
                states.append(RowState(r, self.tok, self.pieces, self.eos_ids))
            except Exception as exc:  # noqa: BLE001  (this row's fault; the others go on)
                self.stats.failed += 1
                _fail(r, exc)
        return states

    def prefill(self, rows: list[Row]):
        """One forward over the left-padded prompts: (states, mask, last positions, cache, next-token logits).

        Rows that ask for prompt logprobs get them here, from the same forward; rows with max_tokens 0
        then finish. May return no states (every row failed), with the rest None."""
        self.stats.rows += len(rows)
        states = self._states(rows)
        if not states:
            return [], None, None, None, None
        rows = [st.row for st in states]
        width = max(len(r.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids, dtype=torch.long)
            mask[i, width - len(r.prompt_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        # only the last position is projected onto the vocabulary, unless a row asks for prompt logprobs:
        # (rows, prompt, vocab) logits are gigabytes for long prompts and large vocabularies
        every = any(st.p.prompt_logprobs is not None for st in states)
        keep = {"logits_to_keep": 1} if self.keep_kw and not every else {}
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **keep)
        for i, st in enumerate(states):
            if st.p.prompt_logprobs is None and st.p.max_tokens > 0:
                continue
            try:
                if st.p.prompt_logprobs is not None:
                    st.row.sink(RowEvent(prompt_tokens=self._prompt_tokens(st, out.logits[i], width)))
                if st.p.max_tokens <= 0:
                    st.finished = st.row.done = True
                    st.row.sink(RowEvent(finish_reason="length"))
            except Exception as exc:  # noqa: BLE001
                self.stats.failed += 1
                st.fail(exc)
        return states, mask, pos[:, -1:], cache_of(out), out.logits[:, -1, :]

    def _prompt_tokens(self, st: RowState, logits: torch.Tensor, width: int) -> list[TokenInfo]:
        """Teacher-forced logprobs of a row's prompt from its (left-padded) prefill logits (width, vocab):
        token j given tokens < j; the first token has none (None), as OpenAI's echo reports it."""
        ids = st.row.prompt_ids
        k = st.p.prompt_logprobs or 0
        logp = torch.log_softmax(logits[width - len(ids):width - 1].float(), dim=-1)  # predicts ids[1:]
        target = torch.tensor(ids[1:], device=logp.device, dtype=torch.long)
        chosen = logp.gather(-1, target[:, None])[:, 0].tolist()
        top_lp, top_id = logp.topk(k, dim=-1) if k else (None, None)
        top_lp = top_lp.tolist() if k else None
        top_id = top_id.tolist() if k else None
        infos = [TokenInfo(ids[0], *self.pieces.get(ids[0]), None)]
        for j, tid in enumerate(ids[1:]):
            alts = tuple(Alt(a, *self.pieces.get(a), lp) for a, lp in zip(top_id[j], top_lp[j])) if k else ()
            infos.append(TokenInfo(tid, *self.pieces.get(tid), chosen[j], alts))
        return infos

    def _keep(self, live: list[RowState], cache, mask, pos, logits):
        """Drop finished and abandoned rows from the batch (when the cache can select rows; otherwise they
        ride along, ignored). Returns (live, mask, pos, logits, any row still generating)."""
        for st in live:
            if not st.finished and st.row.cancelled.is_set():
                st.finished = True
                self.stats.cancelled += 1
        keep = [i for i, st in enumerate(live) if not st.finished]
        if keep and len(keep) < len(live) and hasattr(cache, "batch_select_indices"):
            idx = torch.tensor(keep, device=self.device)
            cache.batch_select_indices(idx)
            mask, pos = mask[idx], pos[idx]
            logits = logits[idx] if logits is not None else None
            live = [live[i] for i in keep]
        return live, mask, pos, logits, bool(keep)

    @torch.inference_mode()
    def generate(self, rows: list[Row], join: bool = False) -> None:
        """Decode `rows` together: left padding, explicit positions, KV cache; rows finish independently.

        Finished rows leave the batch; with `join`, queued rows join it between steps (their prompts are
        prefilled, and the two KV caches are left-padded to one length and stacked), so a long batch never
        makes new requests wait for all of it: continuous batching on a plain HF model. With a draft model a
        row decoding alone is drafted and verified (distill.serving.speculative) until others queue up."""
        if self.draft is not None and len(rows) == 1:
            self.draft.generate(self, rows[0], join=join)
            return
        self.decode(*self.prefill(rows), join=join)

    def decode(self, live: list[RowState], mask, pos, cache, logits, join: bool) -> None:
        """The decode loop of `generate`, from prefilled rows."""
        while live:
            # finished rows leave the batch: later steps only pay for rows still generating
            live, mask, pos, logits, going = self._keep(live, cache, mask, pos, logits)
            if not going:
                return
            self.step(live, logits)
            live, mask, pos, _, going = self._keep(live, cache, mask, pos, None)
            if not going:
                return
            nxt = torch.tensor([st.last for st in live], dtype=torch.long, device=self.device)
            mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=-1)
            pos = pos + 1
            out = self.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos,
                             use_cache=True, **{self.cache_kw: cache})
            cache, logits = cache_of(out), out.logits[:, -1, :]
            room = self.max_batch_size - len(live)
            if join and room > 0 and not self._queue.empty() and plain_dynamic_cache(cache):
                new_rows = self._take(room)
                if new_rows:
                    self._running.extend(new_rows)
                    n_live, n_mask, n_pos, n_cache, n_logits = self.prefill(new_rows)
                    if not n_live:
                        continue
                    if plain_dynamic_cache(n_cache):
                        mask = _stack_left_padded(mask, n_mask)
                        _stack_caches(cache, n_cache)
                        pos, logits = torch.cat([pos, n_pos]), torch.cat([logits, n_logits])
                        live = live + n_live
                        self.stats.joined += len(new_rows)
                    else:  # an unusual cache type: decode the newcomers on their own first
                        self.decode(n_live, n_mask, n_pos, n_cache, n_logits, join=False)

    def step(self, live: list[RowState], logits: torch.Tensor) -> None:
        """Choose and push one token for every row still generating; a row that fails here fails alone."""
        self.stats.max_rows_in_batch = max(self.stats.max_rows_in_batch, len(live))
        self.stats.steps += 1
        self.stats.step_rows += len(live)
        k = max((st.p.logprobs or 0) for st in live)
        logp = torch.log_softmax(logits.float(), dim=-1)
        nxt = logits.argmax(dim=-1)
        for i, st in enumerate(live):
            if not st.finished and st.p.temperature > 0:
                try:
                    nxt[i] = self._sample(logits[i], st)
                except Exception as exc:  # noqa: BLE001
                    self.stats.failed += 1
                    st.fail(exc)
        chosen = logp.gather(-1, nxt[:, None])[:, 0].tolist()
        tops = logp.topk(k, dim=-1) if k else None
        top_lp, top_id = (tops.values.tolist(), tops.indices.tolist()) if tops is not None else (None, None)
        for i, (st, tid) in enumerate(zip(live, nxt.tolist())):
            if st.finished:
                continue
            try:
                text, raw = self.pieces.get(tid)
                alts: tuple[Alt, ...] = ()
                n_alt = st.p.logprobs or 0
                if n_alt:
                    alts = tuple(Alt(j, *self.pieces.get(j), lp) for j, lp in zip(top_id[i][:n_alt], top_lp[i][:n_alt]))
                st.push(TokenInfo(tid, text, raw, chosen[i], alts))
            except Exception as exc:  # noqa: BLE001
                self.stats.failed += 1
                st.fail(exc)
            self.stats.generated_tokens += 1

    @staticmethod
    def _sample(logits: torch.Tensor, st: RowState) -> int:
        """Nucleus sampling for one row (temperature > 0), with the row's own seeded generator if any."""
        return draw(sampling_probs(logits, st.p), st.generator)

    def token_info(self, tid: int, logp: torch.Tensor, n_alt: int) -> TokenInfo:
        """Token `tid` with its logprob and top `n_alt` alternatives from one position's log-softmax (vocab,)."""
        alts: tuple[Alt, ...] = ()
        if n_alt:
            top = logp.topk(n_alt)
            alts = tuple(Alt(j, *self.pieces.get(j), lp) for j, lp in zip(top.indices.tolist(), top.values.tolist()))
        return TokenInfo(tid, *self.pieces.get(tid), float(logp[tid]), alts)


def sampling_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The distribution a row samples from (vocab,): softmax at its temperature, cut to its top_p nucleus
    (the most likely token always kept), renormalised."""
    probs = torch.softmax(logits.float() / p.temperature, dim=-1)
    if p.top_p < 1.0:
        sp, si = probs.sort(descending=True)
        keep = sp.cumsum(-1) - sp < p.top_p
        probs = torch.zeros_like(probs).scatter(0, si[keep], sp[keep])
        probs = probs / probs.sum()
    return probs


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from `probs` (vocab,), with a row's seeded (CPU) generator if it has one."""
    if generator is not None and generator.device != probs.device:
        probs = probs.cpu()
    return int(torch.multinomial(probs, 1, generator=generator).item())


def _fail(row: Row, exc: BaseException) -> None:
    """End a row with an error event (once)."""
    if not row.done:
        row.done = True
        row.sink(RowEvent(error=f"{type(exc).__name__}: {exc}", finish_reason="error"))


def _eos_ids(model, tokenizer) -> set[int]:
    return set(eos_token_ids(model, tokenizer))


def plain_dynamic_cache(cache) -> bool:
    """Only plain dynamic (full attention) caches are stacked; sliding-window or static ones are not."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(x).__name__ == "DynamicLayer" and getattr(x, "keys", None) is not None
                                and x.keys.dim() == 4 for x in layers)


def _left_pad(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _stack_left_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(Ba, La) and (Bb, Lb) masks -> (Ba + Bb, max L), zeros on the left: padding nobody attends to."""
    length = max(a.shape[1], b.shape[1])
    return torch.cat([_left_pad(a, length, 1), _left_pad(b, length, 1)], dim=0)


def _stack_caches(a, b) -> None:
    """Append cache b's rows to cache a (per layer keys/values (B, heads, L, dim)), left-padding the shorter."""
    length = max(a.get_seq_length(), b.get_seq_length())
    for x, y in zip(a.layers, b.layers):
        x.keys = torch.cat([_left_pad(x.keys, length, 2), _left_pad(y.keys, length, 2)], dim=0)
        x.values = torch.cat([_left_pad(x.values, length, 2), _left_pad(y.values, length, 2)], dim=0)


def cache_kwarg(model) -> str:
    """transformers >= 5.2x names the KV cache argument `cache`; older versions `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)
