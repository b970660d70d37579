"""POST /v1/completions (legacy text completions), streamed or not; batch prompts and echo included."""

from __future__ import annotations

import time
import uuid

from aiohttp import web
from msgspec import UNSET

from .errors import APIError, bad_request
from .generation import ChoiceDelta, Generation
from .logprobs import completion_logprobs
from .prompts import completion_prompts, resolve_max_tokens
from .protocol import Completion, CompletionChoice, CompletionRequest
from .sampling import build_params, check_common, check_completion
from .sse import EventStream
from .state import base_headers, json_response, read_request, state_of

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for legacy completions


async def completions(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    req = await read_request(request, CompletionRequest)
    state.check_model(req.model)
    check_common(req, state.max_num_seqs)
    check_completion(req)
    prompts = completion_prompts(state.tokenizer, req.prompt)
    n = req.n or 1
    if len(prompts) * n > state.engine.capacity:
        raise bad_request(
            f"{len(prompts)} prompts x n={n} exceed the {state.engine.capacity} sequences this server admits at once.",
            "prompt",
        )
    requested = req.max_tokens if req.max_tokens is not None else DEFAULT_MAX_TOKENS
    for p in prompts:  # each prompt of a batch must fit with the whole budget
        resolve_max_tokens(requested, len(p.token_ids), state.max_model_len)
    params = build_params(req, max_tokens=requested, logprobs=req.logprobs)
    arm = state.arms.choose(req.speculative, req.user)
    reply = _Reply(f"cmpl-{uuid.uuid4().hex}", int(time.time()), state.model_name, req.logprobs)
    gen = Generation(state.engine, reply.id, prompts, params, arm)
    echoes = [p.text if req.echo else "" for p in prompts for _ in range(n)]
    headers = {**base_headers(request), "x-specserve-arm": arm.label}
    await gen.start()
    try:
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return await _stream(request, gen, reply, echoes, headers, include_usage)
        choices = await gen.wait()
        return json_response(
            Completion(
                reply.id,
                reply.created,
                reply.model,
                [
                    CompletionChoice(
                        i,
                        echoes[i] + c.text,
                        reply.logprobs(c.token_ids, c.logprobs, len(echoes[i])),
                        c.finish_reason,
                    )
                    for i, c in enumerate(choices)
                ],
                usage=gen.usage(),
            ),
            headers,
        )
    finally:
        gen.close()


class _Reply:
    """The fixed parts of every chunk of one response."""

    def __init__(self, id: str, created: int, model: str, top_n: int | None) -> None:
        self.id, self.created, self.model, self.top_n = id, created, model, top_n

    def chunk(self, choices: list[CompletionChoice], usage=UNSET) -> Completion:
        return Completion(self.id, self.created, self.model, choices, usage=usage)

    def logprobs(self, token_ids: list[int], entries: list | None, text_start: int):
        if self.top_n is None or entries is None:
            return None
        return completion_logprobs(token_ids, entries, self.top_n, text_start)


async def _stream(
    request: web.Request,
    gen: Generation,
    reply: _Reply,
    echoes: list[str],
    headers: dict[str, str],
    include_usage: bool,
) -> web.StreamResponse:
    usage = None if include_usage else UNSET
    stream = EventStream(request, headers)
    await stream.open()
    # where the next token's text starts in each choice's full text (logprobs' text_offset)
    offsets = [len(e) for e in echoes]
    await stream.send(*(reply.chunk([CompletionChoice(i, e)], usage) for i, e in enumerate(echoes) if e))
    try:
        async for batch in gen.deltas(state_of(request).keep_alive_s):
            if not batch:
                await stream.keep_alive()
            await stream.send(*(c for d in batch for c in _chunks(reply, d, offsets, usage)))
    except APIError as e:
        await stream.fail(e)
        return stream.response
    if include_usage:
        await stream.send(reply.chunk([], gen.usage()))
    await stream.done()
    return stream.response


def _chunks(reply: _Reply, d: ChoiceDelta, offsets: list[int], usage) -> list[Completion]:
    out = []
    logprobs = reply.logprobs(d.token_ids, d.logprobs, offsets[d.index])
    if logprobs is not None:
        offsets[d.index] += sum(len(t) for t in logprobs.tokens)
    if d.text or (logprobs is not None and logprobs.tokens):
        out.append(reply.chunk([CompletionChoice(d.index, d.text, logprobs)], usage))
    if d.finish_reason is not None:
        out.append(reply.chunk([CompletionChoice(d.index, "", None, d.finish_reason)], usage))
    return out
