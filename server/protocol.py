"""Wire types of the OpenAI-compatible API as msgspec Structs: decoding one validates types and field names.

Request Structs forbid unknown top-level fields the way OpenAI does ("Unrecognized request argument"),
but list every documented OpenAI field plus vLLM's extra sampling fields, so no real client trips on
them. Nested message objects stay lenient: SDKs echo assistant messages back with extra keys.
Response fields set to `UNSET` are left out of the JSON; `None` is sent as null.
"""

from __future__ import annotations

import re
from typing import Any, Literal, TypeVar

import msgspec
from msgspec import UNSET, Struct, UnsetType

from .errors import APIError, bad_request

T = TypeVar("T")


class StreamOptions(Struct, forbid_unknown_fields=True):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # accepted; no obfuscation padding is sent


class SpeculativeChoice(Struct, forbid_unknown_fields=True):
    """The `speculative` extra field: which of the server's drafter arms serves this request."""

    method: str
    num_speculative_tokens: int | None = None


class ContentPart(Struct):
    type: str
    text: str | None = None


class ChatMessage(Struct):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class SamplingFields(Struct, kw_only=True, forbid_unknown_fields=True):
    """Fields common to chat and legacy completions (OpenAI's, then vLLM's extras, then specserve's)."""

    model: str
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    max_tokens: int | None = None
    n: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    user: str | None = None
    # vLLM's extra sampling fields
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    # specserve: pick a drafter arm by name ("none" included) or by method and k
    speculative: str | SpeculativeChoice | None = None


class ChatCompletionRequest(SamplingFields, kw_only=True, forbid_unknown_fields=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None


class CompletionRequest(SamplingFields, kw_only=True, forbid_unknown_fields=True):
    prompt: str | list[Any]  # str, [str], [int] or [[int]]: checked in prompts.py
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class TokenizeRequest(Struct, kw_only=True, forbid_unknown_fields=True):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(Struct, kw_only=True, forbid_unknown_fields=True):
    model: str | None = None
    tokens: list[int]


# ---- responses ----


class Usage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Struct):
    content: list[TokenLogprob]


class AssistantMessage(Struct):
    role: str
    content: str


class ChatChoice(Struct):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletion(Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    object: str = "chat.completion"


class Delta(Struct):
    role: str | UnsetType = UNSET
    content: str | UnsetType = UNSET


class ChatChunkChoice(Struct):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    object: str = "chat.completion.chunk"
    usage: Usage | None | UnsetType = UNSET  # null on every chunk when include_usage, else absent


class CompletionLogprobs(Struct):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(Struct):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(Struct):
    """Both the non-streamed response and each streamed chunk (OpenAI uses one object type for both)."""

    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    object: str = "text_completion"
    usage: Usage | None | UnsetType = UNSET


class ModelCard(Struct):
    id: str
    created: int
    owned_by: str
    max_model_len: int
    object: str = "model"


class ModelList(Struct):
    data: list[ModelCard]
    object: str = "list"


class TokenizeResponse(Struct):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(Struct):
    prompt: str


encoder = msgspec.json.Encoder()

_UNKNOWN = re.compile(r"Object contains unknown field `([^`]*)`(?: - at `\$\.?(.*)`)?$", re.S)
_MISSING = re.compile(r"Object missing required field `([^`]*)`(?: - at `\$\.?(.*)`)?$", re.S)
_AT = re.compile(r"^(.*) - at `\$\.?(.*)`$", re.S)


def decode(body: bytes, cls: type[T]) -> T:
    """Parse and type-check a request body, or raise a 400 naming the offending parameter."""
    try:
        return msgspec.json.decode(body, type=cls)
    except msgspec.ValidationError as e:
        raise _validation_error(str(e)) from None
    except msgspec.DecodeError as e:
        raise bad_request(
            f"We could not parse the JSON body of your request ({e}). The body must be one JSON object.",
            code="invalid_json",
        ) from None


def _validation_error(text: str) -> APIError:
    if m := _UNKNOWN.match(text):
        param = _join(m.group(2), m.group(1))
        return bad_request(f"Unrecognized request argument supplied: {param}", param=param)
    if m := _MISSING.match(text):
        param = _join(m.group(2), m.group(1))
        return bad_request(f"Missing required parameter: '{param}'.", param=param)
    if m := _AT.match(text):
        param = m.group(2)
        return bad_request(f"Invalid value for '{param}': {m.group(1)}.", param=param, code="invalid_type")
    return bad_request(f"Invalid request body: {text}.", code="invalid_type")


def _join(path: str | None, name: str) -> str:
    return f"{path}.{name}" if path else name
