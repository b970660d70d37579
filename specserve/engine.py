"""The engine: every step is schedule -> propose -> verify -> accept -> commit -> emit.

Plain decoding is the same step with no drafts, and a prefill chunk is a run of query tokens with a causal
mask. The step emits at most one RequestOutput per request group (the n samples of one request). With async
scheduling a step that drafts nothing launches the next one (schedule -> forward) before it commits its own
tokens, so the host's commit and scheduling overlap the device's next forward.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from specserve.adaptive import IdleGaps, build_policy
from specserve.config import EngineConfig, SpeculativeConfig
from specserve.detokenizer import IncrementalDetokenizer
from specserve.drafters import build_drafter, draft_memory
from specserve.drafters.base import DraftProposal
from specserve.kernels import get_backend, triton_backend
from specserve.kv_cache import KVCacheManager, kv_block_bytes
from specserve.model_runner import ForwardOutput, ModelRunner, SlotFeatures, StepBatch
from specserve.models.loader import LoadedModel, load_model
from specserve.outputs import CompletionOutput, RequestMetrics, RequestOutput
from specserve.request import Request, RequestStatus
from specserve.sampler import HostCopy, top_logprobs
from specserve.sampling_params import SamplingParams
from specserve.scheduler import ScheduledRequest, Scheduler
from specserve.verify import VerifyItem, VerifyResult, sample_roots, verify

NO_SPEC = "none"
PENDING = -1  # async scheduling: a sampled token still on the device, in token_ids until it arrives
REPLAN_EVERY = 16  # async scheduling: overlapped steps in a row before adaptive requests plan drafts again,
REPLAN_MAX = 64  # doubling up to this while plans keep drafting nothing (each plan costs a synchronous step)


@dataclass
class InflightStep:
    """A step whose forward is queued on the device. advanced: its requests already count its tokens."""

    scheduled: list[ScheduledRequest]
    proposals: list[DraftProposal | None]
    items: list[VerifyItem]  # the requests that produce tokens, with their logits rows
    out: ForwardOutput
    advanced: bool = False


@dataclass
class TargetContext:
    """What drafters may use of the target: its model, tokenizer, device and the shared block pool's shape."""

    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    block_size: int
    num_blocks: int
    backend: object
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    cuda_graphs: bool  # forwards that fit a graph bucket replay it (captured on CUDA with the Triton kernels)
    slot_features: dict[tuple, SlotFeatures]  # the runner's per-slot tables, by what they store

    @property
    def captures_graphs(self) -> bool:
        """Whether graph buckets are captured: CUDA and the Triton kernels (the torch reference syncs); off it,
        the buckets replay eagerly (tests of the padding)."""
        return self.cuda_graphs and self.device.type == "cuda" and self.backend is triton_backend


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_usage: float
    num_free_blocks: int
    num_total_blocks: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int


def _resolve_device_dtype(config: EngineConfig) -> tuple[torch.device, torch.dtype]:
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if config.device == "auto" else config.device)
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if config.dtype == "auto":
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    if config.dtype not in names:
        raise ValueError(f"dtype must be one of auto, {', '.join(names)}; got {config.dtype!r}")
    return device, names[config.dtype]


