"""Async scheduling: the next plain step is queued before this one's tokens reach the host.

It must change nothing a user sees: the same tokens, stops, logprobs and metrics as the synchronous engine,
with aborts, preemptions and mixed drafting arms, and every KV block back in the pool at the end.
"""

from __future__ import annotations

import pytest
import torch
from helpers import host_syncs

from specserve import LLM, SamplingParams
from specserve.adaptive import LinearCost
from specserve.drafters.replay import table_from_outputs
from specserve.engine import PENDING, REPLAN_EVERY, REPLAN_MAX
from specserve.models.loader import load_model

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
PROMPTS = ["a b c a b c a b", "The quick brown fox", "Speculative decoding drafts tokens", "x y z " * 4, "Hello"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir("llama"), torch.float32, "cpu")


def engine_pair(tiny, **kwargs):
    common = dict(loaded_model=tiny, device="cpu", dtype="float32", max_num_seqs=8, **kwargs)
    return LLM(async_scheduling=False, **common).engine, LLM(async_scheduling=True, **common).engine


def run(engine, requests, abort_at: dict[int, list[str]] | None = None) -> tuple[dict, list[bool]]:
    """Drive the engine step by step; returns {request id: final output} and which steps overlapped."""
    for rid, prompt, params, arm in requests:
        engine.add_request(rid, prompt, params, spec_arm=arm)
    done, step, overlapped = {}, 0, []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        step += 1
        overlapped.append(engine._inflight is not None)
        for rid in (abort_at or {}).get(step, []):
            engine.abort_request(rid)
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks
    assert all(PENDING not in o.outputs[0].token_ids for o in done.values())
    return done, overlapped


def summary(outs: dict) -> dict:
    return {
        rid: [(o.token_ids, o.finish_reason, o.stop_reason, o.text, o.logprobs) for o in out.outputs]
        for rid, out in outs.items()
    }


def test_plain_outputs_equal_the_synchronous_engine(tiny):
    sync, overlap = engine_pair(tiny)
    first = sync.tokenizer.encode(PROMPTS[1])
    probe = LLM(loaded_model=tiny, device="cpu", dtype="float32", async_scheduling=False).generate(
        [first], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    )[0].outputs[0].token_ids
    stop_tok = probe[6]  # greedy reaches it mid-generation: the step after it was already queued
    reqs = [
        ("greedy", PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=17, ignore_eos=True), None),
        ("stop-token", first, SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=[stop_tok]), None),
        ("sampled", PROMPTS[2], SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=3, max_tokens=20,
                                               presence_penalty=0.5, repetition_penalty=1.2, min_tokens=4), None),
        ("n2", PROMPTS[3], SamplingParams(n=2, temperature=1.0, seed=11, max_tokens=9, logprobs=2), None),
        ("one", PROMPTS[4], SamplingParams(temperature=0.0, max_tokens=1), None),
        ("to-max-model-len", PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True), None),
        ("min-p", PROMPTS[1], SamplingParams(temperature=0.7, min_p=0.1, seed=5, max_tokens=13,
                                             logit_bias={7: 3.0}), None),
    ]
    a, _ = run(sync, reqs)
    b, overlapped = run(overlap, reqs)
    assert summary(a) == summary(b)
    assert b["stop-token"].outputs[0].finish_reason == "stop"
    assert b["stop-token"].outputs[0].stop_reason == stop_tok
    assert sum(overlapped) > 10  # the overlap path really ran
    assert len(b["to-max-model-len"].prompt_token_ids) + len(b["to-max-model-len"].outputs[0].token_ids) == 256
    for rid in a:
        ma, mb = a[rid].metrics, b[rid].metrics
        assert (ma.num_steps, ma.num_generated_tokens) == (mb.num_steps, mb.num_generated_tokens)


def test_aborts_preemptions_and_drafting_arms_in_flight(tiny):
    # 16 blocks of 8 slots cannot hold all six requests: the newest are preempted and recomputed
    sync, overlap = engine_pair(tiny, num_kv_blocks=16, block_size=8, speculative_arms={"ngram": NGRAM})
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    reqs = [(f"r{i}", p, greedy, "ngram" if i == 3 else None) for i, p in enumerate(PROMPTS)]
    reqs.append(("seeded", PROMPTS[2], SamplingParams(temperature=1.0, seed=1, max_tokens=24, ignore_eos=True), None))
    aborts = {2: ["r1"], 5: ["seeded", "missing"]}
    a, _ = run(sync, reqs, aborts)
    b, overlapped = run(overlap, reqs, aborts)
    assert overlap.scheduler.num_preemptions > 0
    assert any(overlapped)
    assert summary(a) == summary(b)
    assert "r1" not in b and "seeded" not in b and "r3" in b


