"""A scripted OpenAI-compatible HTTP server on 127.0.0.1 for tests, with deterministic fault injection.

Replies are a pure function of the prompt, so a test can check every stored row. Faults (429 with
Retry-After, 500, a reply slower than the client's timeout, a malformed body) are chosen by a seeded hash of
(prompt, attempt) for the first `fault_attempts` attempts of each prompt: deterministic whatever the thread
schedule, and every prompt succeeds within fault_attempts + 1 tries.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULTS = ("429", "500", "timeout", "malformed", "no_choices")
VOCAB = [f"w{i}" for i in range(40)]


def reply_text(prompt: str) -> str:
    digest = hashlib.sha256(prompt.encode()).digest()
    return " ".join(VOCAB[b % len(VOCAB)] for b in digest[:4])


def _top_logprobs(token: str, k: int, as_ids: bool) -> list[dict]:
    """k alternatives, the sampled token first; probabilities 0.5, 0.25, ... so the tail is 2**-k."""
    others = [t for t in VOCAB if t != token][: k - 1]
    out = []
    for j, t in enumerate([token, *others]):
        name = f"token_id:{VOCAB.index(t)}" if as_ids else t
        out.append({"token": name, "logprob": math.log(0.5 ** (j + 1)), "bytes": list(name.encode())})
    return out


class FakeOpenAIServer:
    """`with FakeOpenAIServer(fault_rate=0.3) as srv: srv.url` -> 'http://127.0.0.1:PORT/v1'."""

    def __init__(self, model: str = "scripted", fault_rate: float = 0.0, seed: int = 0, fault_attempts: int = 3,
                 slow_seconds: float = 1.0, always_fail: set[str] | None = None, logprobs: bool = True,
                 score_fn=None):
        self.model, self.fault_rate, self.seed = model, fault_rate, seed
        self.fault_attempts, self.slow_seconds = fault_attempts, slow_seconds
        self.always_fail = always_fail or set()
        self.logprobs = logprobs  # False: a server that ignores logprobs requests
        # echo scoring of token-id prompts (the on-policy API scorer): ids -> logprob of each id given the ones
        # before it (the first is None, as vLLM sends); default: a fixed function of the ids
        self.score_fn = score_fn or (lambda ids: [None] + [-0.01 * (t % 50) - 0.05 for t in ids[1:]])
        self.attempts: Counter = Counter()  # per prompt
        self.faults: Counter = Counter()  # per fault kind
        self.ok: Counter = Counter()  # successful replies per prompt
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FakeOpenAIServer:  # noqa: PYI034
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def fault_for(self, prompt: str, attempt: int) -> str | None:
        if prompt in self.always_fail:
            return "500"
        if attempt >= self.fault_attempts:
            return None
        h = int.from_bytes(hashlib.sha256(f"{self.seed}|{prompt}|{attempt}".encode()).digest()[:8], "big")
        if (h % 10_000) / 10_000 >= self.fault_rate:
            return None
        return FAULTS[(h // 10_000) % len(FAULTS)]

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _send(self, code: int, body: bytes | dict, headers: dict | None = None) -> None:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout): expected

            def do_GET(self) -> None:
                if self.path.rstrip("/") == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": server.model, "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": "no such route"}})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                chat = self.path.endswith("/chat/completions")
                if body.get("model") != server.model:
                    self._send(404, {"error": {"message": f"The model `{body.get('model')}` does not exist."}})
                    return
                prompt = body["messages"][-1]["content"] if chat else body["prompt"]
                if isinstance(prompt, list):  # token ids (echo scoring): counted and faulted by their text
                    prompt = json.dumps(prompt)
                with server.lock:
                    attempt = server.attempts[prompt]
                    server.attempts[prompt] += 1
                    fault = server.fault_for(prompt, attempt)
                    if fault:
                        server.faults[fault] += 1
                if fault == "429":
                    self._send(429, {"error": {"message": "slow down"}}, {"Retry-After": "0"})
                elif fault == "500":
                    self._send(500, {"error": {"message": "internal error"}})
                elif fault == "timeout":
                    time.sleep(server.slow_seconds)
                    self._send(200, self._reply(body, prompt, chat))
                elif fault == "malformed":
                    self._send(200, b'{"id": "x", "choices": [{"mess')
                elif fault == "no_choices":
                    self._send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": server.model})
                else:
                    with server.lock:
                        server.ok[prompt] += 1
                    self._send(200, self._reply(body, prompt, chat))

            def _reply(self, body: dict, prompt: str, chat: bool) -> dict:
                if not chat and body.get("echo") and isinstance(body.get("prompt"), list):
                    ids = body["prompt"]
                    lps = [*server.score_fn(ids), -1.0]  # the prompt's logprobs, then the one generated token
                    choice = {"index": 0, "finish_reason": "length", "text": "x",
                              "logprobs": {"tokens": [f"token_id:{t}" for t in [*ids, 0]], "token_logprobs": lps,
                                           "text_offset": [0] * len(lps), "top_logprobs": None}}
                    return {"id": "c", "object": "text_completion", "created": 0, "model": server.model,
                            "choices": [choice], "usage": {"prompt_tokens": len(ids), "completion_tokens": 1,
                                                           "total_tokens": len(ids) + 1}}
                text = reply_text(prompt)
                tokens = text.split(" ")
                as_ids = bool(body.get("return_tokens_as_token_ids"))
                k = body.get("top_logprobs") if chat else body.get("logprobs")
                usage = {"prompt_tokens": 5, "completion_tokens": len(tokens), "total_tokens": 5 + len(tokens)}
                if chat:
                    choice = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
                    if body.get("logprobs") and server.logprobs:
                        choice["logprobs"] = {"content": [
                            {"token": f"token_id:{VOCAB.index(t)}" if as_ids else t, "logprob": math.log(0.5),
                             "bytes": None, "top_logprobs": _top_logprobs(t, k or 1, as_ids)} for t in tokens]}
                    return {"id": "c", "object": "chat.completion", "created": 0, "model": server.model,
                            "choices": [choice], "usage": usage}
                choice = {"index": 0, "finish_reason": "stop", "text": text}
                if k and server.logprobs:
                    choice["logprobs"] = {
                        "tokens": tokens, "token_logprobs": [math.log(0.5)] * len(tokens), "text_offset": [0] * len(tokens),
                        "top_logprobs": [{d["token"]: d["logprob"] for d in _top_logprobs(t, k, False)} for t in tokens]}
                return {"id": "c", "object": "text_completion", "created": 0, "model": server.model,
                        "choices": [choice], "usage": usage}

        return Handler
