"""Draft trees as data: static trees from paths of top-k ranks (Medusa) and dynamic top-k trees (EAGLE-2).

Both follow DraftProposal's convention: node 0 is the root (the last committed token), draft node j + 1 has
parent parents[j] <= j, so nodes come in topological order and a prefix of the nodes is again a tree.

A static tree is a list of paths of ranks, as Medusa writes its `mc_sim_*` choices. Path (0, 1) is the
second-best token of head 1 under the best token of head 0. Example: paths [(0,), (1,), (0, 0)] give
    nodes  root, (0,), (1,), (0, 0)      parents [0, 0, 1]      depths [1, 1, 2]      ranks [0, 1, 0]

EAGLE-2's dynamic tree grows top_k children under each of the top_k best nodes per level (by cumulative
draft log-probability), then keeps the `budget` best of every candidate it has scored. A child never
scores above its parent, so the kept set contains each kept node's parent (ties go to the earlier node).
"""

from __future__ import annotations

import functools
import heapq
from dataclasses import dataclass

import numpy as np
import torch

# Rough top-r accuracy of a draft head (Medusa paper, fig. 3): rank r is right about 0.6 / (r + 1)^2 of the
# time. default_tree keeps the paths whose product of these (or of a checkpoint's measured table) is largest,
# the way mc_sim trees are made.
TOP1_ACCURACY = 0.6


@dataclass(frozen=True)
class StaticTree:
    """A fixed tree of top-k ranks; node j + 1 is paths[j] (sorted by depth, then ranks, or best first)."""

    paths: tuple[tuple[int, ...], ...]
    parents: tuple[int, ...]

    @property
    def num_nodes(self) -> int:
        return len(self.paths)

    @property
    def depth(self) -> int:
        return max(len(p) for p in self.paths)

    @property
    def top_k(self) -> int:
        """Candidates each level needs: the largest rank used, plus one."""
        return 1 + max(r for p in self.paths for r in p)

    def prefix(self, num_nodes: int) -> StaticTree:
        """The first num_nodes nodes: still a tree, since parents come first."""
        return StaticTree(self.paths[:num_nodes], self.parents[:num_nodes])

    def tokens(self, ranked: list[list[int]]) -> list[int]:
        """Node tokens from ranked[d][r], the rank-r candidate of level d + 1 (Medusa: head d's top-k)."""
        return [ranked[len(p) - 1][p[-1]] for p in self.paths]


def static_tree(paths: list[list[int]] | list[tuple[int, ...]], keep_order: bool = False) -> StaticTree:
    """Validate Medusa-style paths (non-empty, ranks >= 0, each parent path present) and order them.

    keep_order: keep the given order (best first, as a checkpoint's stored choices are), which must put each
    path after its parent path, so that every prefix of the nodes is the tree of that size; else sort the paths.
    """
    if not paths:
        raise ValueError("a draft tree needs at least one path")
    seen: dict[tuple[int, ...], None] = {}  # an ordered set
    for p in paths:
        path = tuple(p)
        if not path or any(not isinstance(r, int) or r < 0 for r in path):
            raise ValueError(f"tree path {list(p)!r} must be a non-empty list of ranks >= 0")
        if path in seen:
            raise ValueError(f"tree path {list(p)!r} appears twice")
        seen[path] = None
    ordered = list(seen) if keep_order else sorted(seen, key=lambda p: (len(p), p))
    index: dict[tuple[int, ...], int] = {}  # path -> node number, of the paths so far
    parents = []
    for p in ordered:
        if len(p) > 1 and p[:-1] not in index:
            how = "comes before its" if p[:-1] in seen else "has no"
            raise ValueError(f"tree path {list(p)!r} {how} parent path {list(p[:-1])!r}")
        parents.append(index[p[:-1]] if len(p) > 1 else 0)
        index[p] = len(index) + 1
    return StaticTree(tuple(ordered), tuple(parents))


def choices_tree(choices: list[list[int]], num_nodes: int) -> StaticTree:
    """The first num_nodes of stored Medusa choices: paths best first, each after its parent path (so that the
    first n are the best n-node tree), as benchmarks/medusa_accuracy.py writes them into a checkpoint."""
    tree = static_tree(choices, keep_order=True)
    if num_nodes > tree.num_nodes:
        raise ValueError(f"{tree.num_nodes} paths cannot make a {num_nodes}-node tree")
    return tree.prefix(num_nodes)


