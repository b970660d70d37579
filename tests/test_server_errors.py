"""Bad requests: each gets its OpenAI-shaped error with the right status, and the server keeps serving."""

from __future__ import annotations

import pytest
from server_fixtures import MODEL, fake_server, fetch

CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
MSGS = [{"role": "user", "content": "hi"}]
BAD = "invalid_request_error"


def chat(**fields):
    return {"model": MODEL, "messages": MSGS, **fields}


def comp(**fields):
    return {"model": MODEL, "prompt": "hi", **fields}


def without(body: dict, key: str) -> dict:
    return {k: v for k, v in body.items() if k != key}


# (id, method, path, body, status, error type, param or None when not checked)
CASES = [
    ("malformed-json", "POST", CHAT, b'{"model": ', 400, BAD, None),
    ("json-array", "POST", CHAT, b"[]", 400, BAD, None),
    ("empty-body", "POST", CHAT, b"", 400, BAD, None),
    ("not-utf8", "POST", CHAT, b"\xff\xfe{}", 400, BAD, None),
    ("missing-model", "POST", CHAT, without(chat(), "model"), 400, BAD, "model"),
    ("missing-messages", "POST", CHAT, without(chat(), "messages"), 400, BAD, "messages"),
    ("unknown-field", "POST", CHAT, chat(frobnicate=1), 400, BAD, "frobnicate"),
    ("unknown-model", "POST", CHAT, chat(model="gpt-9"), 404, BAD, "model"),
    ("empty-messages", "POST", CHAT, chat(messages=[]), 400, BAD, "messages"),
    ("messages-not-list", "POST", CHAT, chat(messages="hi"), 400, BAD, "messages"),
    (
        "bad-role",
        "POST",
        CHAT,
        chat(messages=[{"role": "bot", "content": "x"}]),
        400,
        BAD,
        "messages[0].role",
    ),
    ("content-int", "POST", CHAT, chat(messages=[{"role": "user", "content": 3}]), 400, BAD, None),
    (
        "image-part",
        "POST",
        CHAT,
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        400,
        BAD,
        "messages[0].content",
    ),
    ("n-string", "POST", CHAT, chat(n="2"), 400, BAD, "n"),
    ("n-zero", "POST", CHAT, chat(n=0), 400, BAD, "n"),
    ("n-too-big", "POST", CHAT, chat(n=129), 400, BAD, "n"),
    ("n-over-max-num-seqs", "POST", CHAT, chat(n=65), 400, BAD, "n"),
    ("temperature-high", "POST", CHAT, chat(temperature=2.5), 400, BAD, "temperature"),
    ("temperature-negative", "POST", CHAT, chat(temperature=-0.1), 400, BAD, "temperature"),
    ("temperature-string", "POST", CHAT, chat(temperature="hot"), 400, BAD, "temperature"),
    ("top-p-zero", "POST", CHAT, chat(top_p=0), 400, BAD, "top_p"),
    ("top-p-high", "POST", CHAT, chat(top_p=1.5), 400, BAD, "top_p"),
    ("presence-penalty", "POST", CHAT, chat(presence_penalty=3), 400, BAD, "presence_penalty"),
    ("frequency-penalty", "POST", CHAT, chat(frequency_penalty=-2.5), 400, BAD, "frequency_penalty"),
    ("repetition-penalty", "POST", CHAT, chat(repetition_penalty=0), 400, BAD, "repetition_penalty"),
    ("top-k", "POST", CHAT, chat(top_k=-2), 400, BAD, "top_k"),
    ("min-p", "POST", CHAT, chat(min_p=1.5), 400, BAD, "min_p"),
    ("max-tokens-zero", "POST", CHAT, chat(max_tokens=0), 400, BAD, "max_tokens"),
    ("max-tokens-negative", "POST", CHAT, chat(max_tokens=-5), 400, BAD, "max_tokens"),
    ("max-tokens-float", "POST", CHAT, chat(max_tokens=1.5), 400, BAD, "max_tokens"),
    ("max-completion-tokens-zero", "POST", CHAT, chat(max_completion_tokens=0), 400, BAD, "max_tokens"),
    ("context-too-long", "POST", CHAT, chat(max_tokens=10_000), 400, BAD, "messages"),
    ("min-tokens-over-max", "POST", CHAT, chat(max_tokens=4, min_tokens=8), 400, BAD, "min_tokens"),
    ("top-logprobs-21", "POST", CHAT, chat(logprobs=True, top_logprobs=21), 400, BAD, "top_logprobs"),
    ("top-logprobs-alone", "POST", CHAT, chat(top_logprobs=2), 400, BAD, "top_logprobs"),
    ("logprobs-string", "POST", CHAT, chat(logprobs="yes"), 400, BAD, "logprobs"),
    ("stop-empty", "POST", CHAT, chat(stop=""), 400, BAD, "stop"),
    ("stop-five", "POST", CHAT, chat(stop=["a", "b", "c", "d", "e"]), 400, BAD, "stop"),
    ("stop-int", "POST", CHAT, chat(stop=5), 400, BAD, "stop"),
    ("stop-token-ids-negative", "POST", CHAT, chat(stop_token_ids=[-1]), 400, BAD, "stop_token_ids"),
    ("seed-string", "POST", CHAT, chat(seed="abc"), 400, BAD, "seed"),
    ("seed-huge", "POST", CHAT, chat(seed=2**70), 400, BAD, "seed"),
    ("user-int", "POST", CHAT, chat(user=5), 400, BAD, "user"),
    ("stream-string", "POST", CHAT, chat(stream="true"), 400, BAD, "stream"),
    (
        "stream-options-without-stream",
        "POST",
        CHAT,
        chat(stream_options={"include_usage": True}),
        400,
        BAD,
        "stream_options",
    ),
    (
        "stream-options-unknown",
        "POST",
        CHAT,
        chat(stream=True, stream_options={"x": 1}),
        400,
        BAD,
        "stream_options.x",
    ),
    ("logit-bias-range", "POST", CHAT, chat(logit_bias={"5": 200}), 400, BAD, "logit_bias"),
    ("logit-bias-negative-id", "POST", CHAT, chat(logit_bias={"-5": 1}), 400, BAD, "logit_bias"),
    ("tools", "POST", CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, BAD, "tools"),
    (
        "response-format-json",
        "POST",
        CHAT,
        chat(response_format={"type": "json_object"}),
        400,
        BAD,
        "response_format",
    ),
    ("spec-unknown-method", "POST", CHAT, chat(speculative={"method": "eagle"}), 400, BAD, "speculative"),
    (
        "spec-unknown-k",
        "POST",
        CHAT,
        chat(speculative={"method": "ngram", "num_speculative_tokens": 7}),
        400,
        BAD,
        "speculative",
    ),
    ("spec-unknown-name", "POST", CHAT, chat(speculative="warp"), 400, BAD, "speculative"),
    ("spec-missing-method", "POST", CHAT, chat(speculative={}), 400, BAD, "speculative.method"),
    ("prompt-missing", "POST", COMP, without(comp(), "prompt"), 400, BAD, "prompt"),
    ("prompt-empty", "POST", COMP, comp(prompt=""), 400, BAD, "prompt"),
    ("prompt-empty-list", "POST", COMP, comp(prompt=[]), 400, BAD, "prompt"),
    ("prompt-mixed", "POST", COMP, comp(prompt=[1, "a"]), 400, BAD, "prompt"),
    ("prompt-token-out-of-vocab", "POST", COMP, comp(prompt=[1_000_000]), 400, BAD, "prompt"),
    ("prompt-object", "POST", COMP, comp(prompt={}), 400, BAD, "prompt"),
    ("completion-logprobs-21", "POST", COMP, comp(logprobs=21), 400, BAD, "logprobs"),
    ("echo-with-logprobs", "POST", COMP, comp(echo=True, logprobs=1), 400, BAD, "echo"),
    ("best-of", "POST", COMP, comp(best_of=3), 400, BAD, "best_of"),
    ("suffix", "POST", COMP, comp(suffix="!"), 400, BAD, "suffix"),
    ("completion-context", "POST", COMP, comp(prompt="x" * 250, max_tokens=16), 400, BAD, "messages"),
    ("completion-unknown-model", "POST", COMP, comp(model="davinci"), 404, BAD, "model"),
    ("wrong-method", "GET", CHAT, None, 405, BAD, None),
    ("unknown-route", "POST", "/v1/embeddings", comp(), 404, BAD, None),
    ("tokenize-both", "POST", "/tokenize", {"prompt": "a", "messages": MSGS}, 400, BAD, "prompt"),
    ("tokenize-unknown-model", "POST", "/tokenize", {"model": "x", "prompt": "a"}, 404, BAD, "model"),
    ("detokenize-bad-id", "POST", "/detokenize", {"tokens": [-1]}, 400, BAD, "tokens"),
    ("model-unknown", "GET", "/v1/models/gpt-9", None, 404, BAD, "model"),
]


