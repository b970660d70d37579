"""Server test fixtures: a live server in a background thread, over the real SmolLM2 engine or a fake one.

The fake engine follows LLMEngine's contract (add_request / abort_request / step / stats, cumulative
outputs, n samples, stop strings, max_tokens, logprobs, speculation counters) with a character-level
tokenizer, so protocol and failure tests run in milliseconds. Fault switches make its step raise or its
loop die. The real engine is loaded once per session and shared by every real-model test.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from specserve.config import EngineConfig, SpeculativeConfig
from specserve.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from specserve.sampling_params import SamplingParams
from specserve.server.app import ServerConfig, build_app
from specserve.server.arms import arm_configs
from specserve.server.serve import make_runner

MODEL = "SmolLM2-135M-Instruct"
API_KEY = "sk-specserve-test"
SPEC = {"method": "ngram", "num_speculative_tokens": 4}


# ---- a live server in a thread ----


class LiveServer:
    """An aiohttp app on a free loopback port, served from its own event loop thread."""

    def __init__(self, app, api_key: str | None = None) -> None:
        self.app = app
        self.api_key = api_key
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.runner = make_runner(app, shutdown_timeout=2.0)
        self.port = self.call(self._start())

    async def _start(self) -> int:
        from aiohttp import web

        await self.runner.setup()
        self.site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await self.site.start()
        return self.site._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def call(self, coro, timeout: float = 60.0):
        """Run a coroutine on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def state(self):
        from specserve.server.state import STATE

        return self.app[STATE]

    def stop(self) -> None:
        self.call(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


def fetch(
    server: LiveServer,
    method: str,
    path: str,
    body: bytes | dict | None = None,
    headers: dict[str, str] | None = None,
    auth: bool = True,
) -> Reply:
    """One plain HTTP/1.1 exchange (stdlib only), so tests see exactly what went over the wire."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        sent = {**(server.headers if auth else {}), "Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=body, headers=sent)
        resp = conn.getresponse()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def sse_payloads(body: bytes) -> list[str]:
    """The `data:` payloads of an SSE body, checking OpenAI's framing on the way."""
    assert body.endswith(b"data: [DONE]\n\n"), body[-80:]
    frames = body.split(b"\n\n")
    assert frames[-1] == b""
    payloads = []
    for frame in frames[:-1]:
        assert frame.startswith(b"data: ") and b"\n" not in frame, frame
        payloads.append(frame[len(b"data: ") :].decode())
    assert payloads.count("[DONE]") == 1
    return payloads[:-1]


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# ---- the fake engine ----


class CharTokenizer:
    """One token per byte-sized character; enough of the HF tokenizer API for the server."""

    def __len__(self) -> int:
        return 256

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [min(ord(c), 255) for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(i) for i in ids)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [chr(i) for i in ids]

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True) -> str:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


FAKE_TEXT = "the quick brown fox jumps over the lazy dog. " * 20


@dataclass
class _Seq:
    index: int
    text_start: int
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | None = None


@dataclass
class _Req:
    params: SamplingParams
    prompt_ids: list[int]
    max_tokens: int
    seqs: list[_Seq]
    arm: str
    metrics: RequestMetrics


