"""The real SmolLM2 model behind the API, driven by real clients (openai SDK, aiohttp, LiteLLM, LangChain)."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import openai
import pytest
import server_fixtures
from prometheus_client.parser import text_string_to_metric_families
from server_fixtures import API_KEY, MODEL, fetch, sse_payloads, wait_for

pytestmark = pytest.mark.slow

real_engine = server_fixtures.real_engine  # fixtures: one engine and one server for the whole session
live = server_fixtures.live

CHAT = "/v1/chat/completions"
MSGS = [{"role": "user", "content": "Name three colours."}]
# A prompt whose answer repeats itself, so n-gram drafts get accepted.
ECHO_MSGS = [{"role": "user", "content": "Repeat this line four times: one two three four five six"}]


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


def stream_text(chunks) -> dict[int, str]:
    texts: dict[int, str] = {}
    for ch in chunks:
        for c in ch.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
    return texts


def test_chat_stream_equals_non_stream_greedy(live):
    c = client(live)
    full = c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=16, temperature=0)
    chunks = list(
        c.chat.completions.create(
            model=MODEL,
            messages=MSGS,
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert stream_text(chunks[:-1]) == {0: full.choices[0].message.content}
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    assert full.usage.completion_tokens <= 16 and full.choices[0].finish_reason in ("stop", "length")
    assert [c.choices[0].finish_reason for c in chunks[:-1]].count(full.choices[0].finish_reason) == 1


def test_seeded_sampling_repeats_and_streams_the_same(live):
    c = client(live)
    kw = dict(model=MODEL, messages=MSGS, max_tokens=8, temperature=1.0, seed=1234, n=2)
    first, second = c.chat.completions.create(**kw), c.chat.completions.create(**kw)
    texts = [ch.message.content for ch in first.choices]
    assert texts == [ch.message.content for ch in second.choices]
    assert stream_text(c.chat.completions.create(stream=True, **kw)) == dict(enumerate(texts))
    assert first.usage.completion_tokens <= 16


def test_async_sdk_completions_n2_with_usage(live):
    async def run():
        ac = openai.AsyncOpenAI(base_url=live.url + "/v1", api_key=API_KEY, max_retries=0)
        full = await ac.completions.create(
            model=MODEL, prompt="The capital of France is", max_tokens=8, n=2, temperature=0.8, seed=5
        )
        stream = await ac.completions.create(
            model=MODEL,
            prompt="The capital of France is",
            max_tokens=8,
            n=2,
            temperature=0.8,
            seed=5,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [ch async for ch in stream]
        await ac.close()
        return full, chunks

    full, chunks = asyncio.run(run())
    texts: dict[int, str] = {}
    for ch in chunks[:-1]:
        texts[ch.choices[0].index] = texts.get(ch.choices[0].index, "") + ch.choices[0].text
    assert texts == {ch.index: ch.text for ch in full.choices}
    assert chunks[-1].usage == full.usage and full.usage.completion_tokens == 16


def test_logprobs_one_entry_per_token(live):
    c = client(live)
    r = c.chat.completions.create(
        model=MODEL, messages=ECHO_MSGS, max_tokens=20, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(e.top_logprobs) == 3 for e in content)
    assert all(e.top_logprobs[0].logprob >= e.logprob - 1e-6 for e in content)  # greedy picks the top token
    r = c.completions.create(
        model=MODEL, prompt="one two three four one two three four", max_tokens=12, temperature=0, logprobs=2
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == r.usage.completion_tokens


def spec_counter(server, name: str, arm: str) -> float:
    text = fetch(server, "GET", "/metrics").body.decode()
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == f"specserve:{name}_total" and s.labels.get("arm") == arm
    )


def test_stop_strings_never_leak_under_ngram_speculation(live):
    c = client(live)
    drafts_before = spec_counter(live, "spec_decode_num_accepted_tokens", "ngram:4")
    free = c.chat.completions.create(model=MODEL, messages=ECHO_MSGS, max_tokens=40, temperature=0)
    text = free.choices[0].message.content
    assert spec_counter(live, "spec_decode_num_accepted_tokens", "ngram:4") > drafts_before
    stop = "four"
    assert stop in text, text
    expected = text[: text.index(stop)]
    cut = c.chat.completions.create(
        model=MODEL, messages=ECHO_MSGS, max_tokens=40, temperature=0, stop=[stop], logprobs=True
    )
    assert cut.choices[0].message.content == expected and cut.choices[0].finish_reason == "stop"
    assert len(cut.choices[0].logprobs.content) == cut.usage.completion_tokens
    assert cut.usage.completion_tokens < free.usage.completion_tokens
    streamed = stream_text(
        c.chat.completions.create(
            model=MODEL, messages=ECHO_MSGS, max_tokens=40, temperature=0, stop=[stop], stream=True
        )
    )
    assert streamed == {0: expected}
    comp = c.completions.create(
        model=MODEL,
        prompt="one two three four five one two three four five one two",
        max_tokens=24,
        temperature=0,
        stop=["five"],
        logprobs=1,
    )
    assert "five" not in comp.choices[0].text
    assert len(comp.choices[0].logprobs.tokens) == comp.usage.completion_tokens


def test_raw_sse_bytes(live):
    body = {"model": MODEL, "messages": MSGS, "max_tokens": 8, "temperature": 0, "stream": True}
    reply = fetch(live, "POST", CHAT, body, headers={"X-Request-Id": "raw-1"})
    assert reply.status == 200 and reply.headers["x-request-id"] == "raw-1"
    assert reply.headers["x-specserve-arm"] == "ngram:4"
    chunks = [json.loads(p) for p in sse_payloads(reply.body)]
    assert chunks[0]["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    ]
    assert set(chunks[0]) == {"id", "object", "created", "model", "choices"}
    assert chunks[0]["id"].startswith("chatcmpl-") and isinstance(chunks[0]["created"], int)
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert len(finishes) == 1 and chunks[-1]["choices"][0]["finish_reason"] == finishes[0]


def test_none_arm_counts_no_drafts(live):
    before = spec_counter(live, "spec_decode_num_drafts", "none")
    reply = fetch(live, "POST", CHAT, {"model": MODEL, "messages": ECHO_MSGS, "max_tokens": 12, "speculative": "none"})
    assert reply.status == 200 and reply.headers["x-specserve-arm"] == "none"
    assert spec_counter(live, "spec_decode_num_drafts", "none") == before == 0


@pytest.mark.parametrize("arm", ["ngram:4", "none"])  # "none": plain steps, overlapped by async scheduling
def test_64_streams_with_a_quarter_dropped(live, arm):
    async def one(session, i: int) -> str:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": f"Count from {i} upward."}],
            "max_tokens": 8,
            "temperature": 0.7,
            "seed": i,
            "stream": True,
            "speculative": arm,
        }
        async with session.post(live.url + CHAT, json=body) as resp:
            assert resp.status == 200
            if i % 4 == 0:  # drop mid-stream: read the role chunk, then hang up
                await resp.content.readuntil(b"\n\n")
                resp.close()
                return "dropped"
            data = await resp.read()
            assert data.endswith(b"data: [DONE]\n\n")
            return "done"

    async def run():
        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=120)) as session:
            results = await asyncio.gather(*(one(session, i) for i in range(64)))
            async with session.get(live.url + "/health") as health:
                assert health.status == 200
            return results

    results = asyncio.run(run())
    assert results.count("done") == 48 and results.count("dropped") == 16
    state = live.state()
    wait_for(lambda: state.engine.num_requests == 0, timeout=30, what="requests to settle")
    wait_for(
        lambda: state.engine.stats().num_free_blocks == state.engine.stats().num_total_blocks,
        timeout=30,
        what="KV blocks to come back",
    )
    assert fetch(live, "GET", "/health").status == 200
    text = fetch(live, "GET", "/metrics").body.decode()
    aborted = sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "specserve:request_success_total" and s.labels["finished_reason"] == "abort"
    )
    assert aborted >= 1  # some drops land before their request finished


def test_metrics_scrape_parses(live):
    client(live).chat.completions.create(model=MODEL, messages=ECHO_MSGS, max_tokens=16, temperature=0)
    families = {f.name: f for f in text_string_to_metric_families(fetch(live, "GET", "/metrics").body.decode())}
    ttft = families["specserve:time_to_first_token_seconds"]
    assert any(s.name.endswith("_count") and s.value > 0 for s in ttft.samples)
    buckets = sorted({float(s.labels["le"]) for s in ttft.samples if s.name.endswith("_bucket")})
    assert buckets[:3] == [0.001, 0.005, 0.01] and buckets[-1] == float("inf")
    assert spec_counter(live, "spec_decode_num_draft_tokens", "ngram:4") > 0
    per_pos = [
        s for s in families["specserve:spec_decode_num_accepted_tokens_per_pos"].samples if s.name.endswith("_total")
    ]
    assert {s.labels["position"] for s in per_pos} >= {"0"}
    gauges = families["specserve:kv_cache_usage_perc"].samples
    assert all(0 <= s.value <= 1 for s in gauges)


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydantic warns about litellm's own types on import
def test_litellm_streams_a_chat(live):
    litellm = pytest.importorskip("litellm")
    chunks = litellm.completion(
        model=f"openai/{MODEL}",
        api_base=live.url + "/v1",
        api_key=API_KEY,
        messages=MSGS,
        max_tokens=8,
        temperature=0,
        stream=True,
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    full = client(live).chat.completions.create(model=MODEL, messages=MSGS, max_tokens=8, temperature=0)
    assert text == full.choices[0].message.content


def test_langchain_streams_a_chat(live):
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(
        model=MODEL,
        base_url=live.url + "/v1",
        api_key=API_KEY,
        max_tokens=8,
        temperature=0,
        stream_usage=True,
        max_retries=0,
    )
    chunks = list(llm.stream("Name three colours."))
    text = "".join(ch.content for ch in chunks)
    assert text
    usage = [ch.usage_metadata for ch in chunks if ch.usage_metadata]
    assert usage and usage[-1]["output_tokens"] <= 8
