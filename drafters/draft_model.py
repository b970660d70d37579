"""Draft model: a smaller Llama-family model with the target's tokenizer drafts a chain, greedy or sampled.

Its KV lives in the target's block pool (DraftKVCache): slot s of a request holds the draft model's K/V of
token s. propose() runs, per request, the entries the draft has not seen yet (the accepted tokens and the
root) as one causal chunk, then k - 1 one-token steps. A draft token's entry stays valid when the target
accepts it (same token, same position), so after verification the draft lags by at most two entries: as
in gpt-fast, when all k drafts are accepted the last one was never fed, and the next chunk runs it with the
bonus token. observe() catches up long runs (prefill chunks) in chunked forwards, keeping propose small.
When every drafting request is greedy, the k - 1 steps are one graph replay with one host sync.

A draft model trained by `specserve train-drafter` shares the target's embedding and LM head (its config.json
says `specserve_shared_embeddings`): they are the target's tensors, not copies.

Sampled requests draw drafts from the draft's own distribution after the request's temperature / top-k /
top-p / min-p and hand it to verification as draft_probs, which keeps rejection sampling exact.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Sequence

import torch

from specserve.attention import MAX_TREE_NODES, AttentionMetadata
from specserve.config import SpeculativeConfig
from specserve.cuda_graphs import BatchGraphs, StaticRows, batch_buckets
from specserve.drafters.base import DraftMemory, DraftProposal
from specserve.drafters.draft_kv import DraftKVCache, DraftQuery, plan_chunks
from specserve.drafters.draft_runner import DraftRunner
from specserve.kv_cache import kv_block_bytes
from specserve.models.config import ModelConfig
from specserve.models.loader import load_model, model_config
from specserve.sampler import RowContext, target_probs

CATCHUP_TOKENS = 2048  # entries per catch-up forward


def draft_memory(spec: SpeculativeConfig, target_config: ModelConfig, block_size: int, elem_size: int,
                 max_num_seqs: int) -> DraftMemory:
    """The draft model's K/V per pool block: all its layers, shaped by its config."""
    cfg = model_config(spec.model)
    return DraftMemory(per_block=kv_block_bytes(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, block_size, elem_size))


