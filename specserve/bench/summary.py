"""Aggregate offline request records into per-arm and per-category figures."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from specserve.bench.records import BatchRecord, RequestRecord
from specserve.bench.stats import Interval, percentile, speedup_ci


@dataclass
class ArmSummary:
    """Figures of one arm over a set of requests (all of them, or one category)."""

    num_requests: int
    num_output_tokens: int
    tau: float  # output tokens per target forward
    acceptance_rate: float | None  # accepted / drafted tokens; None without drafts
    acceptance_by_position: list[float | None]  # [k]: P(accept draft at depth i+1 | drafted there)
    tokens_per_s: float  # output tokens / summed request latency (what one request sees)
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    tpot_p50_s: float | None
    tpot_p95_s: float | None
    speedup: Interval | None  # tokens_per_s over the baseline's, paired bootstrap over prompts
    greedy_equal: int | None  # requests whose tokens equal the baseline's; None when sampling
    throughput_tok_s: float | None = None  # output tokens / wall time of its batches (whole arm only)
    by_category: dict[str, ArmSummary] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def summarize(
    records: list[RequestRecord], batches: list[BatchRecord], *, baseline: str, greedy: bool, seed: int = 0
) -> dict[str, ArmSummary]:
    """Per-arm summaries (first-seen order) with per-category breakdowns; speedups are over `baseline`."""
    by_arm: dict[str, list[RequestRecord]] = defaultdict(list)
    for r in records:
        by_arm[r.arm].append(r)
    base = by_arm.get(baseline, [])
    out = {}
    for arm, recs in by_arm.items():
        summary = _summarize(recs, base, greedy=greedy, seed=seed)
        wall = sum(b.wall_s for b in batches if b.arm == arm)
        summary.throughput_tok_s = summary.num_output_tokens / wall if wall else None
        categories = sorted({r.category for r in recs})
        if len(categories) > 1:
            summary.by_category = {
                c: _summarize(
                    [r for r in recs if r.category == c],
                    [r for r in base if r.category == c],
                    greedy=greedy,
                    seed=seed,
                )
                for c in categories
            }
        out[arm] = summary
    return out


def _summarize(recs: list[RequestRecord], base: list[RequestRecord], *, greedy: bool, seed: int) -> ArmSummary:
    tokens = sum(r.num_output_tokens for r in recs)
    steps = sum(r.num_steps for r in recs)
    drafted = sum(r.num_draft_tokens for r in recs)
    ttfts = [r.ttft_s for r in recs if r.ttft_s is not None]
    tpots = [r.tpot_s for r in recs if r.tpot_s is not None]
    latency = sum(r.latency_s for r in recs)
    return ArmSummary(
        num_requests=len(recs),
        num_output_tokens=tokens,
        tau=tokens / steps if steps else 0.0,
        acceptance_rate=sum(r.num_accepted_tokens for r in recs) / drafted if drafted else None,
        acceptance_by_position=acceptance_by_position(recs),
        tokens_per_s=tokens / latency if latency else 0.0,
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p95_s=percentile(ttfts, 95),
        tpot_p50_s=percentile(tpots, 50),
        tpot_p95_s=percentile(tpots, 95),
        speedup=_speedup(recs, base, seed) if base else None,
        greedy_equal=_greedy_equal(recs, base) if greedy and base else None,
    )


def acceptance_by_position(recs: list[RequestRecord]) -> list[float | None]:
    """Accepted over drafted at each draft depth, summed over requests (depths past a request's k count 0)."""
    k = max((len(r.drafts_per_position) for r in recs), default=0)
    accepted, drafted = np.zeros(k), np.zeros(k)
    for r in recs:
        accepted[: len(r.accepted_per_position)] += r.accepted_per_position
        drafted[: len(r.drafts_per_position)] += r.drafts_per_position
    return [float(a / d) if d else None for a, d in zip(accepted, drafted, strict=True)]


def _per_prompt(recs: list[RequestRecord]) -> dict[str, tuple[int, float]]:
    """Output tokens and latency per prompt, turns summed: the unit the bootstrap resamples."""
    sums: dict[str, tuple[int, float]] = {}
    for r in recs:
        tokens, latency = sums.get(r.prompt_id, (0, 0.0))
        sums[r.prompt_id] = (tokens + r.num_output_tokens, latency + r.latency_s)
    return sums


def _speedup(recs: list[RequestRecord], base: list[RequestRecord], seed: int) -> Interval | None:
    arm, ref = _per_prompt(recs), _per_prompt(base)
    shared = [p for p in arm if p in ref]
    if not shared:
        return None
    t_arm, s_arm = np.array([arm[p] for p in shared]).T
    t_ref, s_ref = np.array([ref[p] for p in shared]).T
    return speedup_ci(t_ref, s_ref, t_arm, s_arm, seed=seed)


def _greedy_equal(recs: list[RequestRecord], base: list[RequestRecord]) -> int:
    ref = {(r.prompt_id, r.turn): r.token_ids for r in base}
    return sum(ref.get((r.prompt_id, r.turn)) == r.token_ids for r in recs)
