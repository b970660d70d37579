"""Attention metadata for one step: ragged queries over paged KV, with a draft tree per sequence.

Each sequence's query is a causal run of committed tokens whose last token is the tree root, followed by
the draft nodes in topological order:

    query of seq b:  [c0 c1 c2 | r  d1 d2 d3]      context_lens[b] tokens already cached before c0
                                ^ tree_offsets[b] = 3 (query-relative index of the root)

Tokens before the root attend causally. Tree token i (root = 0) attends every key before the root and
the tree nodes whose bit is set in tree_mask: its ancestors and itself. A chain of drafts is a tree whose
masks are 0b1, 0b11, 0b111, ...; a prefill chunk has no drafts (its last token is the root, mask 0b1).
Key/value slots follow query order: query token i of seq b is written at sequence index
context_lens[b] + i, so sibling nodes have distinct slots even though they share a rope position.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

MAX_TREE_NODES = 64  # root included: the ancestor mask is one int64


@dataclass
class AttentionMetadata:
    query_start_loc: torch.Tensor  # [B + 1] int32: cu_num_query_tokens
    seq_lens: torch.Tensor  # [B] int32: cached + query tokens
    context_lens: torch.Tensor  # [B] int32: cached tokens before this step
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    slot_mapping: torch.Tensor  # [num_tokens] int64: where each query token's K/V is written
    tree_offsets: torch.Tensor  # [B] int32: query-relative index of the root
    tree_mask: torch.Tensor  # [num_tokens] int64: ancestor bits over tree nodes, 0 before the root
    max_query_len: int
    max_seq_len: int
    block_size: int

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]


def ancestor_masks(parents: list[int]) -> list[int]:
    """Bitmask per tree node (root first) of its ancestors and itself, as signed int64 values.

    `parents[j]` is the parent (0..j) of draft node j + 1; node 0 is the root.
    Example: parents [0, 0, 1] (root with children 1, 2; node 3 under 1) -> [0b1, 0b11, 0b101, 0b1011].
    """
    if len(parents) + 1 > MAX_TREE_NODES:
        raise ValueError(f"a draft tree has at most {MAX_TREE_NODES - 1} nodes, got {len(parents)}")
    masks = [1]
    for j, p in enumerate(parents):
        if not 0 <= p <= j:
            raise ValueError(f"draft node {j + 1} has parent {p}: parents must precede their children")
        masks.append(masks[p] | (1 << (j + 1)))
    return [m - (1 << 64) if m >= 1 << 63 else m for m in masks]


def tree_depths(parents: list[int]) -> list[int]:
    """Depth of every tree node, root (depth 0) first."""
    depths = [0]
    for p in parents:
        depths.append(depths[p] + 1)
    return depths


# entry j + 1: the mask of chain node j; entry 0 (mask 0) for the causal tokens before a root
CHAIN_MASKS = np.asarray([0, *ancestor_masks(list(range(MAX_TREE_NODES - 1)))], dtype=np.int64)


@dataclass
class TokenLayout:
    """Where each query token of a step sits, built with numpy from per-sequence counts (no loop over tokens)."""

    query_start_loc: np.ndarray  # [B + 1] int64
    seq: np.ndarray  # [T] the sequence of each token
    node: np.ndarray  # [T] tree node (root 0), negative for the causal tokens before the root
    positions: np.ndarray  # [T] rope positions: causal tokens at context + i, tree nodes at root + depth
    logical: np.ndarray  # [T] sequence index of each token's K/V slot, in query order
    tree_mask: np.ndarray  # [T] int64 ancestor bits, 0 before the root

    def slots(self, block_tables: np.ndarray, block_size: int) -> np.ndarray:
        """[T] int64 K/V slots through block_tables [B, W]."""
        blocks = block_tables[self.seq, self.logical // block_size].astype(np.int64)
        return blocks * block_size + self.logical % block_size


def slot_of(block_ids: list[int], pos: int, block_size: int) -> int:
    """The K/V slot of sequence position pos under a block table."""
    return block_ids[pos // block_size] * block_size + pos % block_size


def token_layout(context_lens: np.ndarray, num_causal: np.ndarray, num_nodes: np.ndarray,
                 trees: Iterable[tuple[int, list[int]]]) -> TokenLayout:
    """Layout of B queries of num_causal[b] causal tokens (the root last) then num_nodes[b] draft nodes, over
    context_lens[b] cached tokens. Drafts are chains unless trees names (sequence, parents) for them."""
    q_len = num_causal + num_nodes
    qsl = np.zeros(len(q_len) + 1, np.int64)
    np.cumsum(q_len, out=qsl[1:])
    seq = np.repeat(np.arange(len(q_len)), q_len)
    qidx = np.arange(int(qsl[-1])) - qsl[seq]  # [T] index within its sequence's query
    node = qidx - (num_causal - 1)[seq]
    masks = CHAIN_MASKS[np.maximum(node + 1, 0)]
    logical = context_lens[seq] + qidx
    positions = logical.copy()  # causal tokens and chain nodes sit at their slot's index; tree nodes at root + depth
    for b, parents in trees:
        root = qsl[b] + num_causal[b] - 1
        positions[root : qsl[b + 1]] = context_lens[b] + num_causal[b] - 1 + np.asarray(tree_depths(parents))
        masks[root : qsl[b + 1]] = ancestor_masks(parents)
    return TokenLayout(qsl, seq, node, positions, logical, masks)
