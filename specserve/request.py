"""One sequence being generated: its tokens, its KV progress and its stop state."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from specserve.detokenizer import IncrementalDetokenizer
from specserve.outputs import Logprob, RequestMetrics
from specserve.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """A single sample (one of a request's n) with its scheduler state.

    `num_computed_tokens` counts tokens whose K/V is in the cache. A request is decoding when only its last
    token lacks K/V: that token is the root of the next verify tree.
    """

    request_id: str
    group_id: str
    index: int  # which of the group's n samples
    token_ids: list[int]  # prompt + output
    num_prompt_tokens: int
    params: SamplingParams
    max_tokens: int
    eos_token_ids: frozenset[int]
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None  # per-request, for seeded sampling
    spec_arm: str
    metrics: RequestMetrics
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_decoding(self) -> bool:
        return self.num_computed_tokens == self.num_tokens - 1

    @property
    def finished(self) -> bool:
        return self.status == RequestStatus.FINISHED
