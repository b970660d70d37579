"""`bench serve` against a loopback SSE stub, then specserve's own server (fake engine, and SmolLM2 marked slow)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import replace

import pytest
import server_fixtures
from aiohttp import web
from server_fixtures import API_KEY, MODEL, fake_server

from specserve.bench.cli import main
from specserve.bench.datasets import BenchPrompt, load_dataset
from specserve.bench.prom import parse_counters
from specserve.bench.serve_load import ServeConfig, run_serve

real_engine = server_fixtures.real_engine  # fixtures: the session's real SmolLM2 engine and server
live = server_fixtures.live


class StubServer:
    """Streams `max_tokens` one-word chunks; model "broken" gets HTTP 500; "slow" sleeps 0.2 s per chunk."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.accepted = 0
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(10)

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/metrics", self.metrics)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1"
        ready.set()
        self.loop.run_forever()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        if body["model"] == "broken":
            return web.json_response({"error": {"message": "boom"}}, status=500)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "x-specserve-arm": "ngram4"})
        await resp.prepare(request)
        n = body["max_tokens"]
        for i in range(n):
            await asyncio.sleep(0.2 if body["model"] == "slow" else 0.002)
            chunk = {
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {"content": f"w{i} "}}],
            }
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        self.accepted += 2  # of the 4 draft tokens /metrics reports per request
        usage = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": n + 5}}
        await resp.write(f": keep-alive\n\ndata: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
        return resp

    async def metrics(self, request: web.Request) -> web.Response:
        drafts = len(self.requests)
        text = (
            "# TYPE specserve:spec_decode_num_drafts counter\n"
            f'specserve:spec_decode_num_drafts_total{{arm="ngram4"}} {drafts}\n'
            "# TYPE specserve:spec_decode_num_draft_tokens counter\n"
            f'specserve:spec_decode_num_draft_tokens_total{{arm="ngram4"}} {4 * drafts}\n'
            "# TYPE specserve:spec_decode_num_accepted_tokens counter\n"
            f'specserve:spec_decode_num_accepted_tokens_total{{arm="ngram4"}} {self.accepted}\n'
        )
        return web.Response(text=text)


@pytest.fixture(scope="module")
def stub():
    server = StubServer()
    yield server
    server.close()


def _config(stub, **kw) -> ServeConfig:
    fields = dict(base_url=stub.url, model="stub", dataset="mt_bench", num_prompts=4, max_tokens=8, concurrency=2)
    return ServeConfig(**{**fields, **kw})


def test_concurrency_run_two_turns_metrics_and_goodput(stub):
    prompts = load_dataset("mt_bench", 4)
    before = len(stub.requests)
    result = run_serve(_config(stub, slo_ttft_s=5.0, slo_tpot_s=5.0), prompts, progress=False)
    s = result.summary
    assert (s.num_requests, s.num_ok, s.num_errors) == (8, 8, 0)
    assert all(r.num_output_tokens == 8 and r.tokens_from_usage and r.arm == "ngram4" for r in result.records)
    assert all(len(r.itl_s) == 7 and r.ttft_s <= r.latency_s for r in result.records)
    assert s.ttft_ms["p50"] > 0 and s.e2e_ms["p99"] >= s.e2e_ms["p50"] and s.output_tok_s > 0
    assert s.slo_attainment == 1.0 and s.goodput == pytest.approx(8 / s.duration_s)
    # Turn 2 carries the server's own first answer.
    second = [r for r in stub.requests[before:] if len(r["messages"]) == 3]
    assert len(second) == 4 and second[0]["messages"][1] == {
        "role": "assistant",
        "content": "w0 w1 w2 w3 w4 w5 w6 w7 ",
    }
    acc = result.server_acceptance["ngram4"]
    assert acc.num_drafts == 8 and acc.num_draft_tokens == 32 and acc.acceptance_rate == pytest.approx(0.5)


def test_request_rate_and_tight_slo(stub):
    prompts = [BenchPrompt(str(i), "c", ("hi",)) for i in range(6)]
    result = run_serve(_config(stub, concurrency=None, request_rate=50.0, slo_ttft_s=1e-6), prompts, progress=False)
    assert result.summary.num_ok == 6 and result.summary.slo_attainment == 0.0 and result.summary.goodput == 0.0
    starts = sorted(r.start_s for r in result.records)
    assert starts[-1] > 0  # Poisson arrivals spread the starts


def test_errors_are_counted_and_later_turns_skipped(stub):
    result = run_serve(_config(stub, model="broken"), load_dataset("mt_bench", 2), progress=False)
    s = result.summary
    assert (s.num_requests, s.num_ok, s.num_errors) == (4, 0, 4)
    assert s.errors == {'HTTP 500: {"error": {"message": "boom"}}': 2, "skipped: an earlier turn failed": 2}


def test_max_duration_cancels_and_counts(stub):
    prompts = [BenchPrompt(str(i), "c", ("hi",)) for i in range(3)]
    t0 = time.perf_counter()
    result = run_serve(_config(stub, model="slow", concurrency=1, max_duration_s=0.5), prompts, progress=False)
    assert time.perf_counter() - t0 < 3
    assert result.summary.num_errors == 3 and "cancelled: run exceeded --max-duration" in result.summary.errors
    assert any("--max-duration" in n for n in result.notes)


def test_unreachable_server_is_an_error_not_a_crash():
    prompts = [BenchPrompt("0", "c", ("hi",))]
    config = ServeConfig(base_url="http://127.0.0.1:9", model="m", dataset="x", num_prompts=1, timeout_s=5)
    result = run_serve(config, prompts, progress=False)
    assert result.summary.num_errors == 1 and "ClientConnectorError" in next(iter(result.summary.errors))
    assert result.server_acceptance is None and any("no /metrics page" in n for n in result.notes)


def test_cli_writes_json_and_exit_code(stub, tmp_path, capsys):
    args = [
        "serve",
        "--base-url",
        stub.url,
        "--model",
        "stub",
        "--num-prompts",
        "2",
        "--max-tokens",
        "4",
        "--concurrency",
        "2",
        "--out",
        str(tmp_path),
        "--no-progress",
    ]
    assert main(args) == 0
    data = json.loads((tmp_path / "serve.json").read_text())
    assert data["kind"] == "serve" and data["summary"]["num_ok"] == 4 and len(data["requests"]) == 4
    assert data["server_acceptance"]["ngram4"]["num_draft_tokens"] == 16
    assert "server-side speculation" in capsys.readouterr().out
    assert main([*args[:4], "broken", *args[5:]]) == 1


def test_parse_counters_untyped_and_other_metrics():
    text = 'specserve:spec_decode_num_drafts_total{arm="a"} 3\nfoo_total 1\n'
    assert parse_counters(text) == {"a": {"specserve:spec_decode_num_drafts": 3.0}}


def test_specserve_server_over_fake_engine():
    server = fake_server(api_key=API_KEY)
    try:
        config = ServeConfig(
            base_url=server.url,
            model=MODEL,
            dataset="mt_bench",
            num_prompts=3,
            max_tokens=12,
            concurrency=2,
            api_key=API_KEY,
        )
        # Short prompts: the fake engine's context is 256 characters.
        prompts = [BenchPrompt(str(i), "c", ("hi", "more")) for i in range(3)]
        result = run_serve(config, prompts, progress=False)
        forced = run_serve(replace(config, speculative="ngram2"), prompts[:1], progress=False)
        unauthorized = run_serve(replace(config, api_key=None), prompts[:1], progress=False)
    finally:
        server.stop()
    assert result.summary.num_errors == 0 and result.summary.num_ok == 6
    assert {r.arm for r in result.records} == {"ngram:4"} and all(r.tokens_from_usage for r in result.records)
    acc = result.server_acceptance["ngram:4"]
    assert acc.acceptance_rate == pytest.approx(0.75) and acc.num_draft_tokens == 4 * acc.num_drafts
    assert forced.summary.num_errors == 0 and set(forced.server_acceptance) == {"ngram2"}
    assert unauthorized.summary.num_errors == 2 and any("HTTP 401" in e for e in unauthorized.summary.errors)


@pytest.mark.slow
def test_live_specserve_server_on_smollm2(live):
    prompts = [BenchPrompt(str(i), "c", (f"Count from {i} to {i + 20}.",)) for i in range(4)]
    config = ServeConfig(
        base_url=live.url,
        model=MODEL,
        dataset="inline",
        num_prompts=4,
        max_tokens=16,
        concurrency=2,
        api_key=API_KEY,
        timeout_s=120,
    )
    result = run_serve(config, prompts, progress=False)
    assert result.summary.num_errors == 0 and result.summary.num_ok == 4, result.summary.errors
    assert all(r.num_output_tokens > 0 and r.ttft_s > 0 for r in result.records)
    acc = result.server_acceptance[result.records[0].arm]
    assert acc.num_drafts > 0 and 0.0 <= acc.acceptance_rate <= 1.0
