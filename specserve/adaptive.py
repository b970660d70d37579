"""Adaptive speculation: how many draft tokens each sequence gets this step (0..its cap).

A sequence drafting k tokens yields E(k) = 1 + a_0 + a_0 a_1 + ... + a_0 ... a_{k-1} tokens in expectation,
where a_d estimates P(draft d accepted | drafts 0..d-1 accepted): an EMA per request and position, started
from its arm's running average. A step of B sequences and T query tokens takes overhead + cost(B, T)
seconds, plus host time for every sequence that drafts (its drafter's propose, and the extra verify and
commit work its drafts cost). cost is measured at start-up on CUDA (timed forwards of every graph bucket) and
a fixed linear model elsewhere, so CPU tests are deterministic. On CUDA the host costs are measured as the
engine runs: per-sequence propose time per arm (an EMA), and the device's idle time between a synchronous
step's forward and the next forward (CUDA events, `IdleGaps`), split into the overhead of any synchronous step
and a part per drafting sequence.
A request that was asked to draft and got no proposal (an n-gram with no match) counts as rejected at its
first position: the estimates are of what planning a draft yields, so requests whose drafter keeps finding
nothing stop costing synchronous steps.

The plan maximises expected tokens per second, sum_i E_i(k_i) / (overhead + cost(B, T) + propose). The
next draft token of sequence i adds g = a_0 ... a_{k_i} expected tokens, and g only shrinks as k_i grows,
so taking tokens in decreasing order of gain and keeping the best prefix is optimal for every total T (up
to the propose term, paid with a sequence's first token). Plain decoding (no drafts) is always a
candidate, so by the model a step never loses to it; with async scheduling a step where no sequence drafts
overlaps the next one, so that candidate pays no overhead.
Example: batch 1 is memory-bound (cost flat in T): with a = 0.8 the gains 0.8, 0.64, 0.51, 0.41 all pay
and k = 4. In a compute-bound batch (cost ~ T) a token pays only if its gain beats tokens/T of the plan.
A request that does not draft is not observed, so its estimates relax toward its arm's average with each step
(RELAX; async scheduling plans only every REPLAN_EVERY steps or more while nobody drafts, and the pull covers
the steps in between), and one planned at 0 for PROBE_EVERY plans drafts one token: a run of rejections does
not end its drafting for good.
"""

from __future__ import annotations

import bisect
import weakref
from collections.abc import Mapping

import numpy as np
import torch

from specserve.config import SpeculativeConfig
from specserve.cuda_graphs import Buckets
from specserve.request import Request
from specserve.verify import VerifyResult

PROBE_EVERY = 64  # a probe costs a propose and a verify node: rare enough to stay under ~2%
GAP_EMA = 0.05  # weight of each new idle gap in the host-cost fit
RELAX = 0.05  # per step without drafts, a request's estimates move this far back toward its arm's average


class LinearCost:
    """cost(B, T) = fixed_s + per_token_s * T: the model used off CUDA (deterministic)."""

    def __init__(self, fixed_s: float = 0.02, per_token_s: float = 0.0005):
        self.fixed_s, self.per_token_s = fixed_s, per_token_s

    def seconds(self, num_seqs: int, num_tokens: np.ndarray) -> np.ndarray:
        return self.fixed_s + self.per_token_s * num_tokens


class MeasuredCost:
    """Forward seconds measured per (B, T) shape; a step costs what the smallest shape holding it costs.

    That is the CUDA-graph bucket it replays. Past the largest T of its B, the last two points extrapolate.
    """

    def __init__(self, times: Mapping[tuple[int, int], float]):
        self.seqs = sorted({b for b, _ in times})
        self.tokens = {b: np.array(sorted(t for bb, t in times if bb == b)) for b in self.seqs}
        self.secs = {b: np.array([times[(b, t)] for t in self.tokens[b]]) for b in self.seqs}

    def seconds(self, num_seqs: int, num_tokens: np.ndarray) -> np.ndarray:
        b = self.seqs[min(bisect.bisect_left(self.seqs, num_seqs), len(self.seqs) - 1)]
        t, s = self.tokens[b], self.secs[b]
        j = np.searchsorted(t, num_tokens)  # first measured T >= num_tokens
        slope = (s[-1] - s[-2]) / (t[-1] - t[-2]) if len(t) > 1 else s[-1] / t[-1]
        beyond = s[-1] + (num_tokens - t[-1]) * max(slope, 0.0)
        return np.where(j < len(t), s[np.minimum(j, len(t) - 1)], beyond)


class _Estimate:
    """Per-request acceptance estimates and how long it has not drafted."""

    def __init__(self, accept: np.ndarray):
        self.accept = accept  # [k] EMA of P(position d accepted | positions before it accepted)
        self.idle_steps = 0
        self.planned = 0  # draft tokens the last plan gave it, until its step's result is observed
        self.planned_at = 0  # the policy's step count at its last plan