@pytest.fixture(scope="module")
def server():
    s = fake_server(api_key="sk-table")
    yield s
    s.stop()


def assert_openai_error(reply, status: int, type_: str) -> dict:
    assert reply.status == status, reply.body
    assert reply.headers["content-type"].startswith("application/json")
    err = reply.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == type_ and err["message"]
    assert len(err["message"]) <= 512
    if 400 <= status < 500 and status != 429:
        assert reply.headers["x-should-retry"] == "false"
    return err


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_request(server, case):
    _, method, path, body, status, type_, param = case
    err = assert_openai_error(fetch(server, method, path, body), status, type_)
    if param is not None:
        assert err["param"] == param, err


def test_table_is_big_enough():
    assert len(CASES) >= 40


def test_server_still_serves_after_the_table(server):
    for case in CASES:
        fetch(server, case[1], case[2], case[3])
    reply = fetch(server, "POST", CHAT, chat(max_tokens=4))
    assert reply.status == 200 and reply.json()["usage"]["completion_tokens"] == 4
    assert fetch(server, "GET", "/health").status == 200


def test_context_length_message_has_the_phrase_clients_match(server):
    err = fetch(server, "POST", CHAT, chat(max_tokens=10_000)).json()["error"]
    prompt_len = len("<user>hi\n<assistant>")
    assert err["message"].startswith(
        f"This model's maximum context length is 256 tokens. However, you requested {prompt_len + 10_000} "
        f"tokens ({prompt_len} in the messages, 10000 in the completion)."
    )
    assert err["code"] == "context_length_exceeded"


