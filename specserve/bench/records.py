"""Per-request figures of an offline run: what the JSON keeps and the summaries aggregate."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from specserve.outputs import RequestOutput


@dataclass
class RequestRecord:
    """One turn of one prompt under one arm."""

    arm: str
    prompt_id: str
    category: str
    turn: int  # 0-based; turn 1 of MT-bench continues from the arm's own turn-0 answer
    batch: int  # index of the group of requests it ran with
    num_prompt_tokens: int
    num_output_tokens: int
    num_steps: int  # target forwards that produced tokens for this request
    num_draft_tokens: int
    num_accepted_tokens: int
    accepted_per_position: list[int]
    drafts_per_position: list[int]
    ttft_s: float | None
    tpot_s: float | None  # mean time per output token after the first
    latency_s: float  # arrival to finish, as seen by the request
    finish_reason: str | None
    token_ids: list[int] = field(repr=False)
    text: str = field(repr=False)

    @property
    def tau(self) -> float:
        return self.num_output_tokens / self.num_steps if self.num_steps else 0.0

    @property
    def acceptance_rate(self) -> float | None:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else None

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "tau": self.tau, "acceptance_rate": self.acceptance_rate}

    @classmethod
    def from_output(
        cls, out: RequestOutput, *, arm: str, prompt_id: str, category: str, turn: int, batch: int
    ) -> RequestRecord:
        m, completion = out.metrics, out.outputs[0]
        n = len(completion.token_ids)
        ttft = m.first_token_time - m.arrival_time if m.first_token_time is not None else None
        tpot = (
            (m.last_token_time - m.first_token_time) / (n - 1)
            if n > 1 and m.first_token_time is not None and m.last_token_time is not None
            else None
        )
        finished = m.finished_time if m.finished_time is not None else m.last_token_time
        return cls(
            arm=arm,
            prompt_id=prompt_id,
            category=category,
            turn=turn,
            batch=batch,
            num_prompt_tokens=len(out.prompt_token_ids),
            num_output_tokens=n,
            num_steps=m.num_steps,
            num_draft_tokens=m.num_draft_tokens,
            num_accepted_tokens=m.num_accepted_tokens,
            accepted_per_position=list(m.accepted_per_position),
            drafts_per_position=list(m.drafts_per_position),
            ttft_s=ttft,
            tpot_s=tpot,
            latency_s=(finished or m.arrival_time) - m.arrival_time,
            finish_reason=completion.finish_reason,
            token_ids=list(completion.token_ids),
            text=completion.text,
        )


@dataclass
class BatchRecord:
    """Wall time of one group of requests run together under one arm (all its turns)."""

    arm: str
    batch: int
    wall_s: float
    num_output_tokens: int