def test_adaptive_requests_overlap_while_they_draft_nothing(tiny):
    sync, overlap = engine_pair(tiny, speculative_arms={"adaptive": {**NGRAM, "adaptive": True}})
    greedy = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    reqs = [(f"r{i}", p, greedy, "adaptive") for i, p in enumerate(PROMPTS)]
    a, _ = run(sync, reqs)
    b, overlapped = run(overlap, reqs)
    assert summary(a) == summary(b)
    assert sum(o.metrics.num_draft_tokens for o in b.values()) > 0
    runs = "".join("x" if o else "." for o in overlapped).split(".")
    assert 0 < max(map(len, runs)) <= REPLAN_MAX  # then a planned step, where drafting may resume


def test_adaptive_draft_model_requests_overlap_while_they_draft_nothing(tiny, tiny_model_dir):
    """The draft model's observe reads committed tokens only: its quiet adaptive steps overlap, it catches up its
    KV when it drafts again, and the tokens are the synchronous engine's."""
    arm = {"method": "draft_model", "model": tiny_model_dir("llama"), "num_speculative_tokens": 3, "adaptive": True}
    sync, overlap = engine_pair(tiny, speculative_arms={"dm": arm})
    greedy = SamplingParams(temperature=0.0, max_tokens=80, ignore_eos=True)
    reqs = [(f"r{i}", p, greedy, "dm") for i, p in enumerate(PROMPTS)]
    a, _ = run(sync, reqs)
    accept = overlap.spec_policy.arm_accept["dm"]
    accept[:] = 0.0  # no draft pays: plans go quiet and steps overlap, the draft KV falls behind
    for rid, prompt, params, spec_arm in reqs:
        overlap.add_request(rid, prompt, params, spec_arm=spec_arm)
    b, overlapped = {}, []
    while overlap.has_unfinished_requests():
        if len(overlapped) == 30:
            accept[:] = 1.0  # now drafting pays (the draft model is the target): plans resume drafting
        b |= {o.request_id: o for o in overlap.step() if o.finished}
        overlapped.append(overlap._inflight is not None)
    assert summary(a) == summary(b)
    assert sum(overlapped[:30]) > 10
    drafted = [o.metrics for o in b.values() if o.metrics.num_draft_tokens]
    assert drafted and all(m.acceptance_rate == 1.0 for m in drafted)  # its KV caught up: every draft right
    stats = overlap.stats()
    assert stats.num_free_blocks == stats.num_total_blocks


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
@pytest.mark.parametrize("method", ["eagle", "eagle3", "medusa"])
def test_learned_drafters_that_read_target_outputs_ride_overlapped_steps(tiny, tiny_model_dir, tmp_path, method,
                                                                         device):
    """EAGLE and Medusa read the target's hidden states from per-slot tables its forwards fill (inside the graphs on
    CUDA), so their quiet adaptive steps overlap. A request that drafted nothing for a while drafts exactly what it
    would have drafted had it drafted all along."""
    from test_drafters_checkpoints import write_eagle, write_eagle3, write_medusa

    target = tiny_model_dir("llama")
    path = {"eagle": write_eagle, "eagle3": write_eagle3, "medusa": write_medusa}[method](str(tmp_path / method),
                                                                                          target)
    arm = {"method": method, "model": path, "num_speculative_tokens": 6, "adaptive": True,
           **({"top_k": 3, "depth": 3} if method != "medusa" else {})}
    loaded = tiny if device == "cpu" else load_model(target, torch.float32, device)
    common = dict(loaded_model=loaded, device=device, dtype="float32", max_num_seqs=8, speculative_arms={"a": arm})
    sync, overlap = (LLM(async_scheduling=mode, **common).engine for mode in (False, True))
    greedy = SamplingParams(temperature=0.0, max_tokens=90, ignore_eos=True)
    reqs = [(f"r{i}", p, greedy, "a") for i, p in enumerate(PROMPTS)]

    def record(engine, drafting) -> dict:
        """{(request id, root position): draft tokens}; the plan drafts in full when drafting(step) says so."""
        drafted, drafter, steps = {}, engine.drafters["a"], [0]

        def propose(requests, budgets):
            props = type(drafter).propose(drafter, requests, budgets)
            drafted.update({(r.request_id, r.num_computed_tokens): p.tokens
                            for r, p in zip(requests, props, strict=True) if p is not None})
            return props

        def plan(caps):
            steps[0] += 1
            return {r: c if drafting(steps[0]) else 0 for r, c in caps.items()}

        drafter.propose, engine.spec_policy.plan = propose, plan
        return drafted

    always = record(sync, lambda step: True)
    now_and_then = record(overlap, lambda step: step % 40 >= 34)  # quiet for 34 plans, then 6 that draft
    a, _ = run(sync, reqs)
    b, overlapped = run(overlap, reqs)
    assert summary(a) == summary(b)
    assert sum(overlapped) > 50
    common = now_and_then.keys() & always.keys()
    assert len(common) > 20, len(common)
    same = [now_and_then[k] == always[k] for k in common]
    assert all(same), (sum(same), len(same))