class AdaptiveSpeculation:
    """Plans per-sequence draft counts for the arms in `arms` (name -> their max draft tokens)."""

    def __init__(
        self, arms: Mapping[str, int], cost, *, prior: float = 0.5, ema: float = 0.25, arm_ema: float = 0.05,
        overhead_s: float = 0.0, measure: bool = False, overlap_arms: frozenset[str] = frozenset(),
    ):
        self.cost = cost
        self.ema, self.arm_ema = ema, arm_ema
        self.arm_accept = {arm: np.full(k, prior) for arm, k in arms.items()}  # running average per arm
        self.propose_s = dict.fromkeys(arms, 0.0)  # host seconds per drafting sequence, per arm
        self.verify_s = 0.0  # device idle seconds per drafting sequence beyond overhead_s (verify, commit)
        self._gaps = np.zeros(5)  # EMA of [1, n, gap, n^2, n gap] over idle gaps after n sequences drafted
        self.estimates: weakref.WeakKeyDictionary[Request, _Estimate] = weakref.WeakKeyDictionary()
        self.overhead_s = overhead_s
        self.measure = measure  # host costs measured as the engine runs (CUDA); fixed otherwise (tests)
        self.overlap_arms = overlap_arms  # arms whose draft-free steps overlap the next (async scheduling)
        self._quiet_plans = 0  # plans in a row that drafted nothing where the step could overlap
        self._steps = 0  # plan calls, one per scheduled step
        self.quiet_streak = 0  # plans in a row that gave drafts to none of the requests that could draft

    def _estimate(self, req: Request) -> _Estimate:
        est = self.estimates.get(req)
        if est is None:
            est = self.estimates[req] = _Estimate(self.arm_accept[req.spec_arm].copy())
        return est

    def plan(self, caps: dict[Request, int]) -> dict[Request, int]:
        """Draft tokens per decoding request; requests of other arms keep their cap."""
        self._steps += 1  # the scheduler asks every step, also when nobody may draft (overlapped steps)
        num_seqs = len(caps)
        adaptive = [r for r, c in caps.items() if c > 0 and r.spec_arm in self.arm_accept]
        if not adaptive:
            return caps
        fixed = num_seqs + sum(c for r, c in caps.items() if r.spec_arm not in self.arm_accept)
        ests = [self._estimate(r) for r in adaptive]
        for r, e in zip(adaptive, ests, strict=True):
            if e.idle_steps:  # unobserved while it does not draft: regress to the mean, or one bad run of
                pull = 1.0 - (1.0 - RELAX) ** (self._steps - e.planned_at)  # rejections ends its drafting
                e.accept += pull * (self.arm_accept[r.spec_arm] - e.accept)
            e.planned_at = self._steps
        width = max(len(e.accept) for e in ests)
        accept = np.stack([e.accept if len(e.accept) == width else np.pad(e.accept, (0, width - len(e.accept)))
                           for e in ests])  # [n, width]
        cap = np.fromiter((caps[r] for r in adaptive), np.int64, len(adaptive))  # [n]
        drafted = np.arange(width) < cap[:, None]  # [n, width] positions each sequence may draft
        flat = np.cumprod(accept, axis=1)[drafted]  # [M] gain of each draft token, sequence by sequence
        owner, position = np.nonzero(drafted)  # [M] each
        host_s = np.array([self.propose_s[r.spec_arm] + self.verify_s for r in adaptive])  # [n] per drafting seq
        first = np.where(position == 0, host_s[owner], 0.0)  # a sequence's drafting cost rides its first token
        order = np.argsort(-flat, kind="stable")  # stable: a sequence's tokens stay in position order
        expected = num_seqs + np.concatenate([[0.0], np.cumsum(flat[order])])  # [M + 1] tokens out of m drafts
        propose = np.concatenate([[0.0], np.cumsum(first[order])])  # [M + 1] host seconds of drafting
        device = self.cost.seconds(num_seqs, fixed + np.arange(len(expected))) + propose  # forward + drafting
        secs = self.overhead_s + device
        can_overlap = fixed == num_seqs and all(r.spec_arm in self.overlap_arms for r in caps)
        if can_overlap:
            secs[0] = device[0]  # drafting nothing, the step overlaps the next one: its host time is hidden
        best = int(np.argmax(expected / secs))  # first maximum: the fewest drafts among equals
        counts = np.bincount(owner[order[:best]], minlength=len(adaptive))
        # A probe in a plan that drafts nothing costs the step its overlap: such plans hold their probes back
        # and release them together every PROBE_EVERY plans (one probe per request per 128 sequences would
        # otherwise break nearly every step).
        quiet = can_overlap and best == 0
        self._quiet_plans = self._quiet_plans + 1 if quiet else 0
        probe = not quiet or self._quiet_plans >= PROBE_EVERY
        if quiet and probe:
            self._quiet_plans = 0
        out = dict(caps)
        for r, e, k in zip(adaptive, ests, counts.tolist(), strict=True):
            e.idle_steps = 0 if k else e.idle_steps + 1
            if probe and e.idle_steps >= PROBE_EVERY:
                k, e.idle_steps = 1, 0
            out[r] = e.planned = k
        self.quiet_streak = 0 if any(out[r] for r in adaptive) else self.quiet_streak + 1
        return out

    def observe_overhead(self, seconds: float, num_drafting: int = 0) -> None:
        """Seconds the device sat idle between a synchronous step's forward and the next forward, drafting
        aside (it has its own term), after a step where num_drafting sequences drafted."""
        if not self.measure or seconds >= 1.0:  # longer: the engine sat idle between steps
            return
        # gap = overhead_s + verify_s n, fitted by least squares over an EMA of the gaps; while n barely varies
        # (batch 1 drafting every step, say) all of it is overhead, which no batch size multiplies
        n, gap = float(num_drafting), max(seconds, 0.0)
        self._gaps += GAP_EMA * (np.array([1.0, n, gap, n * n, n * gap]) - self._gaps)
        _, mn, mg, mnn, mng = self._gaps / self._gaps[0]
        var = mnn - mn * mn
        self.verify_s = max((mng - mn * mg) / var, 0.0) if var > 0.25 else 0.0
        self.overhead_s = max(mg - self.verify_s * mn, 0.0)

    def observe_propose(self, arm: str, seconds: float, num_seqs: int) -> None:
        """Host time of one propose call of an arm over num_seqs sequences."""
        if self.measure and arm in self.propose_s:
            self.propose_s[arm] += 0.1 * (seconds / num_seqs - self.propose_s[arm])

    def observe(self, req: Request, res: VerifyResult) -> None:
        """Update the request's and its arm's estimates with the positions this step's drafts reached."""
        est = self.estimates.get(req)
        if est is None:
            return
        planned, est.planned = est.planned, 0
        accepted = len(res.accepted_nodes) - 1
        if res.draft_depth:
            n = min(accepted + 1, res.draft_depth, len(est.accept))  # accepted positions, then the rejected one
        elif planned:
            n = 1  # asked to draft, its drafter found nothing: what planning it yielded is a first-position miss
        else:
            return
        hit = (np.arange(n) < accepted).astype(float)
        est.accept[:n] += self.ema * (hit - est.accept[:n])
        arm = self.arm_accept[req.spec_arm]
        arm[:n] += self.arm_ema * (hit - arm[:n])