class FakeEngine:
    """LLMEngine's contract over canned text: greedy reads FAKE_TEXT from 0, seeded sampling from a seeded
    offset; a speculative arm emits up to 1 + k tokens per step and counts k drafts, k - 1 accepted."""

    BLOCK = 16

    def __init__(
        self,
        max_model_len: int = 256,
        speculative_config: dict | None = None,
        speculative_arms: dict | None = None,
        num_blocks: int = 512,
        step_delay: float = 0.0,
    ) -> None:
        self.config = EngineConfig(
            device="cpu",
            max_model_len=max_model_len,
            speculative_config=speculative_config,
            speculative_arms=speculative_arms or {},
        )
        self.tokenizer = CharTokenizer()
        self.max_model_len = max_model_len
        spec = self.config.speculative_config
        self.default_arm = spec.arm_name if spec else "none"
        self.spec_arms = ["none", *self.config.speculative_arms, *([self.default_arm] if spec else [])]
        self.num_total_blocks = num_blocks
        self.step_delay = step_delay
        self.fail_steps = 0  # the next N steps raise
        self.die = False  # has_unfinished_requests raises: the loop thread dies
        self.die_in_add = False  # add_request raises past the loop's handlers: dies with a request unacked
        self.requests: dict[str, _Req] = {}
        self.added: list[tuple[str, SamplingParams, str]] = []

    def _k(self, arm: str) -> int:
        spec: SpeculativeConfig | None = {
            self.default_arm: self.config.speculative_config,
            **self.config.speculative_arms,
        }.get(arm)
        return spec.num_speculative_tokens if spec else 0

    def add_request(self, request_id, prompt, params, *, spec_arm=None) -> None:
        if self.die_in_add:
            raise SystemExit("injected: engine loop death inside add_request")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        max_tokens = params.max_tokens or self.max_model_len - len(ids)
        if len(ids) + max_tokens > self.max_model_len:
            raise ValueError(f"This model's maximum context length is {self.max_model_len} tokens.")
        arm = spec_arm or self.default_arm
        seqs = []
        for i in range(params.n):
            rng = random.Random(params.seed + i if params.seed is not None else None)
            start = 0 if params.temperature == 0 else rng.randrange(45)
            seqs.append(_Seq(i, start))
        self.requests[request_id] = _Req(
            params, ids, max_tokens, seqs, arm, RequestMetrics(arrival_time=time.time(), spec_arm=arm)
        )
        self.added.append((request_id, params, arm))

    def abort_request(self, request_id: str) -> None:
        self.requests.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        if self.die:
            raise RuntimeError("injected: engine loop death")
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        if self.step_delay:
            time.sleep(self.step_delay)
        if self.fail_steps:
            self.fail_steps -= 1
            raise RuntimeError("injected: step failure")
        now = time.time()
        outputs = []
        for rid, req in list(self.requests.items()):
            k = self._k(req.arm)
            m = req.metrics
            m.first_scheduled_time = m.first_scheduled_time or now
            for seq in req.seqs:
                if seq.finish_reason is None:
                    self._advance(req, seq, 1 + k)
            if k:
                m.num_draft_tokens += k
                m.num_accepted_tokens += k - 1
                m.drafts_per_position = [d + 1 for d in (m.drafts_per_position or [0] * k)]
                m.accepted_per_position = [a + (p < k - 1) for p, a in enumerate(m.accepted_per_position or [0] * k)]
            m.num_steps += 1
            m.first_token_time = m.first_token_time or now
            finished = all(s.finish_reason for s in req.seqs)
            if finished:
                m.finished_time = now
                del self.requests[rid]
            outputs.append(
                RequestOutput(rid, None, req.prompt_ids, [self._output(req, s) for s in req.seqs], finished, m)
            )
        return outputs

    def _advance(self, req: _Req, seq: _Seq, num: int) -> None:
        for _ in range(num):
            seq.tokens.append(ord(FAKE_TEXT[seq.text_start + len(seq.tokens)]))
            text = self.tokenizer.decode(seq.tokens)
            hit = next((s for s in req.params.stop if s in text), None)
            if hit is not None:
                seq.finish_reason, seq.stop_reason = "stop", hit
                return
            if len(seq.tokens) >= req.max_tokens:
                seq.finish_reason = "length"
                return

    def _output(self, req: _Req, seq: _Seq) -> CompletionOutput:
        text = self.tokenizer.decode(seq.tokens)
        if seq.stop_reason is not None:
            text = text[: text.index(seq.stop_reason)]
        logprobs = None
        if req.params.logprobs is not None:
            logprobs = [self._logprob(t, req.params.logprobs) for t in seq.tokens]
        return CompletionOutput(seq.index, text, list(seq.tokens), None, logprobs, seq.finish_reason, seq.stop_reason)

    @staticmethod
    def _logprob(token: int, top_n: int) -> dict[int, Logprob]:
        entry = {token: Logprob(-0.5, 1, chr(token))}
        for rank in range(2, top_n + 1):
            alt = (token + rank) % 256
            entry.setdefault(alt, Logprob(-1.0 * rank, rank, chr(alt)))
        return entry

    def stats(self):
        used = sum(
            -(-(len(r.prompt_ids) + len(s.tokens)) // self.BLOCK) for r in self.requests.values() for s in r.seqs
        )
        from types import SimpleNamespace

        return SimpleNamespace(
            num_running=len(self.requests),
            num_waiting=0,
            kv_usage=used / self.num_total_blocks,
            num_free_blocks=self.num_total_blocks - used,
            num_total_blocks=self.num_total_blocks,
            prefix_cache_queries=0,
            prefix_cache_hits=0,
            num_preemptions=0,
        )


def fake_server(api_key: str | None = None, engine: FakeEngine | None = None, **config) -> LiveServer:
    """A LiveServer over a FakeEngine; `config` overrides ServerConfig fields."""
    engine = engine or FakeEngine(
        speculative_config=SPEC, speculative_arms={"ngram2": {"method": "ngram", "num_speculative_tokens": 2}}
    )
    cfg = ServerConfig(
        model_name=MODEL,
        arm_configs=arm_configs(engine.config, engine.default_arm),
        api_key=api_key,
        **config,
    )
    return LiveServer(build_app(engine, cfg), api_key)


# ---- pytest fixtures ----


@pytest.fixture
def fake() -> Iterator[LiveServer]:
    server = fake_server()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def real_engine(smollm2):
    """SmolLM2-135M-Instruct on CPU (weights shared with conftest's `smollm2`), n-gram k=4 default, k=2 arm;
    async scheduling on (the CUDA default), so plain requests meet steps in flight, aborts and disconnects."""
    from specserve.engine import LLMEngine

    config = EngineConfig(
        device="cpu",
        dtype="float32",
        max_model_len=512,
        max_num_seqs=64,
        async_scheduling=True,
        speculative_config=SPEC,
        speculative_arms={"ngram2": {"method": "ngram", "num_speculative_tokens": 2}},
    )
    return LLMEngine(config, loaded=smollm2)


@pytest.fixture(scope="session")
def live(real_engine) -> Iterator[LiveServer]:
    """The real model behind the API, with an API key; shared by the session."""
    cfg = ServerConfig(
        model_name=MODEL,
        arm_configs=arm_configs(real_engine.config, real_engine.default_arm),
        max_num_seqs=64,
        api_key=API_KEY,
    )
    server = LiveServer(build_app(real_engine, cfg), API_KEY)
    yield server
    server.stop()