def test_plans_that_keep_drafting_nothing_come_ever_less_often(tiny):
    _, overlap = engine_pair(tiny, speculative_arms={"adaptive": {**NGRAM, "adaptive": True}})
    overlap.spec_policy.arm_accept["adaptive"][:] = 0.0  # no draft pays: every plan is quiet (probes aside)
    greedy = SamplingParams(temperature=0.0, max_tokens=230, ignore_eos=True)
    _, overlapped = run(overlap, [("r", PROMPTS[1], greedy, "adaptive")])
    runs = [len(r) for r in "".join("x" if o else "." for o in overlapped).split(".") if r]
    assert runs[:4] == [REPLAN_EVERY, 2 * REPLAN_EVERY, REPLAN_MAX, REPLAN_MAX]


def test_a_stale_step_in_flight_does_not_leak_into_the_next_batch(tiny):
    sync, overlap = engine_pair(tiny)
    # a third of the vocabulary stops a request: they end on stop tokens, with the next step already queued
    params = SamplingParams(temperature=0.0, max_tokens=50, stop_token_ids=list(range(0, 320, 3)))

    def batches(engine) -> list:
        outs = []
        for batch in range(3):
            done, _ = run(engine, [(f"{batch}-{i}", p, params, None) for i, p in enumerate(PROMPTS)])
            outs.append(sorted((rid, o.outputs[0].token_ids, o.outputs[0].finish_reason) for rid, o in done.items()))
            assert (engine._inflight is not None) == engine.async_scheduling  # left over, all its requests done
        return outs

    assert batches(sync) == batches(overlap)


def test_no_step_is_queued_behind_requests_that_end_by_length(tiny):
    """When the token in flight ends every live request by length, nothing is queued after it: a forward per token,
    nothing left in flight for the next request to wait on."""
    _, overlap = engine_pair(tiny)
    forwards = []
    forward = overlap.runner.forward
    overlap.runner.forward = lambda batch: forwards.append(batch) or forward(batch)
    params = SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True)
    done, overlapped = run(overlap, [("a", PROMPTS[0], params, None), ("b", PROMPTS[2], params, None)])
    assert [len(o.outputs[0].token_ids) for o in done.values()] == [7, 7]
    assert len(forwards) == 7 and overlapped == [True] * 6 + [False] and overlap._inflight is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_one_sync_per_step_and_the_same_tokens(tiny_model_dir):
    common = dict(model=tiny_model_dir("llama"), device="cuda", dtype="float32", max_num_seqs=8)
    sync, overlap = LLM(async_scheduling=False, **common), LLM(**common)
    assert overlap.engine.async_scheduling  # the default on CUDA
    params = [SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0.8, top_p=0.9, seed=1, max_tokens=20, ignore_eos=True)]
    reqs = [(f"{i}-{j}", prompt, p, None) for i, prompt in enumerate(PROMPTS) for j, p in enumerate(params)]
    assert summary(run(sync.engine, reqs)[0]) == summary(run(overlap.engine, reqs)[0])
    engine = overlap.engine
    for rid, prompt, p, _ in reqs:
        engine.add_request("again-" + rid, prompt, p)
    engine.step()  # the prefills
    for _ in range(5):
        assert host_syncs(engine.step) <= 1
        assert engine._inflight is not None
    while engine.has_unfinished_requests():
        engine.step()


def test_an_adaptive_request_plans_its_first_drafts_right_after_prefill(tiny):
    # the prefill step drafts nothing, so it may not start an overlapped run: at a cost where every draft pays,
    # adaptive replay takes exactly the steps of fixed replay
    replay = {"method": "replay", "num_speculative_tokens": 4, "acceptance": 0.6}
    llm = LLM(loaded_model=tiny, device="cpu", dtype="float32", async_scheduling=True,
              speculative_arms={"fixed": replay, "adaptive": {**replay, "adaptive": True}})
    llm.engine.spec_policy.cost = LinearCost(0.02, 1e-6)  # memory-bound: verifying 4 more tokens costs ~nothing
    greedy = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    plain = llm.generate(PROMPTS[:3], greedy, spec_arm="none")
    for drafter in llm.engine.drafters.values():
        drafter.set_table(table_from_outputs(plain))
    steps = {}
    for arm in ("fixed", "adaptive"):
        outs = [llm.generate([p], greedy, spec_arm=arm)[0] for p in PROMPTS[:3]]
        assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in plain]
        steps[arm] = sum(o.metrics.num_steps for o in outs)
    assert steps["adaptive"] == steps["fixed"] < 3 * 48