class LLMEngine:
    """`loaded` reuses weights already in memory (tests and benchmarks that build several engines)."""

    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None):
        self.config = config
        self.device, self.dtype = _resolve_device_dtype(config)
        if loaded is None:
            loaded = load_model(config.model, self.dtype, self.device, config.load_format, seed=config.seed)
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        mcfg = loaded.config
        self.max_model_len = min(config.max_model_len or mcfg.max_model_len, mcfg.max_model_len)
        self.eos_token_ids = frozenset(mcfg.eos_token_ids)
        arms: dict[str, SpeculativeConfig] = dict(config.speculative_arms)
        self.default_arm = NO_SPEC
        if config.speculative_config is not None:
            self.default_arm = config.speculative_config.arm_name
            arms[self.default_arm] = config.speculative_config
        num_blocks = config.num_kv_blocks or self._blocks_for_budget(mcfg, arms)
        capacity = num_blocks * config.block_size
        if self.max_model_len > capacity:  # a longer sequence could never be scheduled, even alone
            if config.max_model_len:
                raise ValueError(
                    f"max_model_len {config.max_model_len} is more than the KV cache holds ({capacity} tokens): "
                    "raise kv_cache_memory_gb or num_kv_blocks, or lower max_model_len"
                )
            self.max_model_len = capacity
        backend = get_backend(config.attention_backend, self.device)
        self.runner = ModelRunner(
            self.model, num_blocks, config.block_size, backend, self.device, self.dtype,
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=self.max_model_len,
        )
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        eager = config.enforce_eager if config.enforce_eager is not None else self.device.type != "cuda"
        target = TargetContext(
            self.model, self.tokenizer, self.device, self.dtype, config.block_size, num_blocks, backend,
            config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len, not eager,
            self.runner.slot_features,
        )
        self.drafters = {name: build_drafter(spec, target) for name, spec in arms.items()}
        self.spec_configs = arms
        if not eager:
            self.runner.capture_graphs([1] + [1 + d.max_num_tokens for d in self.drafters.values()],
                                       target.captures_graphs)
        auto_async = self.device.type == "cuda"
        self.async_scheduling = config.async_scheduling if config.async_scheduling is not None else auto_async
        # arms whose requests may ride overlapped steps: plain, and adaptive arms while they draft nothing
        self._overlap_arms = frozenset({NO_SPEC} | {name for name, spec in arms.items() if spec.adaptive}
                                       if self.async_scheduling else ())
        self._overlap_run = 0  # overlapped steps in a row
        self._inflight: InflightStep | None = None
        self.spec_policy = build_policy(arms, self.runner, self._overlap_arms)  # None unless an arm is adaptive
        measure = self.spec_policy is not None and self.spec_policy.measure
        self._gaps = IdleGaps(self.spec_policy) if measure else None
        self.scheduler = Scheduler(
            self.kv, config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len, self.spec_policy
        )
        self.generator = torch.Generator().manual_seed(config.seed)  # for unseeded requests
        self.groups: dict[str, list[Request]] = {}
        self.prompts: dict[str, str | None] = {}

    def _blocks_for_budget(self, mcfg, arms: dict[str, SpeculativeConfig]) -> int:
        """The most blocks whose target K/V, drafters' K/V layers and per-slot tables fit kv_cache_memory_gb, after
        the fixed extras (EAGLE's scratch blocks, each table's two spare rows)."""
        bs, elem = self.config.block_size, self.dtype.itemsize
        per_block = kv_block_bytes(mcfg.num_layers, mcfg.num_kv_heads, mcfg.head_dim, bs, elem)
        fixed, tables = 0, {}
        for spec in arms.values():
            memory = draft_memory(spec, mcfg, bs, elem, self.config.max_num_seqs)
            per_block, fixed = per_block + memory.per_block, fixed + memory.fixed
            tables.update(memory.slot_tables)
        for width in tables.values():  # once per key: arms reading the same rows share one table
            table_per_block, table_fixed = SlotFeatures.table_bytes(width, bs, elem)
            per_block, fixed = per_block + table_per_block, fixed + table_fixed
        budget = int(self.config.kv_cache_memory_gb * 2**30)
        if budget - fixed < per_block:
            raise ValueError(
                f"kv_cache_memory_gb {self.config.kv_cache_memory_gb} holds no KV block: one takes {per_block} bytes "
                f"(target and drafters' K/V, per-slot tables) after {fixed} fixed bytes (drafters' scratch blocks)"
            )
        return (budget - fixed) // per_block

    @property
    def spec_arms(self) -> list[str]:
        return [NO_SPEC, *self.drafters]

    # ---- requests ---------------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        *,
        spec_arm: str | None = None,
        arrival_time: float | None = None,
    ) -> None:
        """Queue a request (its n samples); raises ValueError for anything that cannot be served."""
        if request_id in self.groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        arm = spec_arm or self.default_arm
        if arm not in self.spec_arms:
            raise ValueError(f"unknown speculative arm {arm!r}; this engine has {self.spec_arms}")
        prompt_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model.config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        if params.logit_bias and max(params.logit_bias) >= vocab:
            raise ValueError(f"logit_bias token ids must be below the vocabulary size {vocab}")
        max_tokens = params.max_tokens or self.max_model_len - len(prompt_ids)
        if len(prompt_ids) + max_tokens > self.max_model_len:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the messages, {max_tokens} in "
                "the completion). Please reduce the length of the messages or completion."
            )
        now = arrival_time or time.time()
        group = []
        for i in range(params.n):
            gen = self.generator if params.seed is None else torch.Generator().manual_seed(params.seed + i)
            req = Request(
                request_id=f"{request_id}#{i}",
                group_id=request_id,
                index=i,
                token_ids=list(prompt_ids),
                num_prompt_tokens=len(prompt_ids),
                params=params,
                max_tokens=max_tokens,
                eos_token_ids=frozenset() if params.ignore_eos else self.eos_token_ids,
                detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens, params.stop),
                generator=gen,
                spec_arm=arm,
                metrics=RequestMetrics(arrival_time=now, num_prompt_tokens=len(prompt_ids), spec_arm=arm),
                logprobs=[] if params.logprobs is not None else None,
            )
            group.append(req)
            self.scheduler.add(req)
        self.groups[request_id] = group
        self.prompts[request_id] = prompt if isinstance(prompt, str) else None

    def abort_request(self, request_id: str) -> None:
        """Stop a request and return its KV blocks; unknown or finished ids are ignored."""
        for req in self.groups.pop(request_id, []):
            if not req.finished:
                req.status, req.finish_reason = RequestStatus.FINISHED, "abort"
                self.scheduler.remove(req)
        self.prompts.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.groups)

    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(
            num_running=len(s.running),
            num_waiting=len(s.waiting),
            kv_usage=self.kv.usage(),
            num_free_blocks=self.kv.num_free_blocks,
            num_total_blocks=self.kv.pool.num_blocks,
            prefix_cache_queries=self.kv.prefix_stats.queries,
            prefix_cache_hits=self.kv.prefix_stats.hits,
            num_preemptions=s.num_preemptions,
        )

    # ---- the step ---------------------------------------------------------------------------------

    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """One step; returns an output per request it advanced (finished_only: only the finished ones).

        With async scheduling, a plain step (no drafts) queues the next step on the device before its own
        tokens reach the host: the host work of one step overlaps the forward of the next.
        """
        cur, self._inflight = self._inflight or self._launch(), None
        if cur is None:
            return []
        overlap = self.async_scheduling and self._can_overlap(cur)
        self._overlap_run = self._overlap_run + 1 if overlap else 0
        if overlap:
            tokens = sample_roots(cur.items, cur.out.logits)  # on the device: the next step's roots
            fetched = HostCopy(tokens)  # queued before the next step, so it does not wait for it
            self._advance(cur)
            self._inflight = self._launch(after=(cur, tokens))
            results = [it.result([0], [t]) for it, t in zip(cur.items, fetched.tolist(), strict=True)]
        else:
            for p in cur.proposals:
                if p is not None:
                    p.resolve()
            results = verify(cur.items, cur.out.logits)
            if self._gaps:  # the device idles from here until the next forward
                self._gaps.synced(sum(p is not None for p in cur.proposals))
        results_by_req = dict(zip((id(it.request) for it in cur.items), results, strict=True))
        touched = self._commit(cur, results_by_req)
        self._observe(cur.scheduled, results_by_req, cur.out)
        return self._outputs(touched, finished_only)

    def _launch(self, after: tuple[InflightStep, torch.Tensor] | None = None) -> InflightStep | None:
        """Schedule, draft, and queue the target forward; `after`: the step in flight and its sampled tokens
        (nobody drafts then: drafters read tokens on the host)."""
        limits = {} if after is not None else {name: d.max_num_tokens for name, d in self.drafters.items()}
        sched = self.scheduler.schedule(limits)
        if not sched.scheduled:
            return None
        now = time.time()
        for s in sched.scheduled:
            m = s.request.metrics
            if m.first_scheduled_time is None:
                m.first_scheduled_time, m.num_cached_tokens = now, s.request.num_computed_tokens
        start = time.perf_counter()
        proposals = self._propose(sched.scheduled)
        drafting = time.perf_counter() - start
        batch = self.runner.prepare(sched.scheduled, proposals)
        self.runner.feed_drafts(batch, proposals)
        if after is not None:
            self._feed_pending(sched.scheduled, batch, *after)
        if self._gaps:
            self._gaps.before_forward(drafting)
        out = self.runner.forward(batch)
        if self._gaps:
            self._gaps.after_forward()
        items = [
            VerifyItem(s.request, p, row, s.request.generator)
            for s, p, row in zip(sched.scheduled, proposals, batch.row_starts, strict=True)
            if row >= 0
        ]
        return InflightStep(sched.scheduled, proposals, items, out)

    def _can_overlap(self, step: InflightStep) -> bool:
        """Whether the next step can be scheduled before this one's tokens are known: every live request gains
        exactly one token and none drafts next (a request that this token ends costs the next step a wasted
        row; when it ends every one by length, no step follows). Adaptive requests return to a planned step
        every REPLAN_EVERY steps, where drafting may resume, or up to REPLAN_MAX steps while plans keep drafting
        nothing; while drafting pays, a step that prefills an adaptive request is followed by a planned one, so
        its drafting starts at once."""
        live = [(s, p) for s, p in zip(step.scheduled, step.proposals, strict=True) if not s.request.finished]
        if any(p is not None or s.request.spec_arm not in self._overlap_arms for s, p in live):
            return False
        if live and all(s.produces_token and len(s.request.token_ids) + 1 >= self._token_limit(s.request)
                        for s, _ in live):
            return False
        quiet = self.spec_policy.quiet_streak if self.spec_policy else 0
        if quiet == 0 and any(not s.decoding and s.request.spec_arm != NO_SPEC for s, _ in live):
            return False  # a drafting arm's prefill while drafting pays: the step after it plans its first drafts
        replan = min(REPLAN_EVERY << max(quiet - 1, 0), REPLAN_MAX)
        return self._overlap_run < replan or all(s.request.spec_arm == NO_SPEC for s, _ in live)

    def _advance(self, step: InflightStep) -> None:
        """Count a step's work as done before its tokens arrive: each new token is a PENDING placeholder."""
        for s in step.scheduled:
            req = s.request
            if req.finished:
                continue
            produces = s.produces_token
            req.num_computed_tokens += s.num_new_tokens
            if produces:
                req.token_ids.append(PENDING)
            self.kv.commit(req)
        step.advanced = True

    def _feed_pending(
        self, scheduled: list[ScheduledRequest], batch: StepBatch, prev: InflightStep, tokens: torch.Tensor
    ) -> None:
        """Roots that are still PENDING take their token from the previous step's output on the device."""
        src_of = {id(it.request): i for i, it in enumerate(prev.items)}
        dst, src = [], []
        for b, s in enumerate(scheduled):
            if s.request.token_ids[-1] == PENDING:  # then the request decodes: its root is that token
                dst.append(batch.query_start_loc[b + 1] - 1)
                src.append(src_of[id(s.request)])
        self.runner.feed_tokens(batch, dst, tokens, src)

    def _propose(self, scheduled: list[ScheduledRequest]) -> list[DraftProposal | None]:
        proposals: list[DraftProposal | None] = [None] * len(scheduled)
        for arm, drafter in self.drafters.items():
            idx = [i for i, s in enumerate(scheduled) if s.request.spec_arm == arm and s.max_draft_tokens > 0]
            if not idx:
                continue
            budgets = [scheduled[i].max_draft_tokens for i in idx]
            start = time.perf_counter()
            props = drafter.propose([scheduled[i].request for i in idx], budgets)
            if self.spec_policy is not None:  # drafting costs host time too: adaptive weighs it
                self.spec_policy.observe_propose(arm, time.perf_counter() - start, len(idx))
            for i, k, prop in zip(idx, budgets, props, strict=True):
                if prop is not None and len(prop.tokens) > k:
                    raise RuntimeError(f"drafter {arm!r} proposed {len(prop.tokens)} nodes over its budget {k}")
                proposals[i] = prop if prop is not None and prop.tokens else None
        return proposals

    def _commit(self, step: InflightStep, results: dict[int, VerifyResult]) -> set[str]:
        """Advance each request's KV, append accepted tokens (cut at stops), free finished requests.

        Requests that finished or were aborted while the step was in flight are skipped; for an advanced step
        the KV progress is already counted and each PENDING placeholder gives way to the real token."""
        now = time.time()
        moves = []
        emitted: list[tuple[Request, VerifyResult, int]] = []
        live = [s for s in step.scheduled if not s.request.finished]
        for s in live:
            req = s.request
            res = results.get(id(req))
            if res is None:  # a prefill chunk that does not reach the last token yet
                if not step.advanced:
                    req.num_computed_tokens += s.num_new_tokens
                continue
            if step.advanced:
                req.token_ids.pop()
            else:
                root = req.num_computed_tokens + s.num_new_tokens - 1
                moves += [(req.block_ids, root + a, root + d) for d, a in enumerate(res.accepted_nodes) if a != d]
                req.num_computed_tokens = root + len(res.accepted_nodes)
            emitted.append((req, res, self._append(req, res.token_ids)))
            self._record_spec(req, res, now)
        self.runner.compact(moves)
        self._add_logprobs(emitted, step.out)
        touched = set()
        for s in live:
            req = s.request
            touched.add(req.group_id)
            if req.finished:
                self.scheduler.remove(req)
            else:
                self.kv.commit(req)
        return touched

    def _token_limit(self, req: Request) -> int:
        """The length limit as a token count: max_tokens outputs or max_model_len tokens, whichever comes first."""
        return min(req.num_prompt_tokens + req.max_tokens, self.max_model_len)

    def _append(self, req: Request, tokens: list[int]) -> int:
        """Append tokens one by one until a stop condition; returns how many were kept."""
        ids, stop_ids, detokenize = req.token_ids, req.params.stop_token_ids, req.detokenizer.append
        limit = self._token_limit(req)
        for n, tok in enumerate(tokens, start=1):
            ids.append(tok)
            stop_str = detokenize(ids)
            if tok in req.eos_token_ids:
                reason, stop_reason = "stop", None
            elif tok in stop_ids:
                reason, stop_reason = "stop", tok
            elif stop_str is not None:
                reason, stop_reason = "stop", stop_str
            elif len(ids) >= limit:
                reason, stop_reason = "length", None
            else:
                continue
            req.status, req.finish_reason, req.stop_reason = RequestStatus.FINISHED, reason, stop_reason
            return n
        return len(tokens)

    def _record_spec(self, req: Request, res: VerifyResult, now: float) -> None:
        m = req.metrics
        kept = req.num_output_tokens - m.num_generated_tokens
        if m.first_token_time is None and kept:
            m.first_token_time = now
        m.last_token_time = now
        m.num_steps += 1
        m.num_generated_tokens += kept
        m.num_draft_tokens += res.num_draft_tokens
        m.num_accepted_tokens += len(res.accepted_nodes) - 1
        if self.spec_policy is not None:
            self.spec_policy.observe(req, res)
        depth, accepted = res.draft_depth, len(res.accepted_nodes) - 1
        if len(m.drafts_per_position) < depth:
            grow = depth - len(m.drafts_per_position)
            m.drafts_per_position += [0] * grow
            m.accepted_per_position += [0] * grow
        for d in range(depth):
            m.drafts_per_position[d] += 1
        for d in range(min(accepted, depth)):
            m.accepted_per_position[d] += 1
        if req.finished:
            m.finished_time = now

    def _add_logprobs(self, emitted: list[tuple[Request, VerifyResult, int]], out: ForwardOutput) -> None:
        wanted = [(r, res.rows[:kept], res.token_ids[:kept]) for r, res, kept in emitted if r.logprobs is not None]
        rows = [r for _, rs, _ in wanted for r in rs]
        if not rows:
            return
        toks = [t for _, _, ts in wanted for t in ts]
        nums = [req.params.logprobs for req, rs, _ in wanted for _ in rs]
        entries = iter(top_logprobs(out.logits[rows], toks, nums, self.tokenizer))
        for req, rs, _ in wanted:
            for _ in rs:
                entry = next(entries)
                req.logprobs.append(entry)
                req.cumulative_logprob += next(iter(entry.values())).logprob

    def _observe(self, scheduled: list[ScheduledRequest], results: dict[int, VerifyResult], out: ForwardOutput):
        by_arm: dict[str, list[Request]] = {}
        for s in scheduled:
            by_arm.setdefault(s.request.spec_arm, []).append(s.request)
        for arm, drafter in self.drafters.items():
            if reqs := by_arm.get(arm):
                drafter.observe(reqs, [results.get(id(r)) for r in reqs], out)

    def _outputs(self, group_ids: set[str], finished_only: bool) -> list[RequestOutput]:
        outputs = []
        for gid in group_ids:
            group = self.groups.get(gid)
            if group is None:
                continue
            finished = all(r.finished for r in group)
            if finished_only and not finished:
                continue
            outputs.append(
                RequestOutput(
                    request_id=gid,
                    prompt=self.prompts[gid],
                    prompt_token_ids=group[0].token_ids[: group[0].num_prompt_tokens],
                    outputs=[self._completion(r) for r in group],
                    finished=finished,
                    metrics=_merge_metrics([r.metrics for r in group]),
                )
            )
            if finished:
                del self.groups[gid]
                del self.prompts[gid]
        return outputs

    @staticmethod
    def _completion(req: Request) -> CompletionOutput:
        return CompletionOutput(
            index=req.index,
            text=req.detokenizer.visible_text(req.finished),
            token_ids=req.output_token_ids,
            cumulative_logprob=req.cumulative_logprob if req.logprobs is not None else None,
            logprobs=list(req.logprobs) if req.logprobs is not None else None,
            finish_reason=req.finish_reason,
            stop_reason=req.stop_reason,
        )


