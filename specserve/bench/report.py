"""Render results: rich terminal tables (offline, serve) and strict JSON files."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.table import Table

from specserve.bench.serve_load import ServeResult
from specserve.bench.stats import Interval
from specserve.bench.summary import ArmSummary


def fmt_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def fmt_rate(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.2f}"


def fmt_interval(iv: Interval | None, suffix: str = "x") -> str:
    if iv is None or math.isnan(iv.estimate):
        return "-"
    if math.isnan(iv.low):
        return f"{iv.estimate:.2f}{suffix} [n/a: 1 prompt]"
    return f"{iv.estimate:.2f}{suffix} [{iv.low:.2f}, {iv.high:.2f}]"


def _greedy(s: ArmSummary) -> str:
    if s.greedy_equal is None:
        return "n/a"
    mark = "yes" if s.greedy_equal == s.num_requests else "NO"
    return f"{mark} {s.greedy_equal}/{s.num_requests}"


def arm_table(summaries: dict[str, ArmSummary], title: str) -> Table:
    """One row per arm: acceptance, speed, latency percentiles, speedup and greedy equality."""
    table = Table(title=title)
    for col in (
        "arm",
        "reqs",
        "tau",
        "accept",
        "accept by position",
        "tok/s",
        "TTFT p50/p95 ms",
        "TPOT p50/p95 ms",
        "speedup [95% CI]",
        "greedy = none",
    ):
        table.add_column(col, justify="left" if col in ("arm", "accept by position") else "right")
    for arm, s in summaries.items():
        table.add_row(
            arm,
            str(s.num_requests),
            f"{s.tau:.2f}",
            fmt_rate(s.acceptance_rate),
            " ".join(fmt_rate(a) for a in s.acceptance_by_position) or "-",
            f"{s.tokens_per_s:.1f}",
            f"{fmt_ms(s.ttft_p50_s)}/{fmt_ms(s.ttft_p95_s)}",
            f"{fmt_ms(s.tpot_p50_s)}/{fmt_ms(s.tpot_p95_s)}",
            fmt_interval(s.speedup),
            _greedy(s),
        )
    return table


def category_table(summaries: dict[str, ArmSummary]) -> Table | None:
    """One row per (category, arm); None when the dataset has a single category."""
    rows = [(c, arm, cs) for arm, s in summaries.items() for c, cs in s.by_category.items()]
    if not rows:
        return None
    table = Table(title="by category")
    for col in ("category", "arm", "reqs", "tau", "accept", "tok/s", "speedup [95% CI]"):
        table.add_column(col, justify="left" if col in ("category", "arm") else "right")
    for c, arm, s in sorted(rows, key=lambda row: row[0]):
        table.add_row(
            c,
            arm,
            str(s.num_requests),
            f"{s.tau:.2f}",
            fmt_rate(s.acceptance_rate),
            f"{s.tokens_per_s:.1f}",
            fmt_interval(s.speedup),
        )
    return table


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Strict JSON: NaN (e.g. an undefined ratio) becomes null so that any JSON reader accepts the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(payload), indent=1) + "\n", encoding="utf-8")


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def serve_tables(result: ServeResult) -> list[Table]:
    """Latency percentiles and throughput; errors by message; server-side acceptance per arm."""
    s = result.summary
    latency = Table(title=f"bench serve: {s.num_ok}/{s.num_requests} ok in {s.duration_s:.1f}s")
    for col in ("metric", "p50", "p90", "p99"):
        latency.add_column(col, justify="left" if col == "metric" else "right")
    for name, values in (
        ("TTFT ms", s.ttft_ms),
        ("ITL ms", s.itl_ms),
        ("TPOT ms", s.tpot_ms),
        ("E2E ms", s.e2e_ms),
    ):
        latency.add_row(name, *(_num(values[f"p{q}"]) for q in (50, 90, 99)))
    totals = Table(title="throughput")
    for col in ("requests/s", "output tok/s", "goodput req/s", "SLO attainment", "errors"):
        totals.add_column(col, justify="right")
    totals.add_row(
        f"{s.request_throughput:.2f}",
        f"{s.output_tok_s:.1f}",
        _num(s.goodput, ".2f"),
        "-" if s.slo_attainment is None else f"{s.slo_attainment:.0%}",
        str(s.num_errors),
    )
    tables = [latency, totals]
    if s.errors:
        errors = Table(title="errors")
        errors.add_column("count", justify="right")
        errors.add_column("error")
        for message, count in sorted(s.errors.items(), key=lambda kv: -kv[1]):
            errors.add_row(str(count), message)
        tables.append(errors)
    if result.server_acceptance:
        acc = Table(title="server-side speculation (from /metrics)")
        for col in ("arm", "drafts", "draft tokens", "accepted", "accept", "tau"):
            acc.add_column(col, justify="left" if col == "arm" else "right")
        for arm, a in result.server_acceptance.items():
            acc.add_row(
                arm,
                f"{a.num_drafts:.0f}",
                f"{a.num_draft_tokens:.0f}",
                f"{a.num_accepted_tokens:.0f}",
                fmt_rate(a.acceptance_rate),
                fmt_rate(a.mean_accepted_length),
            )
        tables.append(acc)
    return tables


def _num(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)
