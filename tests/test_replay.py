"""Replay drafter (benchmarks only): recorded continuations at a known per-position acceptance."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from specserve import LLM, SamplingParams
from specserve.config import SpeculativeConfig
from specserve.drafters.replay import ReplayDrafter, prompt_key, table_from_outputs
from specserve.request import Request

VOCAB = 1000
TARGET = SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(vocab_size=VOCAB)))
PROMPT = [3, 1, 4, 1, 5]
RECORDED = list(range(100, 400))


def drafter(acceptance: float, k: int = 4, path: str | None = None) -> ReplayDrafter:
    spec = SpeculativeConfig(method="replay", num_speculative_tokens=k, acceptance=acceptance, model=path)
    d = ReplayDrafter(spec, TARGET)
    if path is None:
        d.set_table({prompt_key(PROMPT): RECORDED})
    return d


def request(output: list[int]) -> Request:
    return Request(
        request_id="r#0", group_id="r", index=0, token_ids=PROMPT + output, num_prompt_tokens=len(PROMPT),
        params=SamplingParams(), max_tokens=300, eos_token_ids=frozenset(), detokenizer=None, generator=None,
        spec_arm="replay", metrics=None,
    )


def test_full_acceptance_proposes_the_recording():
    (prop,) = drafter(1.0).propose([request(RECORDED[:10])], [4])
    assert prop.tokens == RECORDED[10:14] and prop.is_chain


def test_zero_acceptance_corrupts_every_token():
    (prop,) = drafter(0.0).propose([request(RECORDED[:10])], [4])
    assert all(t != r for t, r in zip(prop.tokens, RECORDED[10:14], strict=True))


def test_kept_fraction_is_the_acceptance_and_the_same_in_every_run():
    d = drafter(0.6)
    (prop,) = d.propose([request([])], [len(RECORDED)])
    kept = np.mean([t == r for t, r in zip(prop.tokens, RECORDED, strict=True)])
    assert abs(kept - 0.6) < 0.1
    (again,) = drafter(0.6).propose([request([])], [len(RECORDED)])
    assert again.tokens == prop.tokens


def test_no_drafts_off_the_recording_or_past_its_end():
    d = drafter(1.0)
    off, end, unknown = request([100, 999]), request(RECORDED), request([])
    unknown.token_ids = [9] + unknown.token_ids[1:]
    assert d.propose([off, end, unknown], [4, 4, 4]) == [None, None, None]
    (short,) = d.propose([request(RECORDED[:-2])], [4])
    assert short.tokens == RECORDED[-2:]


def test_table_from_a_file(tmp_path):
    path = tmp_path / "replay.json"
    path.write_text(json.dumps({prompt_key(PROMPT): RECORDED}))
    (prop,) = drafter(1.0, path=str(path)).propose([request([])], [3])
    assert prop.tokens == RECORDED[:3]


def test_acceptance_must_be_a_probability():
    with pytest.raises(ValueError, match="acceptance"):
        SpeculativeConfig(method="replay", acceptance=1.5)


def test_engine_replay_of_plain_greedy_is_fully_accepted(tiny_model_dir):
    arms = {"replay": {"method": "replay", "num_speculative_tokens": 3, "acceptance": 1.0}}
    llm = LLM(model=tiny_model_dir(), device="cpu", dtype="float32", speculative_arms=arms)
    prompts = [[5 + i, 17, 33, 9 + i] for i in range(4)]
    params = SamplingParams(temperature=0.0, max_tokens=33, ignore_eos=True)
    plain = llm.generate(prompts, params, spec_arm="none")
    llm.engine.drafters["replay"].set_table(table_from_outputs(plain))
    outs = llm.generate(prompts, params, spec_arm="replay")
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in plain]
    for o in outs:  # 33 tokens: the prefill's one, then 8 steps of 3 accepted drafts + a bonus token
        m = o.metrics
        assert m.num_draft_tokens == m.num_accepted_tokens == 24 and m.num_steps == 9
