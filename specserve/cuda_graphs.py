"""Static step buffers, and CUDA graphs of the target's decode/verify forward replayed over them.

Every step's metadata goes to the device in two copies (pinned host memory on CUDA), one per dtype. The
tensors a step reads are views of two flat device buffers at offsets fixed by the step's padded shape
(B sequences, T tokens, R logits rows; W = block-table width, the same for every step):

    int64: [ input_ids T | positions T | slot_mapping T | tree_mask T | logits_indices R ]
    int32: [ query_start_loc B+1 | seq_lens B | context_lens B | tree_offsets B | block_tables B x W ]

A graph captured for (B, T) reads the views of that shape, so packing a step at its bucket's shape and
replaying is the forward. Padding: tokens past the real ones have slot -1 (no K/V write), position 0 and
mask 0 and belong to no sequence; sequences past the real ones have empty queries and seq_len 0, so the
attention kernels skip them. Padded rows of the outputs hold garbage and are sliced off.

Buckets (nano-vllm's recipe, with a token axis): B in 1, 2, 4, 8, 16, 32, 48, 64, 96, 128, ... and
T = B x q for q in 1, 2, 4, ... up to the longest verify query. Steps of at most PREFILL_SEQS sequences also
have prefill buckets, T in 16, 24, 32, 48, ... up to PREFILL_TOKENS, whose queries may be T long: eager, a
prompt's forward is a few hundred kernel launches from Python (10-15 ms of host time for SmolLM2 on an H100,
more than its GPU time). Each bucket's attention is launched for its own longest query, never longer: the
grid and split workspace of a plain decode step stay one query row a sequence. A step goes to the smallest
B >= its sequences, then the smallest T >= its tokens whose longest query holds its own: cost follows total
tokens, so an adaptive batch where few sequences draft pays for few padded tokens. Graphs are captured
largest first into one memory pool. Larger steps run eagerly over the same buffers.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
import gc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, TypeVar

import numpy as np
import torch

from specserve.attention import AttentionMetadata

A = TypeVar("A", np.ndarray, torch.Tensor)
PREFILL_SEQS = 8  # prefill buckets for steps of at most this many sequences
PREFILL_TOKENS = 512  # and tokens (vLLM's largest capture size by default)
MIN_PREFILL_TOKENS = 16  # the smallest prefill bucket: shorter chunks pad to it (or fit a decode bucket)


@dataclass
class StepViews(Generic[A]):
    """One step's inputs at one padded shape: numpy views of the host buffers or tensors on the device."""

    input_ids: A  # [T] int64
    positions: A  # [T] int64
    slot_mapping: A  # [T] int64, -1 for padding
    tree_mask: A  # [T] int64
    logits_indices: A  # [R] int64
    query_start_loc: A  # [B + 1] int32
    seq_lens: A  # [B] int32
    context_lens: A  # [B] int32
    tree_offsets: A  # [B] int32
    block_tables: A  # [B, W] int32


def _views(buf64, buf32, num_seqs: int, num_tokens: int, num_rows: int, width: int) -> StepViews:
    t, b = num_tokens, num_seqs
    return StepViews(
        buf64[0:t], buf64[t : 2 * t], buf64[2 * t : 3 * t], buf64[3 * t : 4 * t], buf64[4 * t : 4 * t + num_rows],
        buf32[0 : b + 1], buf32[b + 1 : 2 * b + 1], buf32[2 * b + 1 : 3 * b + 1], buf32[3 * b + 1 : 4 * b + 1],
        buf32[4 * b + 1 : 4 * b + 1 + b * width].reshape(b, width),
    )


