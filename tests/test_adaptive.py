"""Adaptive speculation: the per-sequence plan under known estimates and costs, and lossless greedy output."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from specserve import LLM, SamplingParams
from specserve.adaptive import PROBE_EVERY, AdaptiveSpeculation, IdleGaps, LinearCost, MeasuredCost
from specserve.verify import VerifyResult


class Req:
    """What the policy reads of a request: its arm (and it must be weak-referenceable)."""

    def __init__(self, arm: str = "a"):
        self.spec_arm = arm


def policy(prior: float, fixed_s: float, per_token_s: float, k: int = 4) -> AdaptiveSpeculation:
    return AdaptiveSpeculation({"a": k}, LinearCost(fixed_s, per_token_s), prior=prior)


def result(drafted: int, accepted: int) -> VerifyResult:
    nodes = list(range(accepted + 1))
    return VerifyResult(nodes, [0] * len(nodes), nodes, drafted, drafted)


def test_high_acceptance_and_cheap_verify_drafts_everything():
    reqs = [Req() for _ in range(4)]
    plan = policy(prior=0.8, fixed_s=0.01, per_token_s=1e-5).plan({r: 4 for r in reqs})
    assert list(plan.values()) == [4, 4, 4, 4]


def test_low_acceptance_drafts_nothing():
    (r,) = reqs = [Req()]
    assert policy(prior=0.05, fixed_s=0.001, per_token_s=0.001).plan({r: 4 for r in reqs}) == {r: 0}


def test_compute_bound_big_batch_drafts_nothing():
    # 128 sequences at a = 0.5 where every token costs as much as the fixed part of a step: a draft adds
    # 0.5 tokens for 1/129 more time, while the batch averages 128 tokens per 129 units
    reqs = [Req() for _ in range(128)]
    plan = policy(prior=0.5, fixed_s=0.001, per_token_s=0.001).plan({r: 4 for r in reqs})
    assert set(plan.values()) == {0}


def test_memory_bound_batch_one_keeps_the_full_gain_at_modest_acceptance():
    (r,) = [Req()]
    assert policy(prior=0.4, fixed_s=0.007, per_token_s=2e-5).plan({r: 4}) == {r: 4}


def test_each_sequence_gets_what_its_own_acceptance_pays_for():
    pol = policy(prior=0.5, fixed_s=0.004, per_token_s=0.0005)
    good, bad = Req(), Req()
    for _ in range(20):  # good: every draft accepted; bad: the first is always rejected
        pol.plan({good: 4, bad: 4})
        pol.observe(good, result(4, 4))
        pol.observe(bad, result(4, 0))
    plan = pol.plan({good: 4, bad: 4})
    assert plan[good] == 4 and plan[bad] == 0
    # bad is observed even when planned at 0 here; idle plans pull it back toward the arm's average (~0.5)
    assert pol.estimates[good].accept[0] > 0.99 and pol.estimates[bad].accept[0] < 0.2
    assert 0.5 < pol.estimates[bad].accept[1] < pol.arm_accept["a"][1]  # never reached: relaxed toward the arm


def test_caps_and_other_arms_are_respected():
    pol = policy(prior=0.9, fixed_s=0.01, per_token_s=1e-5)
    short, other = Req(), Req("b")
    plan = pol.plan({short: 2, other: 3})
    assert plan == {short: 2, other: 3}


def test_a_sequence_planned_at_zero_probes_one_draft():
    pol = policy(prior=0.05, fixed_s=0.001, per_token_s=0.001)
    r = Req()
    plans = [pol.plan({r: 4})[r] for _ in range(2 * PROBE_EVERY)]
    assert plans.count(1) == 2 and plans[PROBE_EVERY - 1] == 1 and set(plans) == {0, 1}


def test_measured_cost_charges_the_bucket_that_holds_the_step():
    cost = MeasuredCost({(1, 1): 1.0, (1, 4): 1.5, (4, 4): 2.0, (4, 8): 3.0, (4, 16): 5.0})
    assert cost.seconds(1, np.array([1, 2, 4])).tolist() == [1.0, 1.5, 1.5]
    assert cost.seconds(3, np.array([3, 5, 8, 20])).tolist() == [2.0, 3.0, 3.0, 6.0]  # 20: 5 + 4 x 0.25
    assert cost.seconds(9, np.array([8])).tolist() == [3.0]  # past the largest batch: its costs


@pytest.mark.parametrize("k", [2, 6])
def test_adaptive_greedy_equals_plain_greedy(tiny_model_dir, k):
    arms = {"adaptive": {"method": "ngram", "num_speculative_tokens": k, "adaptive": True}}
    llm = LLM(model=tiny_model_dir(), device="cpu", dtype="float32", speculative_arms=arms, max_num_seqs=8)
    prompts = [[5 + i, 17, 33, 9 + i, 21] * (1 + i % 3) for i in range(8)]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    plain = llm.generate(prompts, params, spec_arm="none")
    adaptive = llm.generate(prompts, params, spec_arm="adaptive")
    assert [o.outputs[0].token_ids for o in adaptive] == [o.outputs[0].token_ids for o in plain]
    assert sum(o.metrics.num_accepted_tokens for o in adaptive) > 0


def test_a_drafter_that_costs_more_host_time_than_it_saves_is_not_asked():
    pol = AdaptiveSpeculation({"a": 4}, LinearCost(0.01, 1e-5), prior=0.6, measure=True)
    r = Req()
    assert pol.plan({r: 4}) == {r: 4}  # 2.3 tokens for 10 ms beats 1 token
    for _ in range(50):
        pol.observe_propose("a", 0.02, 1)  # 20 ms of host time per drafting sequence
    assert pol.plan({r: 4}) == {r: 0}


def test_with_async_scheduling_plain_steps_pay_no_host_overhead():
    # batch 1 at a = 0.3, a 2 ms step plus 1 ms of host time: one draft gives 1.3 tokens per 3 ms; plain 1 per
    # 3 ms synchronous (drafting wins) but 1 per 2 ms when the draft-free step overlaps the next (plain wins)
    (r,) = [Req()]

    def plan(overlap_arms):
        pol = AdaptiveSpeculation({"a": 1}, LinearCost(0.002, 0.0), prior=0.3, overhead_s=0.001,
                                  overlap_arms=overlap_arms)
        return pol.plan({r: 1})[r]

    assert plan(frozenset()) == 1
    assert plan(frozenset({"none", "a"})) == 0
    assert plan(frozenset({"none"})) == 1  # an arm that cannot overlap pays the overhead either way


def test_probes_do_not_break_overlapped_steps_one_request_at_a_time():
    # 128 requests planned at zero, staggered: each would probe on its own plan, breaking almost every step
    pol = AdaptiveSpeculation({"a": 4}, LinearCost(0.001, 0.001), prior=0.05, overlap_arms=frozenset({"a"}))
    reqs = [Req() for _ in range(128)]
    for i, r in enumerate(reqs):
        pol._estimate(r).idle_steps = i % PROBE_EVERY
    probing = [sum(pol.plan({r: 4 for r in reqs}).values()) for _ in range(3 * PROBE_EVERY)]
    assert sum(1 for n in probing if n) <= 3  # plans that probe at all: about one per PROBE_EVERY
    assert sum(probing) >= 2 * len(reqs)  # yet every request still probes about once per PROBE_EVERY plans


def test_the_overhead_is_the_idle_gap_after_synchronous_steps():
    pol = AdaptiveSpeculation({"a": 1}, LinearCost(0.002, 0.0), prior=0.3, measure=True, overlap_arms=frozenset({"a"}))
    (r,) = [Req()]
    assert pol.plan({r: 1}) == {r: 1}  # no overhead yet: 1.3 tokens for 2 ms beats 1
    for _ in range(60):
        pol.observe_overhead(0.001)
        pol.observe_overhead(2.0)  # the engine sat idle between requests: not a step's gap
    assert pol.overhead_s == pytest.approx(0.001, rel=0.01)
    assert pol.plan({r: 1}) == {r: 0}  # 1.3 tokens for 3 ms loses to an overlapped plain step's 1 for 2 ms


def test_a_drafter_that_finds_nothing_stops_being_asked():
    # an n-gram with no match proposes nothing: for planning, that is a miss at the first position
    pol = policy(prior=0.8, fixed_s=0.01, per_token_s=0.001)
    r = Req()
    misses = 0
    while pol.plan({r: 4})[r] and misses < 50:
        pol.observe(r, result(0, 0))  # planned, nothing proposed
        misses += 1
    assert 3 <= misses < 20  # a few misses price a 10%-a-token draft out
    assert pol._estimate(r).accept[0] == pytest.approx(0.8 * 0.75**misses)
    pol.observe(r, result(0, 0))  # not planned this time (an overlapped plain step): it teaches nothing
    assert pol._estimate(r).accept[0] == pytest.approx(0.8 * 0.75**misses)


def test_verify_work_per_drafting_sequence_is_priced():
    # idle gaps of 1 ms after plain synchronous steps and 1 + 8 x 3 ms after steps where 8 sequences drafted:
    # 3 ms of host time per drafting sequence, more than a draft at a = 0.6 saves in a 10 ms step
    pol = AdaptiveSpeculation({"a": 4}, LinearCost(0.01, 1e-5), prior=0.6, measure=True)
    reqs = [Req() for _ in range(8)]
    assert set(pol.plan({r: 4 for r in reqs}).values()) == {4}
    for _ in range(60):
        pol.observe_overhead(0.001, 0)
        pol.observe_overhead(0.025, 8)
    assert pol.overhead_s == pytest.approx(0.001, rel=0.01)
    assert pol.verify_s == pytest.approx(0.003, rel=0.01)
    assert set(pol.plan({r: 4 for r in reqs}).values()) == {0}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA events")
def test_idle_gaps_time_the_device_between_a_synced_forward_and_the_next():
    pol = AdaptiveSpeculation({"a": 1}, LinearCost(), measure=True)
    gaps = IdleGaps(pol)
    gaps.after_forward()
    torch.cuda.synchronize()
    gaps.synced(0)
    time.sleep(0.005)  # host work: the device has nothing queued
    gaps.before_forward(0.002)  # of which 2 ms drafting, priced on its own
    gaps.after_forward()
    torch.cuda.synchronize()
    gaps.synced(0)
    assert pol.overhead_s == pytest.approx(0.003, abs=0.001)


def test_a_run_of_rejections_does_not_end_drafting_for_good():
    # batch 1, memory-bound: drafting pays at the arm's usual acceptance. Six rejections in a row price the
    # request out; while it does not draft, its estimate relaxes back to the arm's and it drafts again soon
    pol = policy(prior=0.6, fixed_s=0.007, per_token_s=1e-3)
    r = Req()
    assert pol.plan({r: 4})[r] >= 3
    streak = []
    for _ in range(8):
        pol.observe(r, result(4, 0))
        streak.append(pol.plan({r: 4})[r])
    assert streak[-3:] == [0, 0, 0]  # priced out; then, unobserved, it relaxes and drafts again
    assert 0 < next(i for i in range(1, 11) if pol.plan({r: 4})[r]) < 10  # well before a probe (PROBE_EVERY)


def test_host_cost_per_drafting_sequence_is_not_guessed_from_one_batch_size():
    # batch 1 drafting every step: a 2 ms gap each time is overhead, not 2 ms per drafting sequence, so a
    # batch of 128 is not priced at 256 ms of host time per step
    pol = AdaptiveSpeculation({"a": 4}, LinearCost(0.01, 1e-5), prior=0.8, measure=True)
    for _ in range(100):
        pol.observe_overhead(0.002, 1)
    assert pol.verify_s == 0.0 and pol.overhead_s == pytest.approx(0.002)
    assert set(pol.plan({Req(): 4 for _ in range(128)}).values()) == {4}


def test_the_pull_back_covers_overlapped_steps_between_plans():
    # with async scheduling nobody may draft for REPLAN_EVERY steps (caps 0); the relaxation counts them
    pol = policy(prior=0.6, fixed_s=0.007, per_token_s=1e-3)
    r = Req()
    for _ in range(8):
        pol.observe(r, result(4, 0))
        pol.plan({r: 4})
    assert pol.plan({r: 4})[r] == 0
    for _ in range(16):
        assert pol.plan({r: 0}) == {r: 0}
    assert pol.plan({r: 4})[r] > 0


def test_adaptive_learned_drafters_equal_plain_greedy(tiny_model_dir, tmp_path):
    """Adaptive plans size the draft model's chains, EAGLE's trees and Medusa's static trees per sequence."""
    from test_drafters_checkpoints import write_eagle, write_medusa

    target = tiny_model_dir()
    arms = {
        "draft_model": {"method": "draft_model", "model": target, "num_speculative_tokens": 4, "adaptive": True},
        "eagle": {"method": "eagle", "model": write_eagle(str(tmp_path / "e"), target), "num_speculative_tokens": 8,
                  "top_k": 3, "depth": 4, "adaptive": True},
        "medusa": {"method": "medusa", "model": write_medusa(str(tmp_path / "m"), target),
                   "num_speculative_tokens": 6, "adaptive": True},
    }
    llm = LLM(model=target, device="cpu", dtype="float32", speculative_arms=arms, max_num_seqs=8)
    assert list(llm.engine.runner.slot_features) == [("hidden_states",)]  # EAGLE-1 and Medusa share one table
    prompts = [[5 + i, 17, 33, 9 + i, 21] * (1 + i % 3) for i in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    plain = [o.outputs[0].token_ids for o in llm.generate(prompts, params, spec_arm="none")]
    for arm in arms:
        outs = llm.generate(prompts, params, spec_arm=arm)
        assert [o.outputs[0].token_ids for o in outs] == plain, arm
        assert sum(o.metrics.num_draft_tokens for o in outs) > 0, arm
    # the draft model is the target itself: every draft is accepted, so its plans keep drafting
    assert all(o.metrics.acceptance_rate == 1.0 for o in llm.generate(prompts, params, spec_arm="draft_model"))
