"""One API call's generation: its engine requests (prompts x n samples) turned into per-choice deltas.

The engine reports cumulative text, token ids and logprobs; a Generation remembers what each choice has
already been given and hands out only the new part, so streamed deltas concatenate to the final text.
Choice index = prompt index * n + sample index (OpenAI orders batch choices prompt by prompt).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from specserve.outputs import CompletionOutput, Logprob, RequestOutput
from specserve.sampling_params import SamplingParams

from .arms import ArmChoice
from .async_engine import AsyncEngine, OutputSink
from .prompts import Prompt
from .protocol import Usage


@dataclass
class ChoiceDelta:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None  # one entry per token in token_ids
    finish_reason: str | None  # set on the choice's last delta


@dataclass
class ChoiceState:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    finish_reason: str | None = None


class Generation:
    """Submits the prompts, yields deltas as the engine steps, aborts whatever is unfinished on close."""

    def __init__(
        self,
        engine: AsyncEngine,
        request_id: str,
        prompts: list[Prompt],
        params: SamplingParams,
        arm: ArmChoice,
    ) -> None:
        self._engine = engine
        self._params = params
        self._arm = arm
        self.prompts = prompts
        self.n = params.n
        self._request_ids = [f"{request_id}-{i}" for i in range(len(prompts))]
        self._first_index = {rid: i * self.n for i, rid in enumerate(self._request_ids)}
        self._choices = [ChoiceState() for _ in range(len(prompts) * self.n)]
        self._sink = OutputSink()
        self._unfinished = set(self._request_ids)

    async def start(self) -> None:
        """Hand every prompt to the engine; on any refusal, withdraw the ones already taken and re-raise."""
        try:
            for request_id, prompt in zip(self._request_ids, self.prompts, strict=True):
                await self._engine.add(self._sink, request_id, prompt.token_ids, self._params, self._arm)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Abort engine requests that have not finished (client gone, error, shutdown)."""
        for request_id in self._unfinished:
            self._engine.abort(request_id)
        self._unfinished.clear()

    @property
    def finished(self) -> bool:
        return not self._unfinished

    async def deltas(self, idle_timeout: float | None = None) -> AsyncIterator[list[ChoiceDelta]]:
        """Batches of new text per choice until every choice has finished (APIError if the engine fails).

        With `idle_timeout`, an empty batch means nothing happened for that long (time for a keep-alive).
        """
        while self._unfinished:
            try:
                outputs = await asyncio.wait_for(self._sink.next(), idle_timeout)
            except asyncio.TimeoutError:
                yield []
                continue
            batch = [d for out in outputs for d in self._apply(out)]
            if batch:
                yield batch

    async def wait(self) -> list[ChoiceState]:
        """Run to completion; the final state of every choice, by index."""
        async for _ in self.deltas():
            pass
        return self._choices

    def usage(self) -> Usage:
        prompt_tokens = sum(len(p.token_ids) for p in self.prompts)
        completion_tokens = sum(len(c.token_ids) for c in self._choices)
        return Usage(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens)

    def _apply(self, out: RequestOutput) -> list[ChoiceDelta]:
        base = self._first_index[out.request_id]
        if out.finished:
            self._unfinished.discard(out.request_id)
        return [d for o in out.outputs if (d := self._advance(base + o.index, o)) is not None]

    def _advance(self, index: int, o: CompletionOutput) -> ChoiceDelta | None:
        choice = self._choices[index]
        if choice.finish_reason is not None:
            return None
        num_sent = len(choice.token_ids)
        new_ids = o.token_ids[num_sent:]
        # usage, token_ids and logprobs must agree: cut logprobs to the tokens actually emitted
        new_logprobs = o.logprobs[num_sent : len(o.token_ids)] if o.logprobs is not None else None
        new_text = o.text[len(choice.text) :]
        if not new_ids and not new_text and o.finish_reason is None:
            return None
        choice.text = o.text
        choice.token_ids = list(o.token_ids)
        if new_logprobs is not None:
            choice.logprobs.extend(new_logprobs)
        choice.finish_reason = o.finish_reason
        return ChoiceDelta(index, new_text, new_ids, new_logprobs, o.finish_reason)
