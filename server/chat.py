"""POST /v1/chat/completions, streamed or not."""

from __future__ import annotations

import time
import uuid

from aiohttp import web
from msgspec import UNSET

from .errors import APIError
from .generation import ChoiceDelta, Generation
from .logprobs import chat_logprobs
from .prompts import chat_prompt, resolve_max_tokens
from .protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatLogprobs,
    Delta,
)
from .sampling import build_params, check_chat, check_common
from .sse import EventStream
from .state import base_headers, json_response, read_request, state_of


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    req = await read_request(request, ChatCompletionRequest)
    state.check_model(req.model)
    check_common(req, state.max_num_seqs)
    check_chat(req)
    prompt = chat_prompt(state.tokenizer, req.messages)
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_tokens = resolve_max_tokens(requested, len(prompt.token_ids), state.max_model_len)
    top_n = req.top_logprobs or 0
    params = build_params(req, max_tokens=max_tokens, logprobs=top_n if req.logprobs else None)
    arm = state.arms.choose(req.speculative, req.user)
    reply = _Reply(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), state.model_name, top_n)
    gen = Generation(state.engine, reply.id, [prompt], params, arm)
    headers = {**base_headers(request), "x-specserve-arm": arm.label}
    await gen.start()
    try:
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return await _stream(request, gen, reply, headers, include_usage)
        choices = await gen.wait()
        return json_response(
            ChatCompletion(
                reply.id,
                reply.created,
                reply.model,
                [
                    ChatChoice(
                        i,
                        AssistantMessage("assistant", c.text),
                        reply.logprobs(c.token_ids, c.logprobs) if req.logprobs else None,
                        c.finish_reason,
                    )
                    for i, c in enumerate(choices)
                ],
                gen.usage(),
            ),
            headers,
        )
    finally:
        gen.close()


class _Reply:
    """The fixed parts of every chunk of one response."""

    def __init__(self, id: str, created: int, model: str, top_n: int) -> None:
        self.id, self.created, self.model, self.top_n = id, created, model, top_n

    def chunk(self, choice: ChatChunkChoice | None, usage=UNSET) -> ChatCompletionChunk:
        return ChatCompletionChunk(self.id, self.created, self.model, [choice] if choice else [], usage=usage)

    def logprobs(self, token_ids: list[int], entries: list | None) -> ChatLogprobs | None:
        return None if entries is None else ChatLogprobs(chat_logprobs(token_ids, entries, self.top_n))


async def _stream(
    request: web.Request, gen: Generation, reply: _Reply, headers: dict[str, str], include_usage: bool
) -> web.StreamResponse:
    usage = None if include_usage else UNSET  # with include_usage every chunk says "usage": null
    stream = EventStream(request, headers)
    await stream.open()
    num_choices = len(gen.prompts) * gen.n
    await stream.send(
        *(reply.chunk(ChatChunkChoice(i, Delta(role="assistant", content="")), usage) for i in range(num_choices))
    )
    try:
        async for batch in gen.deltas(state_of(request).keep_alive_s):
            if not batch:
                await stream.keep_alive()
            await stream.send(*(c for d in batch for c in _chunks(reply, d, usage)))
    except APIError as e:
        await stream.fail(e)
        return stream.response
    if include_usage:
        await stream.send(reply.chunk(None, gen.usage()))
    await stream.done()
    return stream.response


def _chunks(reply: _Reply, d: ChoiceDelta, usage) -> list[ChatCompletionChunk]:
    """A content chunk if there is anything new, then the choice's own closing chunk when it finishes."""
    out = []
    logprobs = reply.logprobs(d.token_ids, d.logprobs)
    if d.text or (logprobs is not None and logprobs.content):
        out.append(reply.chunk(ChatChunkChoice(d.index, Delta(content=d.text), logprobs), usage))
    if d.finish_reason is not None:
        out.append(reply.chunk(ChatChunkChoice(d.index, Delta(), None, d.finish_reason), usage))
    return out
