"""`bench ab A.json B.json`: is arm B better than arm A on tau and latency? Bootstrap over prompts."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from specserve.bench.arm_specs import BASELINE
from specserve.bench.stats import Interval, bootstrap

# Per-prompt sums (turns added up) that every metric below is a ratio of.
FIELDS = ("tokens", "steps", "latency", "ttft", "n_ttft")


@dataclass(frozen=True)
class Metric:
    """A ratio of per-prompt sums; `higher_is_better` sets the direction, `relative` compares B/A not B-A."""

    name: str
    num: str
    den: str
    higher_is_better: bool
    relative: bool


METRICS = (
    Metric("tau", "tokens", "steps", higher_is_better=True, relative=False),
    Metric("latency per token (s)", "latency", "tokens", higher_is_better=False, relative=True),
    Metric("TTFT (s)", "ttft", "n_ttft", higher_is_better=False, relative=True),
)


@dataclass(frozen=True)
class Comparison:
    """One metric of arm A and arm B, with the interval of B - A (absolute) or B / A (relative)."""

    metric: str
    a: float
    b: float
    change: Interval
    relative: bool
    verdict: str  # "better" | "worse" | "no significant difference" (for B)


@dataclass(frozen=True)
class ABResult:
    arm_a: str
    arm_b: str
    paired: bool  # the same prompts on both sides: resampled together
    num_prompts: tuple[int, int]
    comparisons: list[Comparison]


def load_result(path: str | Path) -> dict[str, Any]:
    """A JSON written by `bench offline` or `bench serve`; clear errors for anything else."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"result file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("requests"), list):
        raise ValueError(f"{path} is not a specserve bench result (no 'requests' list)")
    return data


def pick_arm(data: dict[str, Any], arm: str | None, path: str | Path) -> str:
    """The named arm, or the only arm, or the only one besides the no-drafter baseline."""
    arms = list(dict.fromkeys(r["arm"] for r in data["requests"] if not r.get("error")))
    if arm is not None:
        if arm not in arms:
            raise ValueError(f"{path} has no arm {arm!r}; it has {arms}")
        return arm
    baseline = data.get("baseline", BASELINE)
    candidates = arms if len(arms) == 1 else [a for a in arms if a != baseline]
    if len(candidates) != 1:
        raise ValueError(f"{path} has arms {arms}: pick one with --arm-a/--arm-b")
    return candidates[0]


def per_prompt(data: dict[str, Any], arm: str) -> dict[str, dict[str, float]]:
    """Sums of FIELDS per prompt id for the successful requests of one arm."""
    sums: dict[str, dict[str, float]] = defaultdict(lambda: dict.fromkeys(FIELDS, 0.0))
    for r in data["requests"]:
        if r["arm"] != arm or r.get("error"):
            continue
        s = sums[str(r["prompt_id"])]
        s["tokens"] += r["num_output_tokens"]
        s["steps"] += r.get("num_steps") or 0  # serve results have no per-request steps: tau is skipped
        s["latency"] += r["latency_s"]
        if r.get("ttft_s") is not None:
            s["ttft"] += r["ttft_s"]
            s["n_ttft"] += 1
    return dict(sums)


def compare(data_a: dict[str, Any], arm_a: str, data_b: dict[str, Any], arm_b: str, *, seed: int = 0) -> ABResult:
    """Every metric both sides measured; paired bootstrap when both ran exactly the same prompts."""
    units_a, units_b = per_prompt(data_a, arm_a), per_prompt(data_b, arm_b)
    if not units_a or not units_b:
        raise ValueError(f"no successful requests for arm {arm_a if not units_a else arm_b!r}")
    paired = set(units_a) == set(units_b)
    ids_a = sorted(units_a)
    ids_b = ids_a if paired else sorted(units_b)
    cols_a = {f: np.array([units_a[p][f] for p in ids_a]) for f in FIELDS}
    cols_b = {f: np.array([units_b[p][f] for p in ids_b]) for f in FIELDS}
    comparisons = []
    for m in METRICS:
        if not (cols_a[m.den].sum() and cols_b[m.den].sum()):
            continue
        stat = _change_statistic(m, cols_a, cols_b)
        sizes = [len(ids_a)] if paired else [len(ids_a), len(ids_b)]
        change = bootstrap((lambda i, s=stat: s(i, i)) if paired else stat, sizes, seed=seed)
        a = cols_a[m.num].sum() / cols_a[m.den].sum()
        b = cols_b[m.num].sum() / cols_b[m.den].sum()
        comparisons.append(Comparison(m.name, float(a), float(b), change, m.relative, _verdict(m, change)))
    return ABResult(arm_a, arm_b, paired, (len(ids_a), len(ids_b)), comparisons)


def _change_statistic(m: Metric, cols_a: dict, cols_b: dict) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    def stat(idx_a: np.ndarray, idx_b: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            a = cols_a[m.num][idx_a].sum(-1) / cols_a[m.den][idx_a].sum(-1)
            b = cols_b[m.num][idx_b].sum(-1) / cols_b[m.den][idx_b].sum(-1)
            return b / a if m.relative else b - a

    return stat


def _verdict(m: Metric, change: Interval) -> str:
    null = 1.0 if m.relative else 0.0
    if not change.excludes(null):
        return "no significant difference"
    return "better" if (change.low > null) == m.higher_is_better else "worse"


def ab_table(result: ABResult, label_a: str, label_b: str) -> Table:
    """One row per metric: A, B, the change with its 95% interval, and the verdict for B."""
    pairing = "paired by prompt" if result.paired else "unpaired"
    n_a, n_b = result.num_prompts
    table = Table(title=f"B ({label_b}) vs A ({label_a}): {pairing}, {n_a}/{n_b} prompts")
    for col in ("metric", "A", "B", "change [95% CI]", "B is"):
        table.add_column(col, justify="left" if col in ("metric", "B is") else "right")
    for c in result.comparisons:
        iv = c.change
        change = (
            f"x{iv.estimate:.3f} [{iv.low:.3f}, {iv.high:.3f}]"
            if c.relative
            else (f"{iv.estimate:+.3f} [{iv.low:+.3f}, {iv.high:+.3f}]")
        )
        table.add_row(c.metric, f"{c.a:.4g}", f"{c.b:.4g}", change, c.verdict)
    return table


def headline(result: ABResult) -> str:
    """The verdict in one sentence, e.g. "B is better on tau; no significant difference on TTFT (s)"."""
    parts = []
    for verdict in ("better", "worse", "no significant difference"):
        metrics = [c.metric for c in result.comparisons if c.verdict == verdict]
        if metrics:
            parts.append(f"{verdict} on {', '.join(metrics)}")
    return f"B ({result.arm_b}) vs A ({result.arm_a}): " + "; ".join(parts)