class IdleGaps:
    """Device idle time from a synchronous step's forward to the next forward, from CUDA events; a gap is read
    once the next step has synced too, so reading it never waits."""

    def __init__(self, policy: AdaptiveSpeculation):
        self.policy = policy
        self._last_end: torch.cuda.Event | None = None  # after the newest forward
        self._open: tuple[torch.cuda.Event, int] | None = None  # a synced step's end, its drafting sequences
        self._queued: list[tuple[torch.cuda.Event, torch.cuda.Event, float, int]] = []

    def before_forward(self, drafting_s: float) -> None:
        if self._open is not None:
            (end, num_drafting), self._open = self._open, None
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self._queued.append((end, start, drafting_s, num_drafting))

    def after_forward(self) -> None:
        self._last_end = torch.cuda.Event(enable_timing=True)
        self._last_end.record()

    def synced(self, num_drafting: int) -> None:
        """The newest forward's tokens are on the host: the gap to the next forward counts."""
        self._open = (self._last_end, num_drafting) if self._last_end is not None else None
        waiting = []
        for end, start, drafting_s, n in self._queued:
            if start.query():
                self.policy.observe_overhead(end.elapsed_time(start) * 1e-3 - drafting_s, n)
            else:
                waiting.append((end, start, drafting_s, n))
        self._queued = waiting


def build_policy(
    arms: Mapping[str, SpeculativeConfig], runner, overlap_arms: frozenset[str] = frozenset()
) -> AdaptiveSpeculation | None:
    """The policy for the engine's adaptive arms (None if none is), its cost model measured on CUDA."""
    adaptive = {name: spec.num_speculative_tokens for name, spec in arms.items() if spec.adaptive}
    if not adaptive:
        return None
    if runner.device.type != "cuda":
        return AdaptiveSpeculation(adaptive, LinearCost(), overlap_arms=overlap_arms)
    buckets = runner.graphs.buckets if runner.graphs else Buckets(
        runner.max_num_seqs, [1] + [1 + k for k in adaptive.values()], runner.max_tokens, runner.max_model_len
    )
    return AdaptiveSpeculation(adaptive, MeasuredCost(runner.profile(buckets.decode_shapes)), measure=True,
                               overlap_arms=overlap_arms)
