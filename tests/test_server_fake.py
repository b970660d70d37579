"""Protocol and failure behaviour against the fake engine: fast, deterministic, no model."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
import time

import openai
import pytest
import server_fixtures
from prometheus_client.parser import text_string_to_metric_families
from server_fixtures import MODEL, FakeEngine, fake_server, fetch, sse_payloads, wait_for

from specserve.server.serve import drain

fake = server_fixtures.fake  # fixture: a fresh fake-engine server per test

CHAT = "/v1/chat/completions"
MSGS = [{"role": "user", "content": "hi"}]


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_chat_stream_framing_and_structure(fake):
    body = {
        "model": MODEL,
        "messages": MSGS,
        "max_tokens": 12,
        "temperature": 0,
        "n": 2,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    reply = fetch(fake, "POST", CHAT, body)
    assert reply.status == 200
    assert reply.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert reply.headers["x-specserve-arm"] == "ngram:4"
    chunks = [json.loads(p) for p in sse_payloads(reply.body)]
    assert len({(c["id"], c["created"]) for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL for c in chunks)
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [{"role": "assistant", "content": ""}] * 2
    assert [c["choices"][0]["index"] for c in chunks[:2]] == [0, 1]
    *body_chunks, usage_chunk = chunks
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 24
    assert all(c["usage"] is None for c in body_chunks)
    for index in (0, 1):
        mine = [c["choices"][0] for c in body_chunks if c["choices"][0]["index"] == index]
        assert "role" in mine[0]["delta"] and all("role" not in c["delta"] for c in mine[1:])
        assert [c["finish_reason"] for c in mine].count("length") == 1
        assert mine[-1] == {"index": index, "delta": {}, "logprobs": None, "finish_reason": "length"}
        assert "".join(c["delta"].get("content", "") for c in mine) == "the quick br"


def test_usage_absent_unless_asked(fake):
    reply = fetch(fake, "POST", CHAT, {"model": MODEL, "messages": MSGS, "max_tokens": 3, "stream": True})
    chunks = [json.loads(p) for p in sse_payloads(reply.body)]
    assert all("usage" not in c and c["choices"] for c in chunks)


def test_sdk_sync_and_async_chat(fake):
    c = client(fake)
    full = c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=10, temperature=0)
    assert full.choices[0].message.content == "the quick "
    assert full.usage.completion_tokens == 10 and full.usage.total_tokens == full.usage.prompt_tokens + 10

    async def streamed() -> str:
        ac = openai.AsyncOpenAI(base_url=fake.url + "/v1", api_key="unused", max_retries=0)
        stream = await ac.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=10, temperature=0, stream=True)
        text = "".join([ch.choices[0].delta.content or "" async for ch in stream])
        await ac.close()
        return text

    assert asyncio.run(streamed()) == full.choices[0].message.content


def test_logprobs_count_equals_tokens(fake):
    c = client(fake)
    r = c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=9, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 9
    assert all(len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token for e in content)
    stream = c.chat.completions.create(
        model=MODEL,
        messages=MSGS,
        max_tokens=9,
        logprobs=True,
        stream=True,
        stream_options={"include_usage": True},
    )
    entries, usage, text = [], None, ""
    for ch in stream:
        usage = ch.usage or usage
        if ch.choices:
            text += ch.choices[0].delta.content or ""
            entries += ch.choices[0].logprobs.content if ch.choices[0].logprobs else []
    assert len(entries) == usage.completion_tokens == 9
    assert "".join(e.token for e in entries) == text


def test_completions_batch_echo_and_logprobs(fake):
    c = client(fake)
    r = c.completions.create(model=MODEL, prompt=["ab", "cd"], n=2, max_tokens=4, echo=True, seed=3, temperature=1)
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    assert [ch.text[:2] for ch in r.choices] == ["ab", "ab", "cd", "cd"]
    assert r.usage.prompt_tokens == 4 and r.usage.completion_tokens == 16
    r = c.completions.create(model=MODEL, prompt=[[104, 105]], max_tokens=5, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5 == r.usage.completion_tokens
    assert lp.text_offset == [0, 1, 2, 3, 4] and "".join(lp.tokens) == r.choices[0].text
    chunks = list(c.completions.create(model=MODEL, prompt="ab", max_tokens=5, echo=True, stream=True, temperature=0))
    assert chunks[0].choices[0].text == "ab"
    assert "".join(ch.choices[0].text for ch in chunks) == "ab" + "the q"
    assert [ch.choices[0].finish_reason for ch in chunks].count("length") == 1


def test_seeded_stream_equals_non_stream(fake):
    c = client(fake)
    kw = dict(model=MODEL, messages=MSGS, max_tokens=16, temperature=0.9, seed=11, n=2)
    full = c.chat.completions.create(**kw)
    texts = {0: "", 1: ""}
    for ch in c.chat.completions.create(stream=True, **kw):
        texts[ch.choices[0].index] += ch.choices[0].delta.content or ""
    assert texts == {i: ch.message.content for i, ch in enumerate(full.choices)}
    assert full.choices[0].message.content == c.chat.completions.create(**kw).choices[0].message.content


def test_stop_string_is_cut_everywhere(fake):
    c = client(fake)
    r = c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=30, stop=["fox"], temperature=0)
    assert r.choices[0].message.content == "the quick brown " and r.choices[0].finish_reason == "stop"
    streamed = "".join(
        ch.choices[0].delta.content or ""
        for ch in c.chat.completions.create(
            model=MODEL, messages=MSGS, max_tokens=30, stop=["fox"], stream=True, temperature=0
        )
    )
    assert streamed == "the quick brown "


def test_arm_choice_and_header(fake):
    cases = [
        (None, "ngram:4"),
        ("none", "none"),
        ({"method": "ngram", "num_speculative_tokens": 2}, "ngram2"),
        ({"method": "ngram"}, "ngram2"),
        ("ngram:4", "ngram:4"),
    ]
    for wanted, arm in cases:
        extra = {} if wanted is None else {"speculative": wanted}
        reply = fetch(fake, "POST", CHAT, {"model": MODEL, "messages": MSGS, "max_tokens": 2, **extra})
        assert reply.status == 200 and reply.headers["x-specserve-arm"] == arm, (wanted, reply.body)
    engine = fake.state().engine.engine
    assert [a for _, _, a in engine.added] == ["ngram:4", "none", "ngram2", "ngram2", "ngram:4"]


def test_ab_arms_sticky_per_user_and_labelled_in_metrics():
    from specserve.server.arms import Arm

    ab = [Arm("base", None, 1.0), Arm("ngram2", {"method": "ngram", "num_speculative_tokens": 2}, 1.0)]
    s = fake_server(ab_arms=ab)
    try:

        def arm_for(user):
            body = {"model": MODEL, "messages": MSGS, "max_tokens": 2, **({"user": user} if user else {})}
            return fetch(s, "POST", CHAT, body).headers["x-specserve-arm"]

        for user in ("alice", "bob", "carol"):
            assert len({arm_for(user) for _ in range(4)}) == 1
        assert {arm_for(None) for _ in range(40)} == {"base", "ngram2"}
        text = fetch(s, "GET", "/metrics").body.decode()
        success = {
            tuple(sorted(x.labels.items()))
            for f in text_string_to_metric_families(text)
            if f.name == "specserve:request_success"
            for x in f.samples
        }
        assert {dict(lbl)["arm"] for lbl in success} == {"base", "ngram2"}
    finally:
        s.stop()


def test_metrics_scrape_parses_and_spec_counters_move(fake):
    client(fake).chat.completions.create(model=MODEL, messages=MSGS, max_tokens=10)
    families = {f.name: f for f in text_string_to_metric_families(fetch(fake, "GET", "/metrics").body.decode())}
    for name in (
        "num_requests_running",
        "num_requests_waiting",
        "kv_cache_usage_perc",
        "prompt_tokens",
        "generation_tokens",
        "request_success",
        "time_to_first_token_seconds",
        "inter_token_latency_seconds",
        "e2e_request_latency_seconds",
        "request_queue_time_seconds",
        "num_preemptions",
        "prefix_cache_queries",
        "prefix_cache_hits",
        "spec_decode_num_drafts",
        "spec_decode_num_draft_tokens",
        "spec_decode_num_accepted_tokens",
        "spec_decode_num_accepted_tokens_per_pos",
        "spec_decode_acceptance_length",
    ):
        assert "specserve:" + name in families, name

    def value(name, **labels):
        return sum(
            s.value
            for s in families["specserve:" + name].samples
            if s.name.endswith("_total") and all(s.labels.get(k) == v for k, v in labels.items())
        )

    assert value("generation_tokens", arm="ngram:4", model_name=MODEL) == 10
    assert value("spec_decode_num_drafts", arm="ngram:4") == 2  # 5 tokens per fake step
    assert value("spec_decode_num_draft_tokens", arm="ngram:4") == 8
    assert value("spec_decode_num_accepted_tokens", arm="ngram:4") == 6
    assert value("spec_decode_num_accepted_tokens_per_pos", position="0") == 2
    assert value("spec_decode_num_accepted_tokens_per_pos", position="3") == 0
    assert value("request_success", finished_reason="length") == 1


def test_request_id_echoed_or_generated(fake):
    assert fetch(fake, "GET", "/v1/models", headers={"X-Request-Id": "abc-123"}).headers["x-request-id"] == "abc-123"
    assert len(fetch(fake, "GET", "/v1/models").headers["x-request-id"]) == 32
    bad = fetch(fake, "POST", CHAT, b"{", headers={"X-Request-Id": "abc-123"})
    assert bad.headers["x-request-id"] == "abc-123"


def test_models_tokenize_detokenize(fake):
    models = fetch(fake, "GET", "/v1/models").json()
    assert models == {
        "object": "list",
        "data": [
            {
                "id": MODEL,
                "object": "model",
                "created": models["data"][0]["created"],
                "owned_by": "specserve",
                "max_model_len": 256,
            }
        ],
    }
    assert fetch(fake, "GET", f"/v1/models/{MODEL}").json()["id"] == MODEL
    tok = fetch(fake, "POST", "/tokenize", {"prompt": "hey", "return_token_strs": True}).json()
    assert tok == {"count": 3, "max_model_len": 256, "tokens": [104, 101, 121], "token_strs": ["h", "e", "y"]}
    chat_tok = fetch(fake, "POST", "/tokenize", {"model": MODEL, "messages": MSGS}).json()
    assert chat_tok["count"] == len("<user>hi\n<assistant>")
    assert fetch(fake, "POST", "/detokenize", {"tokens": [104, 105]}).json() == {"prompt": "hi"}


def test_engine_step_failure_fails_its_requests_and_the_loop_goes_on(fake):
    engine = fake.state().engine.engine
    engine.fail_steps = 1
    reply = fetch(fake, "POST", CHAT, {"model": MODEL, "messages": MSGS, "max_tokens": 4})
    assert reply.status == 500 and reply.json()["error"]["type"] == "internal_server_error"
    assert "x-should-retry" not in reply.headers
    engine.fail_steps = 1
    streamed = fetch(fake, "POST", CHAT, {"model": MODEL, "messages": MSGS, "max_tokens": 4, "stream": True})
    payloads = sse_payloads(streamed.body)
    assert json.loads(payloads[-1])["error"]["type"] == "internal_server_error"
    assert fetch(fake, "POST", CHAT, {"model": MODEL, "messages": MSGS, "max_tokens": 4}).status == 200
    assert fetch(fake, "GET", "/health").status == 200


def test_dead_engine_loop_makes_health_503():
    s = fake_server()
    try:
        engine = s.state().engine.engine
        engine.step_delay = 0.05
        results = {}
        t = threading.Thread(
            target=lambda: results.setdefault(
                "r", fetch(s, "POST", CHAT, {"model": MODEL, "messages": MSGS, "max_tokens": 200})
            )
        )
        t.start()
        wait_for(lambda: engine.requests, what="request to start")
        engine.die = True
        t.join(10)
        assert results["r"].status == 503
        assert fetch(s, "GET", "/health").status == 503
        assert fetch(s, "POST", CHAT, {"model": MODEL, "messages": MSGS}).status == 503
    finally:
        s.stop()


def test_engine_death_answers_a_request_still_waiting_to_be_taken():
    s = fake_server()
    try:
        s.state().engine.engine.die_in_add = True
        reply = fetch(s, "POST", CHAT, {"model": MODEL, "messages": MSGS, "max_tokens": 2})
        assert reply.status == 503 and reply.json()["error"]["type"] == "service_unavailable"
        assert fetch(s, "GET", "/health").status == 503
    finally:
        s.stop()


def open_stream(server, max_tokens: int = 200) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    body = json.dumps({"model": MODEL, "messages": MSGS, "max_tokens": max_tokens, "stream": True})
    conn.request("POST", CHAT, body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    resp.read(64)
    return conn, resp


def test_queue_full_is_429_with_retry_after():
    s = fake_server(engine=FakeEngine(step_delay=0.05), max_num_seqs=1, max_queue=1)
    try:
        conns = [open_stream(s) for _ in range(2)]
        reply = fetch(s, "POST", CHAT, {"model": MODEL, "messages": MSGS, "max_tokens": 2})
        assert reply.status == 429 and reply.headers["retry-after"] == "1"
        assert reply.json()["error"]["type"] == "rate_limit_error"
        for conn, _ in conns:
            conn.close()
        wait_for(lambda: s.state().engine.num_requests == 0, what="aborts")
        assert fetch(s, "POST", CHAT, {"model": MODEL, "messages": MSGS, "max_tokens": 2}).status == 200
    finally:
        s.stop()


def test_client_disconnect_aborts_the_request():
    engine = FakeEngine(step_delay=0.02)
    s = fake_server(engine=engine)
    try:
        conn, _ = open_stream(s, max_tokens=230)
        assert engine.requests
        conn.close()
        wait_for(lambda: not engine.requests, timeout=10, what="engine abort")
        wait_for(lambda: s.state().engine.num_requests == 0, timeout=10, what="server bookkeeping")
        stats = engine.stats()
        assert stats.num_free_blocks == stats.num_total_blocks
        text = fetch(s, "GET", "/metrics").body.decode()
        assert 'specserve:request_success_total{arm="none",finished_reason="abort"' in text
    finally:
        s.stop()


def test_drain_lets_streams_finish_and_refuses_new_work():
    engine = FakeEngine(step_delay=0.02)
    s = fake_server(engine=engine)
    try:
        conn, resp = open_stream(s, max_tokens=60)
        draining = asyncio.run_coroutine_threadsafe(drain(s.app, s.site, 30.0), s.loop)
        wait_for(lambda: s.state().draining, what="draining")
        time.sleep(0.1)
        with pytest.raises(ConnectionRefusedError):
            fetch(s, "GET", "/health")
        rest = resp.read()
        assert rest.endswith(b"data: [DONE]\n\n") and b'"finish_reason":"length"' in rest
        draining.result(10)
        conn.close()
    finally:
        s.stop()


def test_drain_with_no_grace_ends_streams_with_abort():
    engine = FakeEngine(step_delay=0.05)
    s = fake_server(engine=engine)
    try:
        conn, resp = open_stream(s, max_tokens=230)
        started = time.monotonic()
        s.call(drain(s.app, s.site, 0.0))
        rest = resp.read()
        assert time.monotonic() - started < 5
        assert rest.endswith(b"data: [DONE]\n\n") and b'"finish_reason":"abort"' in rest
        conn.close()
        wait_for(lambda: not engine.requests, what="engine abort")
    finally:
        s.stop()


def test_keep_alive_comments_while_waiting():
    s = fake_server(engine=FakeEngine(step_delay=0.3), keep_alive_s=0.05)
    try:
        body = {"model": MODEL, "messages": MSGS, "max_tokens": 3, "temperature": 0, "stream": True}
        raw = fetch(s, "POST", CHAT, body).body
        assert b"\n\n: keep-alive\n\n" in raw
        frames = [f for f in raw.split(b"\n\n") if not f.startswith(b":")]
        assert sse_payloads(b"\n\n".join(frames))
        chunks = client(s).chat.completions.create(stream=True, **{k: v for k, v in body.items() if k != "stream"})
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == "the"
    finally:
        s.stop()


def test_vllm_and_openai_extra_fields_are_accepted(fake):
    body = {
        "model": MODEL,
        "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}], "name": "ann"},
        ],
        "max_completion_tokens": 5,
        "top_k": 5,
        "min_p": 0.1,
        "repetition_penalty": 1.1,
        "ignore_eos": True,
        "min_tokens": 2,
        "stop_token_ids": [7],
        "user": "ann",
        "metadata": {"k": "v"},
        "store": False,
        "tool_choice": "none",
        "response_format": {"type": "text"},
        "reasoning_effort": "low",
        "seed": 3,
    }
    reply = fetch(fake, "POST", CHAT, body)
    assert reply.status == 200, reply.body
    _, params, _ = fake.state().engine.engine.added[-1]
    assert (params.max_tokens, params.top_k, params.min_p, params.repetition_penalty) == (5, 5, 0.1, 1.1)
    assert (params.ignore_eos, params.min_tokens, params.stop_token_ids, params.seed) == (True, 2, [7], 3)
