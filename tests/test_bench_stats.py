"""Percentiles, bootstrap intervals, offline summaries, tables, JSON and plots on synthetic records."""

from __future__ import annotations

import json

import numpy as np
import pytest
from rich.console import Console

from specserve.bench.plots import plot_acceptance_by_position, plot_speedup_by_category
from specserve.bench.records import BatchRecord, RequestRecord
from specserve.bench.report import arm_table, category_table, write_json
from specserve.bench.stats import bootstrap, percentile, ratio_of_sums, speedup_ci
from specserve.bench.summary import summarize

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def record(
    arm,
    prompt_id,
    *,
    category="c",
    turn=0,
    tokens=10,
    steps=10,
    latency=1.0,
    accepted=(),
    drafted=(),
    token_ids=None,
):
    return RequestRecord(
        arm=arm,
        prompt_id=prompt_id,
        category=category,
        turn=turn,
        batch=int(prompt_id),
        num_prompt_tokens=5,
        num_output_tokens=tokens,
        num_steps=steps,
        num_draft_tokens=sum(drafted),
        num_accepted_tokens=sum(accepted),
        accepted_per_position=list(accepted),
        drafts_per_position=list(drafted),
        ttft_s=0.1,
        tpot_s=latency / tokens,
        latency_s=latency,
        finish_reason="length",
        token_ids=list(range(tokens)) if token_ids is None else token_ids,
        text="",
    )


def test_percentile_interpolates_and_handles_empty():
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 95) == 5.0
    assert percentile([], 50) is None


def test_bootstrap_mean_interval_covers_truth_and_is_reproducible():
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 1.0, size=200)
    mean = lambda idx: x[idx].mean(-1)
    iv = bootstrap(mean, [len(x)], seed=7)
    assert iv.estimate == pytest.approx(x.mean())
    assert iv.low < 3.0 < iv.high and iv.high - iv.low < 0.5
    assert bootstrap(mean, [len(x)], seed=7) == iv
    assert not iv.excludes(3.0) and iv.excludes(10.0)


def test_speedup_interval_pairs_prompts():
    # Prompt lengths vary a lot, but the arm is always exactly twice as fast: pairing gives a tight interval.
    time_base = np.array([1.0, 5.0, 0.5, 9.0, 2.0])
    tokens = np.array([10.0, 50.0, 5.0, 90.0, 20.0])
    iv = speedup_ci(tokens, time_base, tokens, time_base / 2)
    assert iv.estimate == pytest.approx(2.0) and iv.low == pytest.approx(2.0) and iv.high == pytest.approx(2.0)


def test_ratio_of_sums_with_zero_denominator_is_not_an_error():
    stat = ratio_of_sums(np.array([1.0, 2.0]), np.array([0.0, 0.0]))
    assert not np.isfinite(stat(np.array([[0, 1]]))[0])
    iv = bootstrap(stat, [2])
    assert np.isnan(iv.low)


def _synthetic():
    records, batches = [], []
    for i, cat in enumerate(["math", "math", "writing", "writing"]):
        pid = str(i)
        records.append(record("none", pid, category=cat, latency=2.0))
        records.append(
            record(
                "ngram",
                pid,
                category=cat,
                steps=4,
                latency=1.0,
                accepted=(3, 2, 1),
                drafted=(4, 4, 4),
                token_ids=None if i else [9] * 10,
            )
        )
        batches += [BatchRecord("none", i, 2.0, 10), BatchRecord("ngram", i, 1.0, 10)]
    return records, batches


def test_summarize_acceptance_speedup_and_greedy_equality():
    records, batches = _synthetic()
    s = summarize(records, batches, baseline="none", greedy=True)
    assert list(s) == ["none", "ngram"]
    ngram = s["ngram"]
    assert ngram.tau == pytest.approx(2.5)
    assert ngram.acceptance_rate == pytest.approx(24 / 48)
    assert ngram.acceptance_by_position == pytest.approx([0.75, 0.5, 0.25])
    assert ngram.speedup.estimate == pytest.approx(2.0)
    assert ngram.greedy_equal == 3  # prompt 0's tokens differ
    assert s["none"].greedy_equal == 4 and s["none"].acceptance_rate is None
    assert ngram.throughput_tok_s == pytest.approx(10.0)
    assert set(ngram.by_category) == {"math", "writing"}
    assert ngram.by_category["math"].num_requests == 2
    assert summarize(records, batches, baseline="none", greedy=False)["ngram"].greedy_equal is None


def test_tables_json_and_plots(tmp_path):
    records, batches = _synthetic()
    s = summarize(records, batches, baseline="none", greedy=True)
    console = Console(record=True, width=200)
    console.print(arm_table(s, "offline"))
    console.print(category_table(s))
    text = console.export_text()
    assert "2.00x" in text and "NO 3/4" in text and "yes 4/4" in text and "writing" in text
    write_json(tmp_path / "r.json", {"summary": {a: v.to_json() for a, v in s.items()}, "x": float("nan")})
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["x"] is None and data["summary"]["ngram"]["speedup"]["estimate"] == pytest.approx(2.0)
    for plot in (plot_acceptance_by_position, plot_speedup_by_category):
        path = plot(s, tmp_path / f"{plot.__name__}.png")
        assert path.read_bytes()[:8] == PNG_MAGIC


def test_single_prompt_has_no_interval():
    iv = speedup_ci(np.array([10.0]), np.array([2.0]), np.array([10.0]), np.array([1.0]))
    assert iv.estimate == pytest.approx(2.0) and np.isnan(iv.low) and np.isnan(iv.high)
