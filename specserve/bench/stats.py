"""Percentiles and bootstrap confidence intervals (fixed seed, resampling prompts)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

N_RESAMPLES = 2000


@dataclass(frozen=True)
class Interval:
    """A point estimate with a bootstrap confidence interval."""

    estimate: float
    low: float
    high: float

    def excludes(self, value: float) -> bool:
        return self.low > value or self.high < value


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation); None for no values."""
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else None


def bootstrap(
    statistic: Callable[..., np.ndarray],
    sizes: Sequence[int],
    *,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    confidence: float = 0.95,
) -> Interval:
    """Percentile bootstrap of `statistic(*index_arrays)`.

    One index array of shape [B, sizes[i]] per sample: pass one size for paired data (the same prompts
    resampled for both arms), two for independent samples. `statistic` reduces over the last axis, so
    the point estimate is its value at the identity index [1, n]. With a single unit per sample
    resampling says nothing about spread, so the bounds are nan rather than a zero-width interval.
    """
    if any(n < 1 for n in sizes):
        raise ValueError("bootstrap needs at least one unit per sample")
    rng = np.random.default_rng(seed)
    estimate = float(statistic(*(np.arange(n)[None] for n in sizes))[0])
    if all(n < 2 for n in sizes):
        return Interval(estimate, np.nan, np.nan)
    boots = statistic(*(rng.integers(0, n, size=(n_resamples, n)) for n in sizes))
    tail = 100 * (1 - confidence) / 2
    # A resample whose denominator is 0 (no drafted tokens, say) gives inf or nan: drop it, not poison the CI.
    boots = boots[np.isfinite(boots)]
    low, high = np.percentile(boots, [tail, 100 - tail]) if boots.size else (np.nan, np.nan)
    return Interval(estimate, float(low), float(high))


def ratio_of_sums(num: np.ndarray, den: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Statistic sum(num)/sum(den) over resampled units, e.g. tokens per second or tokens per step."""
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)

    def stat(idx: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return num[idx].sum(-1) / den[idx].sum(-1)

    return stat


def speedup_ci(
    tokens_base: np.ndarray, time_base: np.ndarray, tokens: np.ndarray, time: np.ndarray, *, seed: int = 0
) -> Interval:
    """Throughput ratio arm/base with both arms resampled over the same prompts (paired)."""
    base, arm = ratio_of_sums(tokens_base, time_base), ratio_of_sums(tokens, time)
    return bootstrap(lambda idx: arm(idx) / base(idx), [len(tokens)], seed=seed)
