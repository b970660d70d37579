"""`bench ab`: verdicts on synthetic results, pairing, arm selection and bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from specserve.bench.ab import compare, headline, load_result, pick_arm


def result(arm, *, tau, seconds_per_token, prompts=range(20), seed=0):
    rng = np.random.default_rng(seed)
    requests = []
    for p in prompts:
        tokens = int(rng.integers(20, 200))
        noise = rng.normal(1.0, 0.05)
        requests.append(
            {
                "arm": arm,
                "prompt_id": str(p),
                "turn": 0,
                "num_output_tokens": tokens,
                "num_steps": max(1, round(tokens / (tau * noise))),
                "latency_s": tokens * seconds_per_token * noise,
                "ttft_s": 0.05 * noise,
            }
        )
    return {"kind": "offline", "requests": requests}


def verdicts(res):
    return {c.metric: c.verdict for c in res.comparisons}


def test_b_better_on_tau_and_latency_paired():
    a = result("ngram", tau=1.5, seconds_per_token=0.020)
    b = result("eagle", tau=2.5, seconds_per_token=0.012, seed=1)
    res = compare(a, "ngram", b, "eagle")
    assert res.paired and res.num_prompts == (20, 20)
    v = verdicts(res)
    assert v["tau"] == "better" and v["latency per token (s)"] == "better"
    tau = res.comparisons[0]
    assert tau.change.low > 0.5 and tau.b == pytest.approx(2.5, rel=0.1)
    assert "better on tau, latency per token (s)" in headline(res)
    assert verdicts(compare(b, "eagle", a, "ngram"))["tau"] == "worse"


def test_same_distribution_is_no_significant_difference_and_unpaired_when_prompts_differ():
    a = result("x", tau=2.0, seconds_per_token=0.01, prompts=range(30), seed=3)
    b = result("x", tau=2.0, seconds_per_token=0.01, prompts=range(100, 130), seed=4)
    res = compare(a, "x", b, "x")
    assert not res.paired
    assert set(verdicts(res).values()) == {"no significant difference"}


def test_serve_results_without_steps_skip_tau():
    a, b = result("m", tau=2, seconds_per_token=0.02), result("m", tau=2, seconds_per_token=0.01, seed=1)
    for r in a["requests"] + b["requests"]:
        r.pop("num_steps")
    assert "tau" not in verdicts(compare(a, "m", b, "m"))


def test_pick_arm():
    data = {"requests": [{"arm": "none"}, {"arm": "ngram"}, {"arm": "eagle", "error": "boom"}]}
    assert pick_arm(data, None, "f") == "ngram"
    assert pick_arm(data, "none", "f") == "none"
    with pytest.raises(ValueError, match="has no arm 'eagle'"):
        pick_arm(data, "eagle", "f")
    data["requests"].append({"arm": "medusa"})
    with pytest.raises(ValueError, match="pick one with --arm-a/--arm-b"):
        pick_arm(data, None, "f")


def test_load_result_rejects_bad_files(tmp_path):
    with pytest.raises(ValueError, match="result file not found"):
        load_result(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_result(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="not a specserve bench result"):
        load_result(tmp_path / "other.json")
