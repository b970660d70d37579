"""Prompts to token ids, and the context-length check that must happen before anything is queued."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import bad_request
from .protocol import ChatMessage

_ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for system; chat templates know "system"


@dataclass
class Prompt:
    token_ids: list[int]
    text: str  # what `echo` prepends


def chat_prompt(
    tokenizer: Any,
    messages: list[ChatMessage],
    *,
    add_generation_prompt: bool = True,
    add_special_tokens: bool = False,
) -> Prompt:
    """The chat template applied (the template itself places BOS and role markers)."""
    if not messages:
        raise bad_request("messages must be a non-empty array.", "messages")
    rendered = [_template_message(m, i) for i, m in enumerate(messages)]
    try:
        text = tokenizer.apply_chat_template(rendered, add_generation_prompt=add_generation_prompt, tokenize=False)
    except Exception as e:  # jinja raises on role orders a template refuses
        raise bad_request(f"The chat template rejected these messages: {e}", "messages") from None
    return Prompt(tokenizer.encode(text, add_special_tokens=add_special_tokens), text)


def _template_message(m: ChatMessage, i: int) -> dict[str, Any]:
    if isinstance(m.content, list):
        texts = []
        for part in m.content:
            if part.type != "text" or part.text is None:
                raise bad_request(
                    f"Only text content parts are supported, got {part.type!r}.", f"messages[{i}].content"
                )
            texts.append(part.text)
        content = "\n".join(texts)
    else:
        content = m.content or ""
    out: dict[str, Any] = {"role": _ROLE_ALIASES.get(m.role, m.role), "content": content}
    if m.name is not None:
        out["name"] = m.name
    if m.tool_calls is not None:
        out["tool_calls"] = m.tool_calls
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


def completion_prompts(tokenizer: Any, prompt: str | list[Any]) -> list[Prompt]:
    """`prompt` as OpenAI allows it: a string, [string], [token] or [[token]]."""
    if isinstance(prompt, str):
        return [_text_prompt(tokenizer, prompt)]
    if not prompt:
        raise bad_request("prompt must not be empty.", "prompt")
    if all(isinstance(p, str) for p in prompt):
        return [_text_prompt(tokenizer, p) for p in prompt]
    if all(_is_token(t) for t in prompt):
        return [_token_prompt(tokenizer, prompt)]
    if all(isinstance(p, list) for p in prompt):
        return [_token_prompt(tokenizer, p) for p in prompt]
    raise bad_request(
        "prompt must be a string, an array of strings, an array of token ids or an array of token id arrays.",
        "prompt",
    )


def _text_prompt(tokenizer: Any, text: str) -> Prompt:
    if not text:
        raise bad_request("prompt must not be empty.", "prompt")
    return Prompt(tokenizer.encode(text), text)


def _token_prompt(tokenizer: Any, ids: list[Any]) -> Prompt:
    vocab = len(tokenizer)
    if not ids:
        raise bad_request("prompt must not be empty.", "prompt")
    if not all(_is_token(t) and 0 <= t < vocab for t in ids):
        raise bad_request(f"prompt token ids must be integers in [0, {vocab}).", "prompt")
    return Prompt(list(ids), tokenizer.decode(ids))


def _is_token(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


def resolve_max_tokens(requested: int | None, prompt_len: int, max_model_len: int) -> int:
    """The completion budget: the request's, else what the context leaves; 400 if they don't fit."""
    if requested is None:
        if prompt_len >= max_model_len:
            raise bad_request(
                f"This model's maximum context length is {max_model_len} tokens. However, your request has "
                f"{prompt_len} input tokens. Please reduce the length of the input messages.",
                "messages",
                "context_length_exceeded",
            )
        return max_model_len - prompt_len
    if requested >= 1 and prompt_len + requested > max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the messages, {requested} in the completion). "
            "Please reduce the length of the messages or completion.",
            "messages",
            "context_length_exceeded",
        )
    return requested  # values < 1 are left to SamplingParams, which names the field
