"""Turns a scheduled step into flat model inputs, runs the target forward and compacts accepted KV.

Drafters that read the target's hidden states register a SlotFeatures table; every forward fills it.

`prepare` builds the step's metadata with numpy (loops over sequences, never over tokens) straight into
the pinned staging buffers of cuda_graphs.StepBuffers, and uploads it in two copies. `forward` replays the
CUDA graph of the step's bucket (decode/verify steps, and prefill chunks of small steps), and runs eagerly
otherwise (enforce_eager, shapes past the largest bucket). Tensors of a StepBatch and of a
graph's ForwardOutput are views of static buffers: valid until the next prepare / forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from specserve.attention import MAX_TREE_NODES, AttentionMetadata, slot_of, token_layout
from specserve.cuda_graphs import Bucket, Buckets, CudaGraphs, StepBuffers, StepViews, fill_dummy, pad_views
from specserve.drafters.base import DeviceDrafts, DraftProposal
from specserve.models.llama import ModelOutput
from specserve.sampler import to_device
from specserve.scheduler import ScheduledRequest

PROFILE_REPEATS = 3


@dataclass
class StepBatch:
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [num_rows] int64: query tokens whose next-token logits are needed
    row_starts: list[int]  # per sequence: its root's row in the logits, -1 if it produces no token
    query_start_loc: list[int]  # [B + 1] host copy
    graph_key: Bucket | None = None  # the bucket replayed; None: eager


@dataclass
class ForwardOutput:
    logits: torch.Tensor  # [num_rows, vocab] float32
    hidden_states: torch.Tensor  # [num_tokens, hidden] after the final norm
    aux_hidden_states: list[torch.Tensor]  # each [num_tokens, hidden]: layers in model.aux_layers
    batch: StepBatch


class SlotFeatures:
    """A per-KV-slot table of what a drafter reads from the target (EAGLE's features, Medusa's hidden states).

    Every target forward, graphs included, writes its tokens' rows at their K/V slots, and accepted-path
    compaction moves them with the K/V: slot s holds the row of the token at s, with no host work per step.
    Drafters that read the same rows (arms of one checkpoint, EAGLE-1 and Medusa) share one table.
    """

    def __init__(self, target, width: int, rows: Callable[[ModelOutput], torch.Tensor]):
        self.block_size = target.block_size
        num_slots = target.num_blocks * target.block_size
        # then a row that stays zero, then the one padding tokens' slot -1 writes
        self.table = torch.zeros(num_slots + 2, width, device=target.device, dtype=target.dtype)
        self.rows = rows

    @staticmethod
    def table_bytes(width: int, block_size: int, elem_size: int) -> tuple[int, int]:
        """(bytes per pool block, fixed bytes) of a table `width` wide: a row per slot, plus the two above."""
        return block_size * width * elem_size, 2 * width * elem_size

    @classmethod
    def get(cls, target, key: tuple, width: int, rows: Callable[[ModelOutput], torch.Tensor]) -> SlotFeatures:
        """The table stored under key in target.slot_features, made on first use (before graph capture); rows:
        [T, width] of a forward's outputs, the same for every drafter asking for this key."""
        if key not in target.slot_features:
            target.slot_features[key] = cls(target, width, rows)
        return target.slot_features[key]

    def read(self, at: list[tuple[list[int], int]]) -> torch.Tensor:
        """[N, width] the rows of (block table, position) pairs; position -1 reads zeros."""
        bs, zero = self.block_size, self.table.shape[0] - 2
        idx = [slot_of(blocks, p, bs) if p >= 0 else zero for blocks, p in at]
        return self.table[to_device(idx, torch.int64, self.table.device)]


def hidden_state_rows(out: ModelOutput) -> torch.Tensor:
    """[T, hidden] the target's last hidden states of a forward: what EAGLE-1 and Medusa read."""
    return out.hidden_states


