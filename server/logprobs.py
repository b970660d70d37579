"""Engine logprobs ({token_id: Logprob} per emitted token) in the chat and legacy-completions shapes."""

from __future__ import annotations

from specserve.outputs import Logprob

from .protocol import CompletionLogprobs, TokenLogprob, TopLogprob


def _ranked(entry: dict[int, Logprob], top_n: int) -> list[Logprob]:
    """The top_n alternatives by rank (the sampled token is in `entry` even when it ranks lower)."""
    return sorted((lp for lp in entry.values() if lp.rank <= top_n), key=lambda lp: lp.rank)


def _bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", "surrogatepass"))


def chat_logprobs(token_ids: list[int], entries: list[dict[int, Logprob]], top_n: int) -> list[TokenLogprob]:
    """One `logprobs.content` item per token; a speculative chunk carrying k tokens gets k items."""
    out = []
    for tok, entry in zip(token_ids, entries, strict=True):
        chosen = entry[tok]
        top = [TopLogprob(lp.decoded_token, lp.logprob, _bytes(lp.decoded_token)) for lp in _ranked(entry, top_n)]
        out.append(TokenLogprob(chosen.decoded_token, chosen.logprob, _bytes(chosen.decoded_token), top))
    return out


def completion_logprobs(
    token_ids: list[int], entries: list[dict[int, Logprob]], top_n: int, text_start: int
) -> CompletionLogprobs:
    """The legacy shape; `text_offset` counts characters from the start of the choice's text."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    offset = text_start
    for tok, entry in zip(token_ids, entries, strict=True):
        chosen = entry[tok]
        tokens.append(chosen.decoded_token)
        token_logprobs.append(chosen.logprob)
        # vLLM's convention: the sampled token always appears among the alternatives
        top = {lp.decoded_token: lp.logprob for lp in _ranked(entry, top_n)}
        top.setdefault(chosen.decoded_token, chosen.logprob)
        top_logprobs.append(top)
        offsets.append(offset)
        offset += len(chosen.decoded_token)
    return CompletionLogprobs(tokens, token_logprobs, top_logprobs, offsets)
