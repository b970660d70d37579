"""EAGLE-2 tree growth on the device: every level's forward, top-k and frontier choice in one CUDA graph.

Growing a tree level by level from the host cost an EAGLE step ~5 ms of host time at batch 1 on an H200 (a
plain target step: 1.3 ms): per level a metadata upload, a graph launch, a vocabulary top-k and a sync to learn
the frontier. Only the frontier's choice depends on the data, and only through the tree masks, the tokens and
the inputs of the next level, all of which the device can compute. So the host uploads, once per step, what does
not depend on it (each node's position and slot: a level's frontier sits at depth l, in query slots that follow
the root), and one replay per batch bucket runs every level and the final rerank (tree.select_tree). The trees
stay on the device: the verify forward is queued behind them, and their tokens come back with no sync of their own.

Layout of a tree of top_k k and depth d, per sequence: query node 0 is the root, nodes 1 + (l - 1) k .. l k are
level l's frontier (l = 1 .. d - 1), so level l's forward is the first 1 + l k nodes, as the host-grown tree had
it. Candidates: the root's k children, then k children under each of level l's k frontier nodes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch

from specserve.attention import AttentionMetadata, tree_depths
from specserve.cuda_graphs import BatchGraphs, StaticRows, batch_buckets
from specserve.drafters.draft_runner import DraftRunner
from specserve.drafters.tree import expand_level, node_bits, select_tree

# forward(input_ids [T], positions [T], meta, hidden [T, H]) -> [T, H]; top_k(hidden [N, H], k) -> ([N, k], [N, k])
HeadForward = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor], torch.Tensor]
TopK = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


class GrownTrees(NamedTuple):
    """Every scored candidate of b trees and the trees kept from them, all on the device."""

    scores: torch.Tensor  # [b, C] float64 cumulative draft log-probs
    tokens: torch.Tensor  # [b, C] int64
    parents: torch.Tensor  # [b, C] int64 parent candidate, -1: the root
    nodes: torch.Tensor  # [4, b, N] int64 of the kept nodes: token, parent node, rope position, ancestor mask


class TreeGrower:
    """Grows EAGLE-2 trees for a batch of roots; the same candidates eager or replayed (graphs need CUDA)."""

    def __init__(self, forward: HeadForward, top_k_fn: TopK, runner: DraftRunner, target, top_k: int, depth: int,
                 max_kept: int):
        self._forward, self._top_k = forward, top_k_fn
        self.kv, self.k, self.depth = runner.kv, top_k, depth
        self.num_nodes = 1 + top_k * (depth - 1)  # query nodes of the last level, root included
        self.num_cands = top_k + (depth - 1) * top_k * top_k
        self.max_kept = min(max_kept, self.num_cands)  # draft nodes a tree keeps at most
        # node j + 1 of the last level sits one level below the first node of the level above (depths only:
        # the real parents are chosen on the device)
        parents = [0] * top_k + [1 + (j // top_k - 1) * top_k for j in range(top_k, self.num_nodes - 1)]
        self._depths = np.asarray(tree_depths(parents), np.int64)  # [n] query node depths, the root's 0
        self.max_seq_len = runner.max_seq_len
        max_seqs, n, dev, dtype = target.max_num_seqs, self.num_nodes, self.kv.device, self.kv.dtype
        # per sequence: positions [n] | slots [n] | root position | root token | nodes to keep | block table
        self._inputs = StaticRows(max_seqs, 2 * n + 3 + runner.width, dev)
        levels = [1] * top_k + [2 + (j - top_k) // (top_k * top_k) for j in range(top_k, self.num_cands)]
        self._levels = torch.tensor(levels, device=dev)  # [C] depth of each candidate below the root
        hidden = target.model.config.hidden_size
        self._root_in = torch.zeros(max_seqs, hidden, device=dev, dtype=dtype)  # [B, H] the root entry's input
        self._g_root = torch.zeros(max_seqs, hidden, device=dev, dtype=dtype)  # [B, H] the root's draft output
        self._masks = torch.zeros(max_seqs, n, device=dev, dtype=torch.int64)  # [B, n] ancestor bits per node
        self._bits = node_bits(n, dev)  # [n] own bit
        self._inputs.host[:, n : 2 * n] = -1  # padding until filled: no K/V writes, root position 0, block 0
        self._inputs.upload(max_seqs)
        keys = [(b,) for b in batch_buckets(max_seqs)] if target.cuda_graphs else []
        self.graphs = BatchGraphs(self._grow_static, keys, target.captures_graphs)

    def grow(self, reqs: Sequence, roots: Sequence[int], root_in: torch.Tensor, g_root: torch.Tensor,
             budgets: Sequence[int]) -> GrownTrees:
        """b trees, request i's under root position roots[i], each keeping its budgets[i] best candidates (at most
        max_kept); no sync. The tensors are static: read them before the next grow."""
        b, n = len(reqs), self.num_nodes
        slots, tables = self.kv.tree_slots(self.kv.block_tables(reqs, [r + n for r in roots]), roots, n)
        cap = self.graphs.padded(b)
        h = self._inputs.host[:cap].numpy()
        h[:] = 0
        h[:b, :n], h[:b, n : 2 * n] = np.asarray(roots)[:, None] + self._depths, slots
        h[b:, n : 2 * n] = -1  # padding sequences write no K/V
        h[:b, 2 * n] = roots
        h[:b, 2 * n + 1] = [r.token_ids[p] for r, p in zip(reqs, roots, strict=True)]
        h[:b, 2 * n + 2] = budgets
        h[:b, 2 * n + 3 : 2 * n + 3 + tables.shape[1]] = tables
        self._inputs.upload(cap)
        self._root_in[:b].copy_(root_in)
        self._g_root[:b].copy_(g_root)
        out = self.graphs.run(cap)
        return GrownTrees(out.scores[:b], out.tokens[:b], out.parents[:b], out.nodes[:, :b])

    def _grow_static(self, b: int) -> GrownTrees:
        """Every level of b trees from the static inputs, then the kept nodes of each."""
        k, n = self.k, self.num_nodes
        inp = self._inputs.device[:b]
        pos, slots = inp[:, :n], inp[:, n : 2 * n]  # [b, n]
        ctx = inp[:, 2 * n].to(torch.int32)  # [b] root positions: the draft KV before the root
        tables = inp[:, 2 * n + 3 :].to(torch.int32)  # [b, width]
        g_root = self._g_root[:b]
        masks = self._masks[:b]
        masks.zero_()
        masks[:, 0] = 1
        logp, tok = self._top_k(g_root, k)  # [b, k]: the first level, under the root
        scores, tokens = [logp.double()], [tok]
        parents = [torch.full_like(tok, -1)]
        front_scores, front_tok = logp, tok
        front_cand = torch.arange(k, device=tok.device).expand(b, k)  # [b, k] candidate id of each frontier node
        parent_out = g_root[:, None].expand(b, k, -1)  # [b, k, H] draft output of each frontier node's parent
        parent_mask = masks[:, :1].expand(b, k)  # [b, k] ancestor bits of each frontier node's parent
        inputs, ids = self._root_in[:b, None], inp[:, 2 * n + 1 : 2 * n + 2]  # [b, 1 + e, H], [b, 1 + e]
        zeros = torch.zeros(b, dtype=torch.int32, device=tok.device)
        for level in range(1, self.depth):
            e0, e = 1 + (level - 1) * k, 1 + level * k  # this level's frontier nodes are query nodes e0 .. e - 1
            masks[:, e0:e] = parent_mask | self._bits[e0:e]
            inputs, ids = torch.cat((inputs, parent_out), dim=1), torch.cat((ids, front_tok), dim=1)
            meta = AttentionMetadata(
                query_start_loc=torch.arange(0, (b + 1) * e, e, dtype=torch.int32, device=tok.device),
                seq_lens=ctx + e, context_lens=ctx, block_tables=tables, slot_mapping=slots[:, :e].flatten(),
                tree_offsets=zeros, tree_mask=masks[:, :e].flatten(), max_query_len=e,
                max_seq_len=self.max_seq_len, block_size=self.kv.block_size,
            )
            outs = self._forward(ids.flatten(), pos[:, :e].flatten(), meta, inputs.flatten(0, 1))  # [b * e, H]
            front_out = outs.view(b, e, -1)[:, e0:]  # [b, k, H]
            child_logp, child_tok = self._top_k(front_out.flatten(0, 1), k)  # [b * k, k]
            level_scores, nxt = expand_level(front_scores, child_logp.view(b, k, k), k)  # [b, k * k], [b, k]
            child_tok = child_tok.view(b, k * k)
            scores.append(level_scores.double())
            tokens.append(child_tok)
            parents.append(front_cand.repeat_interleave(k, dim=1))  # k children per frontier node
            front_cand = k + (level - 1) * k * k + nxt
            front_scores, front_tok = level_scores.gather(1, nxt), child_tok.gather(1, nxt)
            parent_out = front_out.gather(1, (nxt // k)[:, :, None].expand(-1, -1, front_out.shape[-1]))
            parent_mask = masks[:, e0:e].gather(1, nxt // k)
        grown = [torch.cat(x, dim=1) for x in (scores, tokens, parents)]  # each [b, C]
        cand, parent_node, kept_masks = select_tree(grown[0], grown[2], inp[:, 2 * n + 2], self.max_kept, self.depth)
        positions = inp[:, 2 * n : 2 * n + 1] + self._levels[cand]  # [b, N] root position + depth
        nodes = torch.stack((grown[1].gather(1, cand), parent_node, positions, kept_masks))  # [4, b, N]
        return GrownTrees(*grown, nodes)