class StepBuffers:
    """Pinned host staging and static device buffers for every step's metadata (one per dtype)."""

    def __init__(self, max_seqs: int, max_tokens: int, width: int, device: torch.device):
        self.width = width  # block-table entries per sequence
        self.device = device
        self.cuda = device.type == "cuda"
        self.host64 = torch.zeros(5 * max_tokens, dtype=torch.int64, pin_memory=self.cuda)
        self.host32 = torch.zeros(4 * max_seqs + 1 + max_seqs * width, dtype=torch.int32, pin_memory=self.cuda)
        # on the CPU the host buffers are the device buffers: nothing to copy
        self.dev64 = torch.zeros_like(self.host64, device=device) if self.cuda else self.host64
        self.dev32 = torch.zeros_like(self.host32, device=device) if self.cuda else self.host32
        self._copied = torch.cuda.Event() if self.cuda else None
        self._pending = False
        # views at a shape are fixed slices of fixed buffers: build each shape's once (slicing costs host time)
        self._host_views = functools.lru_cache(maxsize=1024)(
            functools.partial(_views, self.host64.numpy(), self.host32.numpy(), width=width)
        )
        self._device_views = functools.lru_cache(maxsize=1024)(
            functools.partial(_views, self.dev64, self.dev32, width=width)
        )
        self.step_inputs = functools.lru_cache(maxsize=1024)(self._step_inputs)
        self._filled = functools.lru_cache(maxsize=1024)(self._prefixes)

    def _prefixes(self, n64: int, n32: int) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """(device, host) prefixes of both buffers that a step fills, cached per length like the views."""
        return (self.dev64[:n64], self.host64[:n64]), (self.dev32[:n32], self.host32[:n32])

    def host(self, num_seqs: int, num_tokens: int, num_rows: int) -> StepViews[np.ndarray]:
        """Numpy views to fill, once the previous upload has left the pinned memory."""
        if self._pending:
            self._copied.synchronize()  # normally done long ago: each step syncs once after its forward
            self._pending = False
        return self._host_views(num_seqs, num_tokens, num_rows)

    def upload(self, num_seqs: int, num_tokens: int, num_rows: int) -> StepViews[torch.Tensor]:
        """Copy the filled prefix of both buffers to the device (async); device views of the same shape."""
        if self.cuda:
            for dst, src in self._filled(4 * num_tokens + num_rows, 4 * num_seqs + 1 + num_seqs * self.width):
                dst.copy_(src, non_blocking=True)
            self._copied.record()
            self._pending = True
        return self._device_views(num_seqs, num_tokens, num_rows)

    def _step_inputs(self, b_cap: int, t_cap: int, num_rows: int, num_seqs: int, num_tokens: int
                     ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(input_ids, positions, AttentionMetadata's tensors) of a step of num_seqs sequences and num_tokens tokens
        uploaded at the padded shape (b_cap, t_cap, num_rows); step_inputs caches them per shape, since on CUDA
        every slice costs an op's host time."""
        d = self._device_views(b_cap, t_cap, num_rows)
        return d.input_ids[:num_tokens], d.positions[:num_tokens], meta_tensors(d, num_seqs, num_tokens)


def meta_tensors(d: StepViews[torch.Tensor], num_seqs: int, num_tokens: int) -> dict[str, torch.Tensor]:
    """AttentionMetadata's tensors over device views: their first num_seqs sequences and num_tokens tokens."""
    return dict(
        query_start_loc=d.query_start_loc[: num_seqs + 1], seq_lens=d.seq_lens[:num_seqs],
        context_lens=d.context_lens[:num_seqs], block_tables=d.block_tables[:num_seqs],
        slot_mapping=d.slot_mapping[:num_tokens], tree_offsets=d.tree_offsets[:num_seqs],
        tree_mask=d.tree_mask[:num_tokens],
    )


def step_meta(d: StepViews[torch.Tensor], num_seqs: int, num_tokens: int, block_size: int, *, max_query_len: int,
              max_seq_len: int) -> AttentionMetadata:
    """Attention metadata over device views: their first num_seqs sequences and num_tokens tokens."""
    return AttentionMetadata(**meta_tensors(d, num_seqs, num_tokens), max_query_len=max_query_len,
                             max_seq_len=max_seq_len, block_size=block_size)


def pad_views(h: StepViews[np.ndarray], num_seqs: int, num_tokens: int) -> None:
    """Padding of a bucket: tokens of no sequence (no K/V write), sequences with empty queries."""
    h.input_ids[num_tokens:] = 0
    h.positions[num_tokens:] = 0
    h.slot_mapping[num_tokens:] = -1
    h.tree_mask[num_tokens:] = 0
    h.query_start_loc[num_seqs + 1 :] = num_tokens
    h.seq_lens[num_seqs:] = 0
    h.context_lens[num_seqs:] = 0
    h.tree_offsets[num_seqs:] = 0


def fill_dummy(h: StepViews[np.ndarray], num_seqs: int, num_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """A harmless step of this shape in h: causal chunks without K/V writes over block 0. Returns (qsl, q_len)."""
    q_len = np.full(num_seqs, num_tokens // num_seqs, np.int64)
    q_len[: num_tokens % num_seqs] += 1
    qsl = np.concatenate([[0], np.cumsum(q_len)])
    qidx = np.arange(num_tokens) - np.repeat(qsl[:-1], q_len)
    h.input_ids[:], h.positions[:], h.slot_mapping[:] = 0, qidx, -1
    h.tree_mask[:] = qidx == np.repeat(q_len - 1, q_len)  # the last token of each chunk is its root
    h.query_start_loc[:], h.seq_lens[:], h.context_lens[:], h.tree_offsets[:] = qsl, q_len, 0, q_len - 1
    h.block_tables[:] = 0
    return qsl, q_len


def batch_buckets(max_seqs: int) -> list[int]:
    """1, 2, 4, 8, then powers of two from 16 and their 1.5x (16, 24, 32, 48, ...), then max_seqs."""
    sizes, p = [1, 2, 4, 8], 16
    while p < max_seqs:
        sizes += [p, p * 3 // 2]
        p *= 2
    return sorted({s for s in sizes if s < max_seqs} | {max_seqs})


def query_buckets(query_lens: list[int]) -> list[int]:
    """The drafters' query lengths (k + 1 each) and 1, 2, 4, 8, ... below the longest."""
    longest = max(query_lens)
    return sorted({1 << i for i in range(longest.bit_length()) if 1 << i < longest} | set(query_lens))


class Bucket(NamedTuple):
    """A captured step shape: num_seqs sequences, num_tokens tokens, no query longer than max_query_len."""

    num_seqs: int
    num_tokens: int
    max_query_len: int


class Buckets:
    """The step shapes that get a graph, and the choice of one for a step.

    `query_lens` are the per-sequence query lengths the drafters produce (1 + their max draft tokens): a
    batch where every sequence drafts k tokens fills its bucket exactly. No prefill bucket is longer than
    max_seq_len, the longest sequence a block table holds.
    """

    def __init__(self, max_seqs: int, query_lens: list[int], max_tokens: int, max_seq_len: int):
        self.seqs = batch_buckets(max_seqs)
        longest = max(query_lens)
        qs = query_buckets(query_lens)
        decode = {(b, min(b * q, max_tokens)) for b in self.seqs for q in qs}
        # a query never exceeds its step's tokens: capping the longest at T keeps small buckets' grids small
        shapes = {Bucket(b, t, min(longest, t)) for b, t in decode}
        self.decode_shapes = sorted(decode)
        prefill = [t for t in batch_buckets(min(PREFILL_TOKENS, max_tokens, max_seq_len)) if t >= MIN_PREFILL_TOKENS]
        shapes |= {Bucket(b, t, t) for b in self.seqs if b <= PREFILL_SEQS for t in prefill if t >= b}
        self.all = sorted(shapes)
        self._of_seqs = {b: [s for s in self.all if s.num_seqs == b] for b in self.seqs}  # by tokens, then query

    def find(self, num_seqs: int, num_tokens: int, max_query_len: int) -> Bucket | None:
        """Smallest bucket holding the step, or None (eager)."""
        i = bisect.bisect_left(self.seqs, num_seqs)
        if i == len(self.seqs):
            return None
        shapes = self._of_seqs[self.seqs[i]]
        return next((s for s in shapes if s.num_tokens >= num_tokens and s.max_query_len >= max_query_len), None)


@contextlib.contextmanager
def collector_paused():
    """Collect cycles once, then keep the collector off until the block (graph captures) ends: a collection inside a
    capture may free an earlier engine's CUDA graphs, which CUDA does not permit there, invalidating the capture
    ("operation failed due to a previous error during capture"; torch >= 2.10 no longer collects before one)."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@dataclass
class _Entry:
    run: Callable[[], object]  # the eager forward over the bucket's views -> ModelOutput
    graph: torch.cuda.CUDAGraph | None = None
    out: object = None  # the graph's static outputs, rewritten by every replay

    def replay(self):
        if self.graph is None:
            return self.run()
        self.graph.replay()
        return self.out


class CudaGraphs:
    """One captured forward per bucket, sharing a memory pool.

    `forward(meta)` runs the model over the static views; each bucket's metadata carries the static maxima
    (max_query_len, max_seq_len) so the attention launch grid never depends on the step. Without CUDA (or
    with a backend that syncs) the entries replay eagerly over the same padded views: tests of the padding.
    """

    def __init__(self, buckets: Buckets, max_seq_len: int, capture: bool):
        self.buckets = buckets
        self.max_seq_len = max_seq_len
        self.capture = capture
        self.entries: dict[Bucket, _Entry] = {}

    def build(self, make_dummy, forward) -> None:
        """Capture every bucket, largest first; make_dummy(B, T) packs a harmless step of that shape."""
        pool = torch.cuda.graph_pool_handle() if self.capture else None
        with collector_paused():
            for key in reversed(self.buckets.all):
                batch = make_dummy(key.num_seqs, key.num_tokens)
                meta = dataclasses.replace(batch.meta, max_query_len=key.max_query_len, max_seq_len=self.max_seq_len)
                entry = _Entry(functools.partial(forward, batch.input_ids, batch.positions, meta))
                entry.run()  # warm-up: Triton compiles, rope tables, workspaces
                if self.capture:
                    torch.cuda.synchronize()
                    entry.graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(entry.graph, pool=pool):
                        entry.out = entry.run()
                self.entries[key] = entry

    def replay(self, key: Bucket):
        return self.entries[key].replay()


class StaticRows:
    """Per-sequence int64 inputs of a BatchGraphs computation: pinned host rows to fill and the device rows it
    reads. A caller refills the host rows only after syncing on the previous run's result."""

    def __init__(self, num_rows: int, width: int, device: torch.device):
        cuda = device.type == "cuda"
        self.host = torch.zeros(num_rows, width, dtype=torch.int64, pin_memory=cuda)  # [rows, width]
        self.device = torch.zeros_like(self.host, device=device) if cuda else self.host  # the CPU reads the host's

    def upload(self, num_rows: int) -> None:
        """Copy the first num_rows host rows to the device rows (async)."""
        if self.device is not self.host:
            self.device[:num_rows].copy_(self.host[:num_rows], non_blocking=True)


class BatchGraphs:
    """A whole multi-forward computation fn(b, *rest), captured once per key (b a batch bucket).

    For drafters whose step is several dependent forwards (an EAGLE tree's levels, a draft model's chain):
    fn reads static input tensors sliced to b rows and returns a static output (a tensor or a tuple of them). Off
    CUDA, or over an attention backend that syncs, the keys run eagerly: tests of the padding.
    """

    def __init__(self, fn: Callable[..., Any], keys: list[tuple[int, ...]], capture: bool):
        self.fn = fn
        self.batches = sorted({k[0] for k in keys})
        self.graphs: dict[tuple[int, ...], tuple[torch.cuda.CUDAGraph, Any]] = {}
        if keys and capture:
            pool = torch.cuda.graph_pool_handle()
            with torch.inference_mode(), collector_paused():
                for key in sorted(keys, reverse=True):
                    fn(*key)  # warm-up: Triton compiles, workspaces
                    torch.cuda.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        out = fn(*key)
                    self.graphs[key] = (graph, out)

    def padded(self, num_seqs: int) -> int:
        """The batch size a step of num_seqs sequences runs at: its bucket, or itself past the largest."""
        return min((b for b in self.batches if b >= num_seqs), default=num_seqs)

    def run(self, *key: int) -> Any:
        """fn(*key), replayed if captured; the output is static: read it before the next run."""
        if key in self.graphs:
            graph, out = self.graphs[key]
            graph.replay()
            return out
        return self.fn(*key)
