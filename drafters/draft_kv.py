"""Draft KV layers in the target's block pool, and where each request's draft KV stands.

Drafters with layers of their own (draft model, EAGLE) store K/V in extra layer tensors shaped like the
target's, `[num_blocks (+ scratch), block_size, kv_heads, head_dim]`, addressed through the request's own
block table: slot s of the request holds the draft entry of sequence position s. There is no second cache
manager; rejected drafts are simply overwritten later, and `progress` says how many leading entries of a
request are valid.

Prefix caching hands a new request blocks that another request filled. Their draft entries are valid only
if this drafter wrote them for the same tokens, so each block remembers the hash of the token prefix its
draft entries were computed for: set when a request's entries fill the block, dropped whenever a draft
forward writes into it. A new request trusts its leading blocks whose remembered hash equals its own.

EAGLE trees need more slots than the scheduler reserves (top_k nodes per level), so a forward may extend a
request's table with scratch blocks past `num_blocks`, owned by that forward only; the drafter sizes them for
its largest batch up front.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from specserve.attention import token_layout
from specserve.kv_cache import block_hash


@dataclass
class DraftQuery:
    """One sequence of a draft forward: a causal run of entries ending at a root, then tree nodes under it."""

    block_table: list[int]
    context_len: int  # entries already in the draft KV before this query
    num_causal: int  # causal run, root last
    parents: Sequence[int] = ()  # tree nodes after the root, DraftProposal convention


@dataclass
class _Progress:
    num_valid: int  # leading entries whose draft K/V is valid
    num_preemptions: int  # the request's count when this was set: a preemption starts it over
    block_hashes: list[int] = field(default_factory=list)  # chained hash of each full block of its tokens


class DraftKVCache:
    """Extra KV layers over the target's blocks, with per-request progress and per-block validity."""

    def __init__(self, target, num_layers: int, num_kv_heads: int, head_dim: int, num_scratch: int = 0):
        self.block_size = target.block_size
        self.num_blocks = target.num_blocks
        self.device, self.dtype = target.device, target.dtype
        self._head_shape = (num_kv_heads, head_dim)
        # fixed for the cache's life: CUDA graphs of draft forwards hold these tensors
        self.num_scratch = num_scratch
        self.layers = [self._zeros(self.num_blocks + num_scratch) for _ in range(num_layers)]
        self._progress: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Request -> _Progress
        self._block_hash: dict[int, int] = {}  # block id -> token-prefix hash its draft entries were made for

    def _zeros(self, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (num_blocks, self.block_size, *self._head_shape)
        return (torch.zeros(shape, dtype=self.dtype, device=self.device),
                torch.zeros(shape, dtype=self.dtype, device=self.device))

    # ---- progress ----------------------------------------------------------------------------------

    def num_valid(self, req) -> int:
        """Leading entries of req whose draft K/V is valid (a new or preempted request: its trusted blocks)."""
        prog = self._progress.get(req)
        if prog is None or prog.num_preemptions != req.metrics.num_preemptions:
            prog = _Progress(0, req.metrics.num_preemptions)
            self._progress[req] = prog
            bs = self.block_size
            for i in range(req.num_computed_tokens // bs):
                h = self._hash(req, prog, i)
                if self._block_hash.get(req.block_ids[i]) != h:
                    break
                prog.num_valid = (i + 1) * bs
        return prog.num_valid

    def set_valid(self, req, num_valid: int) -> None:
        """Record that entries [0, num_valid) of req are valid; blocks they fill become reusable."""
        prog = self._progress[req]
        bs = self.block_size
        for i in range(prog.num_valid // bs, min(num_valid, req.num_computed_tokens) // bs):
            self._block_hash[req.block_ids[i]] = self._hash(req, prog, i)
        prog.num_valid = num_valid

    def forget(self, req) -> None:
        self._progress.pop(req, None)

    def _hash(self, req, prog: _Progress, i: int) -> int:
        """Chained hash of block i's tokens (and all before), cached per request."""
        bs = self.block_size
        while len(prog.block_hashes) <= i:
            j = len(prog.block_hashes)
            prev = prog.block_hashes[-1] if prog.block_hashes else None
            prog.block_hashes.append(block_hash(prev, req.token_ids[j * bs : (j + 1) * bs]))
        return prog.block_hashes[i]

    # ---- forwards ----------------------------------------------------------------------------------

    def block_tables(self, requests: Sequence, num_slots: Sequence[int]) -> list[list[int]]:
        """Each request's block table, extended with scratch blocks to cover num_slots sequence slots."""
        bs = self.block_size
        extra = [max(0, -(-n // bs) - len(r.block_ids)) for r, n in zip(requests, num_slots, strict=True)]
        if sum(extra) > self.num_scratch:
            raise RuntimeError(f"a draft forward needs {sum(extra)} scratch blocks; the cache has {self.num_scratch}")
        tables, next_block = [], self.num_blocks
        for r, e in zip(requests, extra, strict=True):
            tables.append(list(r.block_ids) + list(range(next_block, next_block + e)))
            next_block += e
        return tables

    def metadata(self, queries: Sequence[DraftQuery]) -> DraftMetadata:
        """Host metadata of a draft forward (DraftRunner uploads it); drops validity of the blocks it writes.

        Positions follow the target's: causal entries at context_len + i, tree nodes at root + depth.
        """
        bs, b = self.block_size, len(queries)
        ctx = np.fromiter((q.context_len for q in queries), np.int64, b)
        n_causal = np.fromiter((q.num_causal for q in queries), np.int64, b)
        n_nodes = np.fromiter((len(q.parents) for q in queries), np.int64, b)
        tables = _padded([q.block_table for q in queries])
        lay = token_layout(ctx, n_causal, n_nodes, [(i, list(q.parents)) for i, q in enumerate(queries) if q.parents])
        slot_mapping = lay.slots(tables, bs)
        self._forget_written(slot_mapping)
        return DraftMetadata(lay.positions, slot_mapping, lay.tree_mask, lay.query_start_loc, ctx + n_causal + n_nodes,
                             ctx, n_causal - 1, tables)

    def tree_slots(self, tables: Sequence[list[int]], roots: Sequence[int], num_nodes: int
                   ) -> tuple[np.ndarray, np.ndarray]:
        """(K/V slots [B, num_nodes], block tables [B, W]) of queries of a root and num_nodes - 1 tree nodes each,
        query i's at sequence indices roots[i] .. roots[i] + num_nodes - 1: metadata()'s slot_mapping and
        block_tables for them, without laying out a tree whose shape the caller knows. Drops validity of the
        blocks they write."""
        b, bs = len(tables), self.block_size
        padded = _padded(tables)
        logical = np.asarray(roots, np.int64)[:, None] + np.arange(num_nodes)  # [B, num_nodes]
        slots = padded[np.arange(b)[:, None], logical // bs] * bs + logical % bs
        self._forget_written(slots)
        return slots, padded

    def _forget_written(self, slot_mapping: np.ndarray) -> None:
        """A forward writes these slots: their blocks' draft entries are no longer the ones hashed."""
        for block in np.unique(slot_mapping // self.block_size).tolist():
            self._block_hash.pop(block, None)


def _padded(tables: Sequence[Sequence[int]]) -> np.ndarray:
    """[B, W] int64 block tables, each padded with 0 to the longest."""
    out = np.zeros((len(tables), max(len(t) for t in tables)), np.int64)
    for i, t in enumerate(tables):
        out[i, : len(t)] = t
    return out


@dataclass
class DraftMetadata:
    """A draft forward's metadata on the host, AttentionMetadata's fields of the same names."""

    positions: np.ndarray  # [T] int64
    slot_mapping: np.ndarray  # [T] int64
    tree_mask: np.ndarray  # [T] int64
    query_start_loc: np.ndarray  # [B + 1] int64
    seq_lens: np.ndarray  # [B] int64
    context_lens: np.ndarray  # [B] int64
    tree_offsets: np.ndarray  # [B] int64
    block_tables: np.ndarray  # [B, W] int64, W the widest query's table


def plan_chunks(spans: Sequence[tuple[int, int]], max_tokens: int) -> list[list[tuple[int, int, int]]]:
    """Split per-request spans [start, end) into forwards of at most max_tokens entries.

    Returns forwards as lists of (request index, start, end); a span cut in two continues in the next
    forward, after its first part's K/V is written. Example: spans [(0, 5), (3, 4)], max 4 ->
    [[(0, 0, 4)], [(0, 4, 5), (1, 3, 4)]].
    """
    forwards: list[list[tuple[int, int, int]]] = [[]]
    room = max_tokens
    for i, (start, end) in enumerate(spans):
        while start < end:
            if room == 0:
                forwards.append([])
                room = max_tokens
            take = min(end - start, room)
            forwards[-1].append((i, start, start + take))
            start, room = start + take, room - take
    return [f for f in forwards if f]
