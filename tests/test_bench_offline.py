"""`bench offline`: the runner on a scripted fake LLM, then one real run on SmolLM2 (marked slow)."""

from __future__ import annotations

import json
import time

import pytest

from specserve.bench import offline
from specserve.bench.arm_specs import parse_drafters
from specserve.bench.cli import main
from specserve.bench.datasets import BenchPrompt
from specserve.bench.offline import OfflineConfig, run_offline
from specserve.outputs import CompletionOutput, RequestMetrics, RequestOutput

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class FakeLLM:
    """Answers every prompt with the same 6 tokens; the "ngram" arm drafts 2 per step and has 1 accepted."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, list]] = []  # (kind, arm, prompts)

    def chat(self, messages, params, *, spec_arm):
        self.calls.append(("chat", spec_arm, messages))
        return [self._out(spec_arm, p) for p in params]

    def generate(self, prompts, params, *, spec_arm):
        self.calls.append(("generate", spec_arm, prompts))
        return [self._out(spec_arm, p) for p in params]

    @staticmethod
    def _out(arm, params):
        n = min(6, params.max_tokens)
        spec = arm != "none"
        steps = (n + 1) // 2 if spec else n
        now = time.time()
        metrics = RequestMetrics(
            arrival_time=now - 0.5,
            first_token_time=now - 0.4,
            last_token_time=now,
            finished_time=now,
            num_steps=steps,
            num_generated_tokens=n,
            num_draft_tokens=2 * steps if spec else 0,
            num_accepted_tokens=steps if spec else 0,
            accepted_per_position=[steps, 0] if spec else [],
            drafts_per_position=[steps, steps] if spec else [],
            spec_arm=arm,
        )
        completion = CompletionOutput(0, "answer", list(range(n)), finish_reason="length")
        return RequestOutput("r", None, [1, 2], [completion], True, metrics)


def test_runner_interleaves_arms_and_continues_turns_from_own_answers():
    llm = FakeLLM()
    prompts = [
        BenchPrompt("a", "x", ("q1", "q2")),
        BenchPrompt("b", "y", ("q3",)),
        BenchPrompt("c", "y", ("q4",)),
    ]
    config = OfflineConfig(arms=parse_drafters("ngram"), dataset="d", num_prompts=3, max_tokens=6, batch_size=2)
    result = run_offline(llm, config, prompts, progress=False)
    kinds = [(arm, len(msgs)) for _, arm, msgs in llm.calls]
    # warm-up per arm, then per batch of 2 prompts: arm none (turn 0 of a and b, turn 1 of a), arm ngram, ...
    assert kinds == [
        ("none", 1),
        ("ngram", 1),
        ("none", 2),
        ("none", 1),
        ("ngram", 2),
        ("ngram", 1),
        ("none", 1),
        ("ngram", 1),
    ]
    second_turn = llm.calls[3][2][0]
    assert [m["role"] for m in second_turn] == ["user", "assistant", "user"] and second_turn[1]["content"] == "answer"
    assert len(result.records) == 8 and {r.batch for r in result.records} == {0, 1}
    ngram = result.summaries["ngram"]
    assert ngram.tau == pytest.approx(2.0) and ngram.acceptance_by_position == [1.0, 0.0]
    assert ngram.greedy_equal == 4 and ngram.speedup.estimate == pytest.approx(1.0)
    assert ngram.ttft_p50_s == pytest.approx(0.1, abs=0.01)
    data = result.to_json()
    assert data["kind"] == "offline" and data["baseline"] == "none" and len(data["batches"]) == 4


def test_completion_prompts_use_generate():
    llm = FakeLLM()
    config = OfflineConfig(arms=parse_drafters("none"), dataset="humaneval", num_prompts=1, warmup=False)
    run_offline(llm, config, [BenchPrompt("HumanEval/0", "humaneval", ("def f():\n",), chat=False)], progress=False)
    assert llm.calls == [("generate", "none", ["def f():\n"])]


def test_cli_rejects_bad_input_before_loading_the_model(tmp_path, capsys):
    assert main(["offline", "--drafters", "bogus"]) == 2
    assert "drafter 'bogus'" in capsys.readouterr().out
    assert main(["offline", "--dataset", str(tmp_path / "missing.jsonl")]) == 2
    assert "dataset file not found" in capsys.readouterr().out
    assert main(["offline", "--drafters", "ngram", "--drafter-config", "x.toml"]) == 2


@pytest.mark.slow
def test_real_smollm2_none_vs_ngram(tmp_path, capsys, monkeypatch, smollm2):
    monkeypatch.setattr(offline, "load_llm", lambda config, real=offline.load_llm: real(config, smollm2))
    # HumanEval: single-turn code prompts keep the CPU run short (multi-turn is covered by the fake above).
    out = tmp_path / "run"
    args = "offline --drafters none,ngram --dataset humaneval --num-prompts 4 --max-tokens 32 --temperature 0"
    assert main([*args.split(), "--device", "cpu", "--dtype", "float32", "--out", str(out), "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "bench offline: humaneval, 4 prompts" in table and "yes 4/4" in table
    data = json.loads((out / "offline.json").read_text())
    assert data["config"]["num_prompts"] == 4 and data["baseline"] == "none"
    assert len(data["requests"]) == 2 * 4  # arms x prompts
    ngram = data["summary"]["ngram"]
    keys = "tau acceptance_rate acceptance_by_position tokens_per_s ttft_p50_s tpot_p95_s speedup throughput_tok_s"
    assert set(keys.split()) <= set(ngram)
    assert ngram["greedy_equal"] == ngram["num_requests"] == 4  # greedy speculative output is lossless
    assert ngram["tau"] >= 1.0 and len(ngram["acceptance_by_position"]) == 4
    assert set(ngram["speedup"]) == {"estimate", "low", "high"}
    assert all(r["num_output_tokens"] > 0 and r["ttft_s"] > 0 and r["token_ids"] for r in data["requests"])
    for png in ("acceptance_by_position.png", "speedup_by_category.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
