"""Render offline results: rich terminal tables and the JSON file."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.table import Table

from specserve.bench.stats import Interval
from specserve.bench.summary import ArmSummary


def fmt_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def fmt_rate(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.2f}"


def fmt_interval(iv: Interval | None, suffix: str = "x") -> str:
    if iv is None or math.isnan(iv.estimate):
        return "-"
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