HIDDEN_STATES = ("hidden_states",)  # the SlotFeatures key of hidden_state_rows: one table for EAGLE-1 and Medusa


class ModelRunner:
    """Owns the target model, its paged KV pool, the step buffers and the CUDA graphs."""

    def __init__(
        self, model, num_blocks: int, block_size: int, backend, device: torch.device, dtype: torch.dtype, *,
        max_num_seqs: int = 64, max_num_batched_tokens: int = 2048, max_model_len: int = 2048,
    ):
        cfg = model.config
        self.model = model
        self.backend = backend
        self.device = device
        self.block_size = block_size
        self.max_model_len = max_model_len
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv_caches = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(cfg.num_layers)
        ]
        width = -(-max_model_len // block_size)
        # a step never holds more than max_num_batched_tokens tokens (drafts count against it too)
        self.buffers = StepBuffers(max_num_seqs, max_num_batched_tokens, width, device)
        self.max_num_seqs, self.max_tokens = max_num_seqs, max_num_batched_tokens
        self.graphs: CudaGraphs | None = None
        self.slot_features: dict[tuple, SlotFeatures] = {}  # drafters add theirs before the graphs are captured
        cuda = device.type == "cuda"
        self._moves = torch.empty(2 * max_num_seqs * MAX_TREE_NODES, dtype=torch.int64, pin_memory=cuda)

    @torch.inference_mode()
    def capture_graphs(self, query_lens: list[int], capture: bool) -> None:
        """Graphs for the drafters' per-sequence query lengths (see cuda_graphs.Buckets); capture False (off CUDA,
        or with the torch reference, which syncs) replays the buckets eagerly over the same padded buffers."""
        buckets = Buckets(self.max_num_seqs, query_lens, self.max_tokens, self.max_model_len)
        self.graphs = CudaGraphs(buckets, self.max_model_len, capture)
        self.graphs.build(self.make_dummy, self._model_forward)

    # ---- inputs -----------------------------------------------------------------------------------

    def prepare(self, scheduled: list[ScheduledRequest], proposals: list[DraftProposal | None]) -> StepBatch:
        num_seqs = len(scheduled)
        # one pass over the sequences: their counts into one array, and each one's first logits row (-1: none)
        per_seq, row_starts, num_rows = [], [], 0
        for s, p in zip(scheduled, proposals, strict=True):
            drafts, produces = len(p.tokens) if p else 0, s.produces_token
            per_seq.append((s.num_new_tokens, drafts, s.request.num_computed_tokens, produces))
            row_starts.append(num_rows if produces else -1)
            num_rows += drafts + 1 if produces else 0
        counts = np.array(per_seq, np.int64)  # [B, 4]
        n_new, n_draft, ctx = counts[:, 0], counts[:, 1], counts[:, 2]  # committed tokens, draft nodes, cached
        produces = counts[:, 3] == 1
        if (longest := int(n_draft.max())) >= MAX_TREE_NODES:
            raise ValueError(f"a draft tree has at most {MAX_TREE_NODES - 1} nodes, got {longest}")
        q_len = n_new + n_draft
        seq_lens = ctx + q_len
        max_query_len = int(q_len.max())
        trees = [(b, p.parents) for b, p in enumerate(proposals) if p is not None and not _is_chain(p.parents)]
        lay = token_layout(ctx, n_new, n_draft, trees)
        qsl, num_tokens = lay.query_start_loc, len(lay.seq)

        key = self.graphs.buckets.find(num_seqs, num_tokens, max_query_len) if self.graphs else None
        b_cap, t_cap = key[:2] if key else (num_seqs, num_tokens)
        h = self.buffers.host(b_cap, t_cap, num_rows)
        tables = h.block_tables  # [b_cap, W]
        tables[:num_seqs] = 0
        for b, s in enumerate(scheduled):
            tables[b, : len(s.request.block_ids)] = s.request.block_ids
        h.input_ids[:num_tokens] = [t for s, p in zip(scheduled, proposals, strict=True) for t in _query(s, p)]
        h.tree_mask[:num_tokens] = lay.tree_mask
        h.positions[:num_tokens] = lay.positions
        h.slot_mapping[:num_tokens] = lay.slots(tables, self.block_size)
        h.logits_indices[:] = np.flatnonzero(produces[lay.seq] & (lay.node >= 0))  # the rows verification reads
        h.query_start_loc[: num_seqs + 1] = qsl
        h.seq_lens[:num_seqs] = seq_lens
        h.context_lens[:num_seqs] = ctx
        h.tree_offsets[:num_seqs] = n_new - 1
        pad_views(h, num_seqs, num_tokens)
        return self._upload(b_cap, t_cap, num_rows, num_seqs, num_tokens, key, row_starts, qsl.tolist(),
                            max_query_len=max_query_len, max_seq_len=int(seq_lens.max()))

    def make_dummy(self, num_seqs: int, num_tokens: int) -> StepBatch:
        """A harmless step of this shape: causal chunks with no K/V writes, every token a logits row.

        For graph capture and timing; the attention reads block 0, which holds finite values (zeros at start).
        """
        h = self.buffers.host(num_seqs, num_tokens, num_tokens)
        qsl, q_len = fill_dummy(h, num_seqs, num_tokens)
        h.logits_indices[:] = np.arange(num_tokens)
        longest = int(q_len.max())
        key = self.graphs.buckets.find(num_seqs, num_tokens, longest) if self.graphs else None
        return self._upload(num_seqs, num_tokens, num_tokens, num_seqs, num_tokens,
                            key if key and key[:2] == (num_seqs, num_tokens) else None, qsl[:-1].tolist(), qsl.tolist(),
                            max_query_len=longest, max_seq_len=longest)

    def _upload(self, b_cap, t_cap, num_rows, num_seqs, num_tokens, key, row_starts, qsl, **maxima) -> StepBatch:
        d: StepViews[torch.Tensor] = self.buffers.upload(b_cap, t_cap, num_rows)
        input_ids, positions, tensors = self.buffers.step_inputs(b_cap, t_cap, num_rows, num_seqs, num_tokens)
        meta = AttentionMetadata(**tensors, block_size=self.block_size, **maxima)
        return StepBatch(input_ids, positions, meta, d.logits_indices, row_starts, qsl, key)

    def feed_tokens(self, batch: StepBatch, dst: list[int], tokens: torch.Tensor, src: list[int]) -> None:
        """Async scheduling: input positions dst take tokens[src], sampled by a step still on the device."""
        if not dst:
            return
        n = len(dst)
        if dst == list(range(dst[0], dst[0] + n)) and src == list(range(src[0], src[0] + n)):
            batch.input_ids[dst[0] : dst[0] + n].copy_(tokens[src[0] : src[0] + n])  # no index to upload
        else:
            idx = to_device([dst, src], torch.int64, self.device)  # [2, n]
            batch.input_ids[idx[0]] = tokens[idx[1]]

    def feed_drafts(self, batch: StepBatch, proposals: list[DraftProposal | None]) -> None:
        """Trees made on the device write their nodes' tokens, rope positions and ancestor masks over the
        placeholders prepare laid out (a sequence's nodes are its last query tokens)."""
        groups: dict[int, tuple[DeviceDrafts, list[int], list[int]]] = {}
        for b, p in enumerate(proposals):
            if p is None or p.on_device is None:
                continue
            drafts, dst, src = groups.setdefault(id(p.on_device), (p.on_device, [], []))
            n, end, width = len(p.tokens), batch.query_start_loc[b + 1], drafts.nodes.shape[2]
            dst.extend(range(end - n, end))
            src.extend(range(p.row * width, p.row * width + n))
        for drafts, dst, src in groups.values():
            idx = to_device([dst, src], torch.int64, self.device)  # [2, n]
            nodes = drafts.nodes.flatten(1)[:, idx[1]]  # [4, n]
            batch.input_ids[idx[0]] = nodes[0]
            batch.positions[idx[0]] = nodes[2]
            batch.meta.tree_mask[idx[0]] = nodes[3]

    # ---- forward ----------------------------------------------------------------------------------

    def _model_forward(self, input_ids, positions, meta):
        out = self.model(input_ids, positions, meta, self.kv_caches, self.backend)
        slots = meta.slot_mapping[: input_ids.shape[0]]  # padding tokens' -1 lands in each table's last row
        for f in self.slot_features.values():
            f.table[slots] = f.rows(out)
        return out

    @torch.inference_mode()
    def forward(self, batch: StepBatch) -> ForwardOutput:
        if batch.graph_key is None:
            out = self._model_forward(batch.input_ids, batch.positions, batch.meta)
            hidden, aux = out.hidden_states, out.aux_hidden_states
            logits = self.model.compute_logits(hidden[batch.logits_indices], self.backend)
        else:
            out = self.graphs.replay(batch.graph_key)  # padded to the bucket: keep the real tokens' rows
            t = batch.input_ids.shape[0]
            hidden, aux = out.hidden_states, list(out.aux_hidden_states)
            if t < batch.graph_key.num_tokens:  # a slice is an op (host time on CUDA): only where there is padding
                hidden, aux = hidden[:t], [a[:t] for a in aux]
            # in decode/verify steps every token is a logits row: no gather
            rows = hidden if batch.logits_indices.shape[0] == t else hidden[batch.logits_indices]
            logits = self.model.compute_logits(rows, self.backend)
        return ForwardOutput(logits, hidden, aux, batch)

    @torch.inference_mode()
    def profile(self, shapes: list[tuple[int, int]]) -> dict[tuple[int, int], float]:
        """CUDA seconds of one forward (logits included) per (num_seqs, num_tokens) shape, on dummy steps."""
        times = {}
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for shape in shapes:
            batch = self.make_dummy(*shape)
            self.forward(batch)  # warm-up
            start.record()
            for _ in range(PROFILE_REPEATS):
                self.forward(batch)
            end.record()
            end.synchronize()
            times[shape] = start.elapsed_time(end) * 1e-3 / PROFILE_REPEATS
        return times

    # ---- after verification -----------------------------------------------------------------------

    def compact(self, moves: list[tuple[list[int], int, int]]) -> None:
        """Move accepted tree nodes' K/V next to the context: (block_ids, src logical, dst logical) per move."""
        if not moves:
            return
        bs, n = self.block_size, len(moves)
        if 2 * n > self._moves.numel():
            self._moves = torch.empty(4 * n, dtype=torch.int64, pin_memory=self._moves.is_pinned())
        pairs = self._moves.numpy()[: 2 * n].reshape(2, n)  # [src; dst] slots
        for i, (blocks, src, dst) in enumerate(moves):
            pairs[:, i] = slot_of(blocks, src, bs), slot_of(blocks, dst, bs)
        # the pinned buffer is rewritten only after the next step's verify has synced the stream
        slots = self._moves[: 2 * n].to(self.device, non_blocking=True)
        caches = [c for kv in self.kv_caches for c in kv]
        caches += [f.table[:-2].view(-1, bs, 1, f.table.shape[1]) for f in self.slot_features.values()]
        self.backend.copy_slots(caches, slots[:n], slots[n:])


def _query(s: ScheduledRequest, p: DraftProposal | None) -> list[int]:
    """Query token ids of one sequence: its committed tokens to run, then its draft nodes."""
    ctx = s.request.num_computed_tokens
    ids = s.request.token_ids[ctx : ctx + s.num_new_tokens]
    return ids + p.tokens if p else ids


def _is_chain(parents: list[int]) -> bool:
    return parents == list(range(len(parents)))
