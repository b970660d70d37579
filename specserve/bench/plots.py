"""PNG plots of an offline run: acceptance by draft position per arm, speedup by category."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only: benchmarks run on headless machines
import matplotlib.pyplot as plt  # noqa: E402

from specserve.bench.arm_specs import BASELINE  # noqa: E402
from specserve.bench.summary import ArmSummary  # noqa: E402


def plot_acceptance_by_position(summaries: dict[str, ArmSummary], path: Path) -> Path:
    """One line per drafting arm: P(accept) at draft depth 1..k."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, s in summaries.items():
        points = [(i + 1, a) for i, a in enumerate(s.acceptance_by_position) if a is not None]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=arm)
    ax.set(xlabel="draft position", ylabel="acceptance rate", ylim=(0, 1.05), title="acceptance by position")
    ax.xaxis.get_major_locator().set_params(integer=True)
    if ax.lines:
        ax.legend()
    return _save(fig, path)


def plot_speedup_by_category(summaries: dict[str, ArmSummary], path: Path) -> Path:
    """Grouped bars of speedup vs the baseline with 95% intervals, per category (or overall)."""
    arms = {a: s for a, s in summaries.items() if s.speedup is not None and a != BASELINE}
    categories = sorted({c for s in arms.values() for c in s.by_category}) or ["all"]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(categories) * max(1, len(arms))), 4))
    width = 0.8 / max(1, len(arms))
    for i, (arm, s) in enumerate(arms.items()):
        ivs = [s.by_category[c].speedup if s.by_category else s.speedup for c in categories]
        est = [iv.estimate if iv else 0.0 for iv in ivs]
        # No error bar where there is no interval (a category with a single prompt).
        err = [
            [max(0.0, iv.estimate - iv.low) if iv and np.isfinite(iv.low) else 0.0 for iv in ivs],
            [max(0.0, iv.high - iv.estimate) if iv and np.isfinite(iv.high) else 0.0 for iv in ivs],
        ]
        xs = [j + (i - (len(arms) - 1) / 2) * width for j in range(len(categories))]
        ax.bar(xs, est, width, yerr=err, capsize=3, label=arm)
    ax.axhline(1.0, color="gray", linewidth=1, linestyle="--")
    ax.set_xticks(range(len(categories)), categories, rotation=30, ha="right")
    ax.set(ylabel="speedup vs none (95% CI)", title="speedup by category")
    if arms:
        ax.legend()
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