def _merge_metrics(ms: Sequence[RequestMetrics]) -> RequestMetrics:
    """One request's metrics from its n samples' (sums of counts, earliest/latest times)."""
    if len(ms) == 1:
        return ms[0]
    first = [m.first_token_time for m in ms if m.first_token_time is not None]
    width = max(len(m.drafts_per_position) for m in ms)

    def pos_sum(attr: str) -> list[int]:
        return [sum(getattr(m, attr)[d] for m in ms if d < len(getattr(m, attr))) for d in range(width)]

    fin = [m.finished_time for m in ms]
    return RequestMetrics(
        arrival_time=ms[0].arrival_time,
        first_scheduled_time=ms[0].first_scheduled_time,
        first_token_time=min(first) if first else None,
        last_token_time=max((m.last_token_time or 0.0) for m in ms) or None,
        finished_time=max(fin) if all(f is not None for f in fin) else None,
        num_prompt_tokens=ms[0].num_prompt_tokens,
        num_cached_tokens=ms[0].num_cached_tokens,
        num_steps=sum(m.num_steps for m in ms),
        num_generated_tokens=sum(m.num_generated_tokens for m in ms),
        num_draft_tokens=sum(m.num_draft_tokens for m in ms),
        num_accepted_tokens=sum(m.num_accepted_tokens for m in ms),
        accepted_per_position=pos_sum("accepted_per_position"),
        drafts_per_position=pos_sum("drafts_per_position"),
        num_preemptions=sum(m.num_preemptions for m in ms),
        spec_arm=ms[0].spec_arm,
    )
