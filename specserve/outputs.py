"""What the engine hands back: vLLM-shaped RequestOutput with speculation statistics."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int  # 1 = most likely under the target distribution
    decoded_token: str


@dataclass
class RequestMetrics:
    """Timing and speculation figures of one request (cumulative).

    tau (`mean_accepted_length`) is tokens emitted per target forward that decoded this request.
    """

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache
    num_steps: int = 0  # target forwards that produced tokens for this request
    num_generated_tokens: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # [k]: accepted drafts at depth i+1
    drafts_per_position: list[int] = field(default_factory=list)  # [k]: drafts proposed at depth i+1
    num_preemptions: int = 0
    spec_arm: str = "none"

    @property
    def mean_accepted_length(self) -> float:
        return self.num_generated_tokens / self.num_steps if self.num_steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0


@dataclass
class CompletionOutput:
    """One of the n samples of a request; text and token_ids are cumulative."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None  # one dict per token in token_ids
    finish_reason: str | None = None  # None while running, else "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
