"""Greedy speculation is lossless on the real model: token ids equal plain greedy decoding's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from specserve import LLM, SamplingParams

MT_BENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "mt_bench.jsonl"
GREEDY_128 = SamplingParams(temperature=0.0, max_tokens=128)


@pytest.fixture(scope="module")
def llm(smollm2) -> LLM:
    arms = {f"ngram{k}": {"method": "ngram", "num_speculative_tokens": k} for k in (1, 3, 8)}
    arms["ngram-tree"] = {"method": "ngram", "num_speculative_tokens": 8, "prompt_lookup_matches": 4}
    return LLM(loaded_model=smollm2, device="cpu", dtype="float32", speculative_arms=arms)


@pytest.fixture(scope="module")
def prompts(llm) -> list[list[int]]:
    """16 MT-bench first turns through the chat template: prompt lengths differ by up to ~10x."""
    if not MT_BENCH.exists():
        pytest.skip(f"{MT_BENCH} is missing")
    turns = [json.loads(line)["turns"][0] for line in MT_BENCH.read_text().splitlines()[:16]]
    return [llm.encode_chat([{"role": "user", "content": t}]) for t in turns]


@pytest.fixture(scope="module")
def plain(llm, prompts) -> list[list[int]]:
    outs = llm.generate(prompts, GREEDY_128, spec_arm="none")
    assert all(o.metrics.num_draft_tokens == 0 for o in outs)
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("k", [1, 3, 8])
def test_ngram_greedy_equals_plain(llm, prompts, plain, k):
    outs = llm.generate(prompts[:8], GREEDY_128, spec_arm=f"ngram{k}")
    for out, ref in zip(outs, plain[:8], strict=True):
        assert out.outputs[0].token_ids == ref
    drafted = sum(o.metrics.num_draft_tokens for o in outs)
    accepted = sum(o.metrics.num_accepted_tokens for o in outs)
    assert drafted > 0 and accepted > 0, "the n-gram drafter never drafted or was never accepted"
    steps = sum(o.metrics.num_steps for o in outs)
    assert sum(len(o.outputs[0].token_ids) for o in outs) == steps + accepted  # one recovered/bonus per step


def test_ngram_tree_greedy_equals_plain(llm, prompts, plain):
    """Continuations of several earlier matches, merged into a tree: still plain greedy's tokens."""
    outs = llm.generate(prompts[:8], GREEDY_128, spec_arm="ngram-tree")
    assert [o.outputs[0].token_ids for o in outs] == plain[:8]
    m = [o.metrics for o in outs]
    # a chain drafts one node per depth it reaches; a branching tree drafts more
    assert sum(x.num_draft_tokens for x in m) > sum(sum(x.drafts_per_position) for x in m), "no tree was drafted"
    assert sum(x.num_accepted_tokens for x in m) > 0


def test_sixteen_mixed_requests_together(llm, prompts, plain):
    outs = llm.generate(prompts, GREEDY_128, spec_arm="ngram3")
    assert [o.outputs[0].token_ids for o in outs] == plain


def test_preemption_under_a_small_pool_is_lossless(smollm2, prompts, plain):
    # 40 blocks of 16 tokens cannot hold 8 sequences of ~60-200 prompt + 128 output tokens at once.
    small = LLM(
        loaded_model=smollm2,
        device="cpu",
        dtype="float32",
        num_kv_blocks=40,
        speculative_config={"method": "ngram", "num_speculative_tokens": 4},
    )
    outs = small.generate(prompts[:8], GREEDY_128)
    assert small.engine.scheduler.num_preemptions > 0
    assert sum(o.metrics.num_preemptions for o in outs) == small.engine.scheduler.num_preemptions
    assert [o.outputs[0].token_ids for o in outs] == plain[:8]
    stats = small.engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks
