"""Prometheus metrics under vLLM's names with the `specserve:` prefix, fed from the engine thread.

Each app owns its CollectorRegistry, so several servers can live in one process (tests). Request-level
series carry the labels model_name and arm (the drafter arm that served the request); engine-level ones
carry model_name only. Speculation counters move as tokens are committed, not when requests finish.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from specserve.outputs import RequestOutput

TTFT_BUCKETS = [
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1,
    2.5,
    5,
    7.5,
    10,
    20,
    40,
    80,
    160,
    640,
    2560,
]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80]
REQUEST_BUCKETS = [
    0.3,
    0.5,
    0.8,
    1,
    1.5,
    2,
    2.5,
    5,
    10,
    15,
    20,
    30,
    40,
    50,
    60,
    120,
    240,
    480,
    960,
    1920,
    7680,
]
ACCEPT_LENGTH_BUCKETS = [1, 1.5, 2, 2.5, 3, 3.5, 4, 5, 6, 7, 8, 10, 12, 16, 24, 32, 64]

P = "specserve:"
ENGINE = ["model_name"]
REQUEST = ["model_name", "arm"]


@dataclass
class _Track:
    """What was already counted for one live request (its outputs are cumulative)."""

    label: str
    num_seqs: int
    num_tokens: int = 0
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)
    last_token_time: float | None = None


class ServerMetrics:
    """All series of one server; implements the AsyncEngine's StepObserver."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge(P + "num_requests_running", "Requests in the running batch.", ENGINE, registry=r)
        self.waiting = Gauge(P + "num_requests_waiting", "Requests waiting to be scheduled.", ENGINE, registry=r)
        self.kv_usage = Gauge(P + "kv_cache_usage_perc", "Fraction of KV blocks in use (0..1).", ENGINE, registry=r)
        self.prefix_queries = Counter(
            P + "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", ENGINE, registry=r
        )
        self.prefix_hits = Counter(
            P + "prefix_cache_hits", "Prompt tokens found in the prefix cache.", ENGINE, registry=r
        )
        self.preemptions = Counter(P + "num_preemptions", "Requests preempted for KV space.", ENGINE, registry=r)
        self.prompt_tokens = Counter(P + "prompt_tokens", "Prompt tokens admitted.", REQUEST, registry=r)
        self.generation_tokens = Counter(P + "generation_tokens", "Tokens generated.", REQUEST, registry=r)
        self.success = Counter(
            P + "request_success",
            "Finished sequences by finish reason.",
            REQUEST + ["finished_reason"],
            registry=r,
        )
        self.ttft = Histogram(
            P + "time_to_first_token_seconds",
            "Arrival to first token.",
            REQUEST,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            P + "inter_token_latency_seconds",
            "Time between a request's outputs.",
            REQUEST,
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            P + "e2e_request_latency_seconds",
            "Arrival to finish.",
            REQUEST,
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            P + "request_queue_time_seconds",
            "Arrival to first scheduled.",
            REQUEST,
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.drafts = Counter(P + "spec_decode_num_drafts", "Draft proposals verified.", REQUEST, registry=r)
        self.draft_tokens = Counter(P + "spec_decode_num_draft_tokens", "Draft tokens verified.", REQUEST, registry=r)
        self.accepted = Counter(P + "spec_decode_num_accepted_tokens", "Draft tokens accepted.", REQUEST, registry=r)
        self.accepted_per_pos = Counter(
            P + "spec_decode_num_accepted_tokens_per_pos",
            "Draft tokens accepted at each draft depth (0-based).",
            REQUEST + ["position"],
            registry=r,
        )
        self.accept_length = Histogram(
            P + "spec_decode_acceptance_length",
            "Tokens emitted per verify step (1 + accepted drafts).",
            REQUEST,
            buckets=ACCEPT_LENGTH_BUCKETS,
            registry=r,
        )
        self._tracks: dict[str, _Track] = {}
        self._last_stats: Any = None

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # ---- StepObserver (engine thread) ----

    def on_add(self, request_id: str, label: str, num_prompt_tokens: int, num_seqs: int) -> None:
        self._tracks[request_id] = _Track(label, num_seqs)
        self.prompt_tokens.labels(self.model_name, label).inc(num_prompt_tokens)

    def on_abort(self, request_id: str) -> None:
        track = self._tracks.pop(request_id, None)
        if track is not None:
            self.success.labels(self.model_name, track.label, "abort").inc(track.num_seqs)

    def on_outputs(self, outputs: list[RequestOutput]) -> None:
        now = time.time()
        for out in outputs:
            track = self._tracks.get(out.request_id)
            if track is not None:
                self._observe(out, track, now)

    def on_stats(self, stats: Any) -> None:
        name = self.model_name
        self.running.labels(name).set(stats.num_running)
        self.waiting.labels(name).set(stats.num_waiting)
        self.kv_usage.labels(name).set(stats.kv_usage)
        last = self._last_stats
        for counter, attr in (
            (self.prefix_queries, "prefix_cache_queries"),
            (self.prefix_hits, "prefix_cache_hits"),
            (self.preemptions, "num_preemptions"),
        ):
            delta = getattr(stats, attr) - (getattr(last, attr) if last is not None else 0)
            if delta > 0:
                counter.labels(name).inc(delta)
        self._last_stats = stats

    def _observe(self, out: RequestOutput, track: _Track, now: float) -> None:
        labels = (self.model_name, track.label)
        m = out.metrics
        num_tokens = sum(len(o.token_ids) for o in out.outputs)
        if num_tokens > track.num_tokens:
            self.generation_tokens.labels(*labels).inc(num_tokens - track.num_tokens)
            if track.last_token_time is None:
                first = m.first_token_time if m.first_token_time is not None else now
                self.ttft.labels(*labels).observe(max(0.0, first - m.arrival_time))
                if m.first_scheduled_time is not None:
                    self.queue_time.labels(*labels).observe(max(0.0, m.first_scheduled_time - m.arrival_time))
            else:
                self.itl.labels(*labels).observe(now - track.last_token_time)
            track.last_token_time = now
            track.num_tokens = num_tokens
        self._observe_spec(m, track, labels)
        if out.finished:
            del self._tracks[out.request_id]
            finished = m.finished_time if m.finished_time is not None else now
            self.e2e.labels(*labels).observe(max(0.0, finished - m.arrival_time))
            for o in out.outputs:
                self.success.labels(*labels, o.finish_reason or "abort").inc()

    def _observe_spec(self, m: Any, track: _Track, labels: tuple[str, str]) -> None:
        num_drafts = m.drafts_per_position[0] if m.drafts_per_position else 0
        new_drafts = num_drafts - track.num_drafts
        new_draft_tokens = m.num_draft_tokens - track.num_draft_tokens
        new_accepted = m.num_accepted_tokens - track.num_accepted
        if new_drafts > 0:
            self.drafts.labels(*labels).inc(new_drafts)
            self.accept_length.labels(*labels).observe(1 + new_accepted / new_drafts)
        if new_draft_tokens > 0:
            self.draft_tokens.labels(*labels).inc(new_draft_tokens)
        if new_accepted > 0:
            self.accepted.labels(*labels).inc(new_accepted)
        for pos, count in enumerate(m.accepted_per_position):
            seen = track.accepted_per_pos[pos] if pos < len(track.accepted_per_pos) else 0
            if count > seen:
                self.accepted_per_pos.labels(*labels, str(pos)).inc(count - seen)
        track.num_drafts, track.num_draft_tokens, track.num_accepted = (
            num_drafts,
            m.num_draft_tokens,
            m.num_accepted_tokens,
        )
        track.accepted_per_pos = list(m.accepted_per_position)
