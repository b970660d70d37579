"""Request fields -> SamplingParams, with OpenAI's ranges and a 400 for features this server cannot honour.

SamplingParams checks vLLM's bounds itself; this module adds OpenAI's narrower ones (temperature <= 2,
n <= 128, at most 4 stop strings) and refuses fields that would silently change the output if ignored.
"""

from __future__ import annotations

from specserve.sampling_params import SamplingParams

from .errors import bad_request
from .protocol import ChatCompletionRequest, CompletionRequest, SamplingFields

MAX_N = 128
MAX_STOP = 4
MAX_TOP_LOGPROBS = 20
INT64 = 2**63


def check_common(req: SamplingFields, max_num_seqs: int) -> None:
    """OpenAI's ranges for the fields chat and completions share."""
    if req.temperature is not None and not 0 <= req.temperature <= 2:
        raise bad_request(f"temperature must be in [0, 2], got {req.temperature}.", "temperature")
    if req.n is not None:
        if not 1 <= req.n <= MAX_N:
            raise bad_request(f"n must be in [1, {MAX_N}], got {req.n}.", "n")
        if req.n > max_num_seqs:
            raise bad_request(f"n must be <= {max_num_seqs}, the server's --max-num-seqs, got {req.n}.", "n")
    stops = [req.stop] if isinstance(req.stop, str) else req.stop or []
    if len(stops) > MAX_STOP:
        raise bad_request(f"stop takes at most {MAX_STOP} sequences, got {len(stops)}.", "stop")
    if any(not s for s in stops):
        raise bad_request("stop sequences must be non-empty strings.", "stop")
    if req.seed is not None and not -INT64 <= req.seed < INT64:
        raise bad_request("seed must fit in a signed 64-bit integer.", "seed")
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed when stream is true.", "stream_options")
    if req.logit_bias:
        for key, bias in req.logit_bias.items():
            if not key.lstrip("-").isdigit():
                raise bad_request("logit_bias keys must be token ids.", "logit_bias")
            if not -100 <= bias <= 100:
                raise bad_request(f"logit_bias values must be in [-100, 100], got {bias}.", "logit_bias")


def check_chat(req: ChatCompletionRequest) -> None:
    """Chat-only fields: logprobs pairing, and features whose absence would change the answer."""
    if req.top_logprobs is not None:
        if not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
            raise bad_request(
                f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {req.top_logprobs}.", "top_logprobs"
            )
        if not req.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true.", "top_logprobs")
    if req.tools or req.functions:
        raise bad_request("Tool and function calling are not supported by this server.", "tools", "unsupported")
    if req.tool_choice not in (None, "none", "auto") or req.function_call not in (None, "none", "auto"):
        raise bad_request("tool_choice needs tools, which this server does not support.", "tool_choice", "unsupported")
    fmt = (req.response_format or {}).get("type", "text")
    if fmt != "text":
        raise bad_request(f"response_format {fmt!r} is not supported; only 'text'.", "response_format", "unsupported")
    if req.modalities not in (None, ["text"]) or req.audio is not None:
        raise bad_request("Only text output is supported.", "modalities", "unsupported")
    if req.prediction is not None or req.web_search_options is not None:
        field = "prediction" if req.prediction is not None else "web_search_options"
        raise bad_request(f"{field} is not supported by this server.", field, "unsupported")


def check_completion(req: CompletionRequest) -> None:
    if req.logprobs is not None and not 0 <= req.logprobs <= MAX_TOP_LOGPROBS:
        raise bad_request(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {req.logprobs}.", "logprobs")
    if req.echo and req.logprobs is not None:
        raise bad_request(
            "echo with logprobs needs prompt logprobs, which this server does not compute.",
            "echo",
            "unsupported",
        )
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise bad_request("best_of other than n is not supported.", "best_of", "unsupported")
    if req.suffix:
        raise bad_request("suffix is not supported by this server.", "suffix", "unsupported")


def build_params(req: SamplingFields, *, max_tokens: int, logprobs: int | None) -> SamplingParams:
    """SamplingParams for this request; a ValueError from its checks becomes a 400 naming the field."""
    given = {
        "n": req.n,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "min_p": req.min_p,
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        "repetition_penalty": req.repetition_penalty,
        "seed": req.seed,
        "min_tokens": req.min_tokens,
        "stop": req.stop,
        "stop_token_ids": req.stop_token_ids,
        "ignore_eos": req.ignore_eos,
        "skip_special_tokens": req.skip_special_tokens,
        "logit_bias": {int(k): v for k, v in req.logit_bias.items()} if req.logit_bias else None,
    }
    try:
        return SamplingParams(
            max_tokens=max_tokens, logprobs=logprobs, **{k: v for k, v in given.items() if v is not None}
        )
    except ValueError as e:
        message = str(e)
        param = message.split(" ", 1)[0]
        raise bad_request(message, param if param in {*given, "max_tokens"} else None) from None