class DraftModelDrafter:
    """Chain drafter backed by a small causal LM whose KV shares the target's blocks."""

    def __init__(self, spec: SpeculativeConfig, target):
        # A checkpoint trained by `train-drafter` stores no embedding / LM head: it uses the target's tensors.
        shared = {"model.embed_tokens.weight": target.model.model.embed_tokens.weight,
                  "lm_head.weight": target.model.lm_head.weight}
        loaded = load_model(spec.model, target.dtype, target.device, shared_tensors=shared)
        check_same_vocab(loaded, target)
        self.model = loaded.model
        cfg = loaded.config
        # Rope tables must reach every position the target serves (plus a draft tree's depth).
        self.model.model.rotary_emb.reserve(target.model.config.max_position_embeddings + MAX_TREE_NODES,
                                            target.device)
        self.kv = DraftKVCache(target, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
        self.backend = target.backend
        self.max_num_tokens = spec.num_speculative_tokens
        self.num_kv_layers = cfg.num_layers
        self._drafted: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Request -> entries past the root
        # a step's entries: the root, after the last draft when the target took all k (the chain never fed it)
        self.runner = DraftRunner(self.kv, self._model_forward, target, [2], CATCHUP_TOKENS)
        # greedy chains: the k - 1 steps after the root run from one graph per (batch bucket, steps); per sequence
        # the static input holds the steps' positions [k - 1] | slots [k - 1] | block table
        self.max_seq_len = self.runner.max_seq_len
        steps = max(self.max_num_tokens - 1, 0)
        self._chain_in = StaticRows(target.max_num_seqs, 2 * steps + self.runner.width, target.device)
        self._chain_in.host[:, steps : 2 * steps] = -1  # padding until filled: no K/V writes
        self._chain_in.upload(target.max_num_seqs)
        self._first = torch.zeros(target.max_num_seqs, dtype=torch.int64, device=target.device)  # [B] first drafts
        self.block_size = target.block_size
        keys = [(b, s) for b in batch_buckets(target.max_num_seqs) for s in range(1, steps + 1)]
        self.chains = BatchGraphs(self._chain_static, keys if target.cuda_graphs else [], target.captures_graphs)

    @torch.inference_mode()
    def propose(self, requests: Sequence, max_tokens: Sequence[int]) -> list[DraftProposal | None]:
        active = [(r, k) for r, k in zip(requests, max_tokens, strict=True) if k > 0]
        if not active:
            return [None] * len(requests)
        reqs = [r for r, _ in active]
        spans = [(self.kv.num_valid(r), r.num_computed_tokens + 1) for r in reqs]  # through the root
        logits = self._catch_up(reqs, spans, want_logits=True)  # [B, vocab] at each root
        for r in reqs:
            self.kv.set_valid(r, r.num_computed_tokens + 1)
        if self.chains.batches and all(r.params.greedy for r in reqs):
            return self._greedy_chains(requests, active, logits)
        probs: list[list[torch.Tensor]] = [[] for _ in reqs]
        live = list(range(len(reqs)))  # requests still drafting, rows of logits
        steps: list[tuple[list[int], torch.Tensor]] = []  # (live requests, their tokens [len(live)] on the device)
        for step in range(max(k for _, k in active)):
            picked, q = self._pick([reqs[i] for i in live], logits)
            steps.append((live, picked))
            for j, i in enumerate(live):
                if q[j] is not None:
                    probs[i].append(q[j])
            still = [j for j, i in enumerate(live) if active[i][1] > step + 1]
            if not still:
                break
            live = [live[j] for j in still]
            # feed the tokens just drafted at position root + 1 + step to get the next ones; they stay on the
            # device, so the chain costs one host sync at its end
            ids = picked if len(still) == len(picked) else picked[still]
            queries = [DraftQuery(reqs[i].block_ids, reqs[i].num_computed_tokens + 1 + step, 1) for i in live]
            logits = self._forward(queries, ids, [[0] for _ in live])
        tokens: list[list[int]] = [[] for _ in reqs]
        drafted = torch.cat([p for _, p in steps]).tolist()
        for (rows, _), start in zip(steps, itertools.accumulate((len(r) for r, _ in steps), initial=0), strict=False):
            for j, i in enumerate(rows):
                tokens[i].append(drafted[start + j])
        by_req = {}
        for i, r in enumerate(reqs):
            self._drafted[r] = len(tokens[i]) - 1  # entries written for d1 .. d(k-1)
            by_req[id(r)] = DraftProposal.chain(tokens[i], torch.stack(probs[i]) if probs[i] else None)
        return [by_req.get(id(r)) for r in requests]

    def _greedy_chains(self, requests: Sequence, active: list, logits: torch.Tensor) -> list[DraftProposal | None]:
        """Greedy chains of all active requests from one graph replay and one host sync."""
        b, steps = len(active), max(k for _, k in active) - 1
        cap, width = self.chains.padded(b), self.max_num_tokens - 1
        h = self._chain_in.host[:cap].numpy()
        h[:] = 0
        h[:, width : 2 * width] = -1
        longer = [(i, r, k) for i, (r, k) in enumerate(active) if k > 1]
        if longer:
            m = self.kv.metadata([DraftQuery(r.block_ids, r.num_computed_tokens + 1, k - 1) for _, r, k in longer])
            for (i, r, k), start in zip(longer, m.query_start_loc, strict=False):
                h[i, : k - 1] = m.positions[start : start + k - 1]
                h[i, width : width + k - 1] = m.slot_mapping[start : start + k - 1]
                h[i, 2 * width : 2 * width + len(r.block_ids)] = r.block_ids
        self._chain_in.upload(cap)
        self._first[:b] = logits.argmax(dim=-1)
        drafted = self.chains.run(cap, steps)[:b].tolist() if steps else self._first[:b, None].tolist()
        by_req = {}
        for (r, k), tokens in zip(active, drafted, strict=True):
            self._drafted[r] = k - 1  # entries written for d1 .. d(k-1)
            by_req[id(r)] = DraftProposal.chain(tokens[:k], None)
        return [by_req.get(id(r)) for r in requests]

    def _chain_static(self, b: int, steps: int) -> torch.Tensor:
        """[b, steps + 1] greedy draft tokens: the first (static input) and one per chain step."""
        width = self.max_num_tokens - 1
        inp = self._chain_in.device[:b]
        tables = inp[:, 2 * width :].to(torch.int32)  # [b, table width]
        dev = inp.device
        qsl = torch.arange(b + 1, dtype=torch.int32, device=dev)
        zeros, ones = torch.zeros(b, dtype=torch.int32, device=dev), torch.ones(b, dtype=torch.int64, device=dev)
        tok = self._first[:b]
        out = [tok]
        for s in range(steps):
            pos = inp[:, s].contiguous()  # [b] the token drafted last, at root + 1 + s: all its context is cached
            ctx = pos.to(torch.int32)
            meta = AttentionMetadata(
                query_start_loc=qsl, seq_lens=ctx + 1, context_lens=ctx, block_tables=tables,
                slot_mapping=inp[:, width + s].contiguous(), tree_offsets=zeros, tree_mask=ones, max_query_len=1,
                max_seq_len=self.max_seq_len, block_size=self.block_size,
            )
            tok = self.model.compute_logits(self._model_forward(tok, pos, meta, None), self.backend).argmax(dim=-1)
            out.append(tok)
        return torch.stack(out, dim=1)

    @torch.inference_mode()
    def observe(self, requests, results, out) -> None:
        """Credit accepted drafts' entries, then catch up requests lagging more than a step's worth.

        A request that decoded without drafts (an adaptive plan of 0) is left to lag: the step that drafts for it
        next catches it up in one chunked forward, instead of a small forward every few steps while it waits.
        """
        lagging = []
        for req, res in zip(requests, results, strict=True):
            if req.finished:
                self.kv.forget(req)
                continue
            drafted = self._drafted.pop(req, None)
            if res is not None and drafted is not None:
                accepted = len(res.accepted_nodes) - 1
                root = req.num_computed_tokens - accepted - 1
                self.kv.set_valid(req, root + 1 + min(accepted, drafted))
            waiting = res is not None and drafted is None
            if not waiting and req.num_computed_tokens - self.kv.num_valid(req) > self.max_num_tokens:
                lagging.append(req)
        if lagging:
            self._catch_up(lagging, [(self.kv.num_valid(r), r.num_computed_tokens) for r in lagging], False)
            for r in lagging:
                self.kv.set_valid(r, r.num_computed_tokens)

    def _catch_up(self, reqs: list, spans: list[tuple[int, int]], want_logits: bool) -> torch.Tensor | None:
        """Run entries [start, end) of each request in chunked forwards; logits [B, vocab] at each end."""
        last: dict[int, torch.Tensor] = {}
        for forward in plan_chunks(spans, CATCHUP_TOKENS):
            queries = [DraftQuery(reqs[i].block_ids, s, e - s) for i, s, e in forward]
            ids = [t for i, s, e in forward for t in reqs[i].token_ids[s:e]]
            ends = [i for i, _, e in forward if want_logits and e == spans[i][1]]  # spans finishing here
            rows = self._forward(queries, ids, [[e - s - 1] if i in ends else [] for i, s, e in forward])
            last.update(zip(ends, rows, strict=True))
        return torch.stack([last[i] for i in range(len(reqs))]) if want_logits else None

    def _forward(self, queries: list[DraftQuery], ids: list[int] | torch.Tensor, wanted: list[list[int]]
                 ) -> torch.Tensor:
        """One draft forward; logits [R, vocab] of the query-relative rows wanted per sequence."""
        hidden, qsl = self.runner.run(queries, ids, None)
        rows = [qsl[b] + j for b, js in enumerate(wanted) for j in js]
        if rows and rows == list(range(rows[0], rows[0] + len(rows))):
            return self.model.compute_logits(hidden[rows[0] : rows[0] + len(rows)], self.backend)  # no index upload
        return self.model.compute_logits(hidden[rows], self.backend)

    def _model_forward(self, input_ids, positions, meta, hidden: None) -> torch.Tensor:
        return self.model(input_ids, positions, meta, self.kv.layers, self.backend).hidden_states

    def _pick(self, reqs: list, logits: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Next draft token per request ([B] on the device): argmax for greedy ones, else a draw from q (returned
        as [vocab])."""
        picked = logits.argmax(dim=-1)  # [B]
        sampled = [j for j, r in enumerate(reqs) if not r.params.greedy]
        q: list[torch.Tensor | None] = [None] * len(reqs)
        if sampled:
            rows = [RowContext(reqs[j].params, reqs[j].token_ids, reqs[j].num_prompt_tokens, frozenset())
                    for j in sampled]
            probs = target_probs(logits[sampled], rows)  # [S, vocab] float32
            u = torch.tensor([float(torch.rand((), generator=reqs[j].generator)) for j in sampled],
                             device=logits.device)
            cdf = probs.cumsum(dim=-1)
            draws = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1)
            picked[sampled] = draws.clamp(max=logits.shape[-1] - 1)
            for j, row in zip(sampled, probs, strict=True):
                q[j] = row
        return picked, q


def check_same_vocab(loaded, target) -> None:
    """ValueError unless the draft model shares the target's vocabulary (size and tokenizer)."""
    draft_vocab, target_vocab = loaded.config.vocab_size, target.model.config.vocab_size
    if draft_vocab != target_vocab:
        raise ValueError(f"draft model vocab size {draft_vocab} does not match the target's {target_vocab}")
    if loaded.tokenizer is not None and target.tokenizer is not None:
        if loaded.tokenizer.get_vocab() != target.tokenizer.get_vocab():
            raise ValueError("the draft model's tokenizer differs from the target's (same size, other tokens)")