def test_huge_unknown_field_is_not_echoed_back(server):
    reply = fetch(server, "POST", CHAT, chat(**{"x" * 100_000: 1}))
    assert_openai_error(reply, 400, BAD)


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "sk-table"}],
    ids=["none", "wrong", "no-bearer"],
)
@pytest.mark.parametrize(
    "route",
    [
        ("POST", CHAT),
        ("POST", COMP),
        ("GET", "/v1/models"),
        ("GET", "/metrics"),
        ("POST", "/tokenize"),
        ("GET", "/nope"),
    ],
)
def test_auth_required_everywhere_but_health(server, headers, route):
    reply = fetch(server, route[0], route[1], chat(), headers=headers, auth=False)
    err = assert_openai_error(reply, 401, BAD)
    assert err["code"] == "invalid_api_key"


def test_health_needs_no_key(server):
    assert fetch(server, "GET", "/health", auth=False).status == 200


def test_body_too_large_is_413():
    s = fake_server(max_body_bytes=1024)
    try:
        reply = fetch(s, "POST", CHAT, chat(messages=[{"role": "user", "content": "x" * 4096}]))
        assert_openai_error(reply, 413, BAD)
        assert fetch(s, "POST", CHAT, chat(max_tokens=2)).status == 200
    finally:
        s.stop()
