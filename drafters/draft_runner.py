"""A drafter's forwards over its draft KV: metadata through pinned step buffers, fixed shapes from CUDA graphs.

A draft forward used to upload its metadata as eight small tensors from pageable memory, each copy waiting for
the GPU, then launch every kernel of its layers from Python: 12-14 ms of host time per batch-1 step on an H200
for EAGLE and the draft model, against 1.2 ms for a whole plain target step. Here the metadata goes into the
same pinned buffers the target uses (cuda_graphs.StepBuffers, two copies), and every forward that fits a
bucket (a draft-model chain step, an EAGLE level, the few entries a step commits, a short prompt's catch-up)
replays a graph captured per bucket (cuda_graphs.Buckets) at start-up, as the target's steps do. Longer catch-up
runs run eagerly over the same buffers.

Graphs read the draft KV tensors they were captured with, so the drafter sizes its scratch blocks before
building the runner and never grows them after.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import torch

from specserve.attention import MAX_TREE_NODES, AttentionMetadata
from specserve.cuda_graphs import Buckets, CudaGraphs, StepBuffers, StepViews, fill_dummy, pad_views, step_meta
from specserve.drafters.draft_kv import DraftKVCache, DraftMetadata, DraftQuery

# forward(input_ids [T], positions [T], meta, hidden [T, H] or None) -> [T, H]
DraftForward = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata, "torch.Tensor | None"], torch.Tensor]


@dataclasses.dataclass
class _Dummy:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata


class DraftRunner:
    """Runs draft forwards of DraftQuery batches; the same outputs eager or replayed (graphs need CUDA)."""

    def __init__(self, kv: DraftKVCache, forward: DraftForward, target, query_lens: Sequence[int],
                 max_chunk: int, hidden_size: int | None = None):
        """query_lens: per-sequence query lengths (root + nodes) to capture; max_chunk: the most tokens of a
        catch-up forward; hidden_size: width of the hidden input the forward reads (EAGLE), None for none."""
        self.kv, self._forward = kv, forward
        self.block_size = kv.block_size
        self.max_seq_len = target.max_model_len + MAX_TREE_NODES  # tree nodes sit past the root
        self.width = -(-self.max_seq_len // self.block_size) + 1  # block-table entries per sequence
        max_tokens = max(max_chunk, target.max_num_seqs * max(query_lens, default=1))
        self.buffers = StepBuffers(target.max_num_seqs, max_tokens, self.width, kv.device)
        self.hidden = None  # [max tokens, H] the graphs' hidden input
        if hidden_size is not None:
            self.hidden = torch.zeros(max_tokens, hidden_size, device=kv.device, dtype=kv.dtype)
        self.graphs = None
        if query_lens and target.cuda_graphs:
            buckets = Buckets(target.max_num_seqs, list(query_lens), max_tokens, target.max_model_len)
            self.graphs = CudaGraphs(buckets, self.max_seq_len, target.captures_graphs)
            with torch.inference_mode():
                self.graphs.build(self._dummy, self._static_forward)

    def run(self, queries: Sequence[DraftQuery], ids: list[int] | torch.Tensor, hidden: torch.Tensor | None
            ) -> tuple[torch.Tensor, list[int]]:
        """(outputs [T, H], query_start_loc) of one forward; drops validity of the blocks it writes.

        Graph outputs are static buffers: read them before the next run.
        """
        m = self.kv.metadata(queries)
        num_seqs, num_tokens = len(queries), len(m.positions)
        max_query_len = int(np.diff(m.query_start_loc).max())
        # the kernels take any causal run and tree within the bucket's maxima
        key = self.graphs.buckets.find(num_seqs, num_tokens, max_query_len) if self.graphs else None
        b_cap, t_cap = key[:2] if key else (num_seqs, num_tokens)
        h = self.buffers.host(b_cap, t_cap, 0)
        on_host = not isinstance(ids, torch.Tensor)
        if on_host:
            h.input_ids[:num_tokens] = ids
        _fill(h, m)
        pad_views(h, num_seqs, num_tokens)
        d = self.buffers.upload(b_cap, t_cap, 0)
        if not on_host:
            d.input_ids[:num_tokens].copy_(ids)
        qsl = m.query_start_loc.tolist()
        if key is not None:
            if hidden is not None:
                self.hidden[:num_tokens].copy_(hidden)
            return self.graphs.replay(key)[:num_tokens], qsl
        meta = step_meta(d, num_seqs, num_tokens, self.block_size, max_query_len=max_query_len,
                         max_seq_len=int(m.seq_lens.max()))
        return self._forward(d.input_ids[:num_tokens], d.positions[:num_tokens], meta, hidden), qsl

    def _static_forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata):
        hidden = None if self.hidden is None else self.hidden[: input_ids.shape[0]]
        return self._forward(input_ids, positions, meta, hidden)

    def _dummy(self, num_seqs: int, num_tokens: int) -> _Dummy:
        fill_dummy(self.buffers.host(num_seqs, num_tokens, 0), num_seqs, num_tokens)
        d = self.buffers.upload(num_seqs, num_tokens, 0)
        return _Dummy(d.input_ids, d.positions, step_meta(d, num_seqs, num_tokens, self.block_size,
                                                        max_query_len=num_tokens, max_seq_len=num_tokens))


def _fill(h: StepViews[np.ndarray], m: DraftMetadata) -> None:
    """A draft forward's metadata (DraftKVCache.metadata) into the step's host views."""
    n, b = len(m.positions), len(m.seq_lens)
    h.positions[:n], h.slot_mapping[:n], h.tree_mask[:n] = m.positions, m.slot_mapping, m.tree_mask
    h.query_start_loc[: b + 1], h.seq_lens[:b] = m.query_start_loc, m.seq_lens
    h.context_lens[:b], h.tree_offsets[:b] = m.context_lens, m.tree_offsets
    h.block_tables[:b] = 0
    h.block_tables[:b, : m.block_tables.shape[1]] = m.block_tables