def default_tree(num_nodes: int, max_depth: int, accuracy: list[list[float]] | None = None) -> StaticTree:
    """The num_nodes paths of highest estimated acceptance (product of per-rank accuracies), depth <= max_depth.

    accuracy[d][r]: how often head d's rank-r token is right (a checkpoint's measured table, made non-increasing
    in r); None: the prior TOP1_ACCURACY / (r + 1)^2 for every head. Best-first: popping a path pushes its first
    child and its next sibling, both scoring no higher, so paths leave the heap in score order. num_nodes 4,
    max_depth 3, no table -> (0,), (0, 0), (0, 0, 0), (1,).
    """
    if num_nodes < 1 or max_depth < 1:
        raise ValueError("default_tree needs num_nodes >= 1 and max_depth >= 1")
    table = None
    if accuracy is not None:
        if len(accuracy) < max_depth or not all(accuracy[:max_depth]):
            raise ValueError(f"a rank-accuracy table needs a non-empty row for each of {max_depth} heads")
        table = [np.minimum.accumulate(np.asarray(row, dtype=float)).tolist() for row in accuracy]

    def acc(depth: int, rank: int) -> float:
        if table is None:
            return TOP1_ACCURACY / (rank + 1) ** 2
        return table[depth][rank] if rank < len(table[depth]) else 0.0

    heap = [(-acc(0, 0), (0,))]
    chosen: list[tuple[int, ...]] = []
    while heap and len(chosen) < num_nodes:
        neg, path = heapq.heappop(heap)
        chosen.append(path)
        score, d, r = -neg, len(path) - 1, path[-1]
        if d + 1 < max_depth:
            heapq.heappush(heap, (-score * acc(d + 1, 0), path + (0,)))
        if acc(d, r) > 0:
            heapq.heappush(heap, (-score / acc(d, r) * acc(d, r + 1), path[:-1] + (r + 1,)))
    return static_tree(chosen)


def expand_level(
    frontier_scores: torch.Tensor,  # [B, F] cumulative log-prob of each frontier node
    child_logp: torch.Tensor,  # [B, F, k] log-probs of each frontier node's top-k children
    top_k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """EAGLE-2 level step: (candidate scores [B, F * k], indices [B, top_k] of the next frontier among them)."""
    scores = (frontier_scores[:, :, None] + child_logp).flatten(1)  # [B, F * k]
    return scores, scores.topk(top_k, dim=-1).indices


def select_tree(
    scores: torch.Tensor,  # [B, C] cumulative log-prob of each candidate
    parents: torch.Tensor,  # [B, C] int64 parent candidate of each candidate, -1: the root
    budgets: torch.Tensor,  # [B] int64 nodes to keep per row, at most num_nodes
    num_nodes: int,  # at most C
    depth: int,  # the deepest candidate's depth
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EAGLE-2's rerank on the device: the budgets[i] best candidates of row i as a draft tree, without a sync.

    Returns (candidate [B, N], parent node [B, N], ancestor mask [B, N]) of nodes 1..N in topological order; a row's
    entries past its budget are padding. Ties go to the earlier candidate (a stable sort), and a child never scores
    above its parent, so every kept node's parent is kept too.
    """
    b, c = scores.shape
    order = torch.sort(-scores, dim=1, stable=True).indices[:, :num_nodes]  # [B, N] best first
    ranks = torch.arange(num_nodes, device=scores.device)
    kept = torch.where(ranks < budgets[:, None], order, c).sort(dim=1).values  # [B, N] candidate order, padding last
    node_of = torch.zeros(b, c + 1, dtype=torch.int64, device=scores.device)  # [B, C + 1] node of each candidate
    node_of.scatter_(1, kept, (ranks + 1).expand(b, -1))  # padding lands in column c
    cand = kept.clamp(max=c - 1)
    parent_cand = parents.gather(1, cand)  # [B, N]
    parent_node = torch.where(parent_cand >= 0, node_of.gather(1, parent_cand.clamp(min=0)), 0)
    own = node_bits(num_nodes + 1, scores.device)  # [N + 1] bit of node j
    masks = own.expand(b, -1).clone()  # [B, N + 1]: each pass completes one more level of ancestors
    for _ in range(depth):
        masks[:, 1:] = own[1:] | masks.gather(1, parent_node)
    return cand, parent_node, masks[:, 1:]


@functools.lru_cache(maxsize=8)
def node_bits(n: int, device: torch.device) -> torch.Tensor:
    """[n] int64: bit j of node j, as the signed values of ancestor masks."""
    return torch.tensor([1 << j if j < 63 else -(1 << 63) for j in range(n)], device=device)
