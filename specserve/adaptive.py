"""Adaptive speculation: how many draft tokens each sequence gets this step (0..its cap).

A sequence drafting k tokens yields E(k) = 1 + a_0 + a_0 a_1 + ... + a_0 ... a_{k-1} tokens in expectation,
where a_d estimates P(draft d accepted | drafts 0..d-1 accepted): an EMA per request and position, started
from its arm's running average. A step of B sequences and T query tokens takes overhead + cost(B, T)
seconds, plus the drafter's host time for every sequence that drafts (n-gram lookups, say). cost is
measured at start-up on CUDA (timed forwards of every graph bucket) and a fixed linear model elsewhere, so
CPU tests are deterministic. On CUDA the host costs are measured as the engine runs: per-sequence propose
time per arm (an EMA), and the overhead, an EMA of the host time the device sits idle after a synchronous
step (from its tokens reaching the host to the next forward queued).

The plan maximises expected tokens per second, sum_i E_i(k_i) / (overhead + cost(B, T) + propose). The
next draft token of sequence i adds g = a_0 ... a_{k_i} expected tokens, and g only shrinks as k_i grows,
so taking tokens in decreasing order of gain and keeping the best prefix is optimal for every total T (up
to the propose term, paid with a sequence's first token). Plain decoding (no drafts) is always a
candidate, so by the model a step never loses to it; with async scheduling a step where no sequence drafts
overlaps the next one, so that candidate pays no overhead.
Example: batch 1 is memory-bound (cost flat in T): with a = 0.8 the gains 0.8, 0.64, 0.51, 0.41 all pay
and k = 4. In a compute-bound batch (cost ~ T) a token pays only if its gain beats tokens/T of the plan.
A request planned at 0 for PROBE_EVERY steps drafts one token, so its estimate can recover.
"""

from __future__ import annotations

import bisect
import weakref
from collections.abc import Mapping

import numpy as np

from specserve.config import SpeculativeConfig
from specserve.cuda_graphs import Buckets
from specserve.request import Request
from specserve.verify import VerifyResult

PROBE_EVERY = 64  # a probe costs a propose and a verify node: rare enough to stay under ~2%


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
        self.estimates: weakref.WeakKeyDictionary[Request, _Estimate] = weakref.WeakKeyDictionary()
        self.overhead_s = overhead_s
        self.measure = measure  # host costs measured as the engine runs (CUDA); fixed otherwise (tests)
        self.overlap_arms = overlap_arms  # arms whose draft-free steps overlap the next (async scheduling)
        self._quiet_plans = 0  # plans in a row that drafted nothing where the step could overlap

    def _estimate(self, req: Request) -> _Estimate:
        est = self.estimates.get(req)
        if est is None:
            est = self.estimates[req] = _Estimate(self.arm_accept[req.spec_arm].copy())
        return est

    def plan(self, caps: dict[Request, int]) -> dict[Request, int]:
        """Draft tokens per decoding request; requests of other arms keep their cap."""
        num_seqs = len(caps)
        adaptive = [r for r, c in caps.items() if c > 0 and r.spec_arm in self.arm_accept]
        if not adaptive:
            return caps
        fixed = num_seqs + sum(c for r, c in caps.items() if r.spec_arm not in self.arm_accept)
        ests = [self._estimate(r) for r in adaptive]
        width = max(len(e.accept) for e in ests)
        accept = np.stack([e.accept if len(e.accept) == width else np.pad(e.accept, (0, width - len(e.accept)))
                           for e in ests])  # [n, width]
        cap = np.fromiter((caps[r] for r in adaptive), np.int64, len(adaptive))  # [n]
        drafted = np.arange(width) < cap[:, None]  # [n, width] positions each sequence may draft
        flat = np.cumprod(accept, axis=1)[drafted]  # [M] gain of each draft token, sequence by sequence
        owner, position = np.nonzero(drafted)  # [M] each
        propose_s = np.array([self.propose_s[r.spec_arm] for r in adaptive])  # [n]
        first = np.where(position == 0, propose_s[owner], 0.0)  # a sequence's drafting cost rides its first token
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
            out[r] = k
        return out

    def observe_overhead(self, seconds: float) -> None:
        """Host seconds the device sat idle after a synchronous step: from its tokens reaching the host to the
        next forward queued, drafting aside (it has its own term). Overlapped steps have no such gap."""
        if self.measure and seconds < 1.0:  # longer: the engine sat idle between steps
            self.overhead_s += 0.1 * (max(seconds, 0.0) - self.overhead_s)

    def observe_propose(self, arm: str, seconds: float, num_seqs: int) -> None:
        """Host time of one propose call of an arm over num_seqs sequences."""
        if self.measure and arm in self.propose_s:
            self.propose_s[arm] += 0.1 * (seconds / num_seqs - self.propose_s[arm])

    def observe(self, req: Request, res: VerifyResult) -> None:
        """Update the request's and its arm's estimates with the positions this step's drafts reached."""
        est = self.estimates.get(req)
        if est is None or not res.draft_depth:
            return
        accepted = len(res.accepted_nodes) - 1
        n = min(accepted + 1, res.draft_depth, len(est.accept))  # accepted positions, then the rejected one
        hit = (np.arange(n) < accepted).astype(float)
        est.accept[:n] += self.ema * (hit - est.accept[:n])
        arm = self.arm_accept[req.spec_arm]
        arm[:n] += self.arm_ema * (hit - arm[:n])


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
        runner.max_num_seqs, [1] + [1 + k for k in adaptive.values()], runner.max_tokens
    )
    return AdaptiveSpeculation(adaptive, MeasuredCost(runner.profile(buckets.keys)), measure=True,
                               overlap_arms=overlap_arms)
