"""Continuous batching in token counts: each running request catches its KV up to its tokens.

There are no prefill or decode phases. A request whose cache lags behind by many tokens gets a chunk of
them (chunked prefill); one lagging by a single token (its root) gets that token plus a draft budget. Draft
tokens count against `max_num_batched_tokens` like any other. When blocks run out, the newest running
request is preempted: its blocks are freed and it is recomputed later (its tokens are kept).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from specserve.kv_cache import KVCacheManager
from specserve.request import Request, RequestStatus


class DraftPolicy(Protocol):
    def plan(self, caps: dict[Request, int]) -> dict[Request, int]:
        """Draft tokens per decoding request this step, at most its cap."""
        ...


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # committed tokens to run through the model (the root included)
    max_draft_tokens: int  # draft nodes the drafter may add after the root
    decoding: bool = False  # a decode step (drafts were planned for it), not a prefill chunk

    @property
    def produces_token(self) -> bool:
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens + s.max_draft_tokens for s in self.scheduled)


class Scheduler:
    """FCFS admission, chunked prefill and recompute preemption under a per-step token budget."""

    def __init__(
        self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
        draft_policy: DraftPolicy | None = None,
    ):
        self.kv = kv
        self.draft_policy = draft_policy
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, req: Request) -> None:
        """Drop a finished or aborted request and return its blocks."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(req)

    def _draft_budget(self, req: Request, max_drafts: int) -> int:
        # Tokens past max_tokens or the context would be cut anyway: don't draft them.
        remaining = min(req.max_tokens - req.num_output_tokens, self.max_model_len - req.num_tokens)
        return max(0, min(max_drafts, remaining - 1))

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.running.remove(req)
        self.kv.free(req)
        req.status = RequestStatus.WAITING
        req.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)
        out.preempted.append(req)

    def schedule(self, draft_limits: dict[str, int]) -> SchedulerOutput:
        """Pick this step's requests; `draft_limits` maps a drafter arm to its max draft nodes."""
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        caps = {r: self._draft_budget(r, draft_limits.get(r.spec_arm, 0)) for r in self.running if r.is_decoding}
        if self.draft_policy is not None and caps:
            caps = self.draft_policy.plan(caps)  # adaptive speculation: fewer drafts where they don't pay
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            drafts = 0
            if req.is_decoding:
                drafts = min(caps[req], budget - num_new)
            while not self.kv.allocate(req, req.num_computed_tokens + num_new + drafts):
                if drafts:
                    drafts = 0  # shrink speculation before preempting anyone
                    continue
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is req:
                    break
            else:
                out.scheduled.append(ScheduledRequest(req, num_new, drafts, req.is_decoding))
                budget -= num_new + drafts
                i += 1
        preempted_now = bool(out.preempted)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted_now:
            req = self.waiting[0]
            if not req.block_ids:
                self.kv.attach_prefix(req)
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self.kv.allocate(req, req.num_computed_tokens + num_new):
                self.kv.free(req)  # let go of the prefix hits too: they are found again next step
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, num_new, 0))
            budget -= num_new
        return out
