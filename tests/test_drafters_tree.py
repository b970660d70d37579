"""Pure drafter utilities: static and dynamic trees, catch-up chunking, step rows, draft-KV validity."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from specserve.attention import ancestor_masks
from specserve.drafters.draft_kv import DraftKVCache, DraftQuery, plan_chunks
from specserve.drafters.tree import choices_tree, default_tree, expand_level, select_tree, static_tree

MC_SIM_PREFIX = [(0,), (0, 0), (1,), (0, 1), (2,), (0, 0, 0), (1, 0), (0, 2)]  # Medusa's mc_sim_7b_63 start


def test_static_tree_orders_paths_and_derives_parents():
    tree = static_tree(MC_SIM_PREFIX)
    assert tree.paths == ((0,), (1,), (2,), (0, 0), (0, 1), (0, 2), (1, 0), (0, 0, 0))
    assert tree.parents == (0, 0, 0, 1, 1, 1, 2, 4)
    assert (tree.num_nodes, tree.depth, tree.top_k) == (8, 3, 3)
    ranked = [[10, 11, 12], [20, 21, 22], [30, 31, 32]]  # level d's rank-r token is 10 (d + 1) + r
    assert tree.tokens(ranked) == [10, 11, 12, 20, 21, 22, 20, 30]
    assert tree.prefix(4).parents == (0, 0, 0, 1)


@pytest.mark.parametrize(
    "paths, message",
    [([], "at least one path"), ([(0,), (0, 0), (0, 0)], "appears twice"), ([(0, 1)], "no parent path"),
     ([(0,), (-1,)], "ranks >= 0"), ([()], "non-empty")],
)
def test_static_tree_rejects_bad_paths(paths, message):
    with pytest.raises(ValueError, match=message):
        static_tree(paths)


def test_choices_tree_keeps_the_stored_order():
    """Stored choices are best first: the first n are the n-node tree, in that order, parents before children."""
    choices = [[0], [0, 0], [1], [0, 1], [0, 0, 0], [2]]
    tree = choices_tree(choices, 6)
    assert tree.paths == ((0,), (0, 0), (1,), (0, 1), (0, 0, 0), (2,))
    assert tree.parents == (0, 1, 0, 1, 2, 0)
    assert choices_tree(choices, 4) == tree.prefix(4)
    assert choices_tree(choices, 4).paths == ((0,), (0, 0), (1,), (0, 1)) and tree.prefix(4).parents == (0, 1, 0, 1)
    assert tree.tokens([[10, 11, 12], [20, 21], [30]]) == [10, 20, 11, 21, 30, 12]


@pytest.mark.parametrize(
    "choices, num_nodes, message",
    [([[0], [0, 0, 0], [0, 0]], 1, r"tree path \[0, 0, 0\] comes before its parent path \[0, 0\]"),  # all checked
     ([[0], [1, 0]], 1, r"tree path \[1, 0\] has no parent path \[1\]"),
     ([[0], [0]], 1, "appears twice"),
     ([[0], [1]], 3, "2 paths cannot make a 3-node tree")],
)
def test_choices_tree_rejects_bad_choices(choices, num_nodes, message):
    with pytest.raises(ValueError, match=message):
        choices_tree(choices, num_nodes)


def test_default_tree_is_best_first():
    assert default_tree(4, 3).paths == ((0,), (1,), (0, 0), (0, 0, 0))
    assert default_tree(3, 1).paths == ((0,), (1,), (2,))
    tree = default_tree(20, 4)
    assert tree.num_nodes == 20 and tree.depth <= 4
    assert all(p[:-1] in tree.paths or len(p) == 1 for p in tree.paths)


def test_default_tree_from_measured_accuracy():
    """A checkpoint's rank-accuracy table shapes the tree: weak deeper heads make it wide and shallow."""
    weak = [[0.4, 0.2, 0.1, 0.05], [0.1, 0.05], [0.05]]  # head 1 rank 4 and beyond: never right
    # scores: (0,) .4, (1,) .2, (2,) .1, (3,) .05, (0, 0) .04, (1, 0) .02, (0, 1) .02, (0, 0, 0) .002
    assert default_tree(7, 3, weak).paths == ((0,), (1,), (2,), (3,), (0, 0), (0, 1), (1, 0))
    assert default_tree(9, 3, weak).depth == 2  # (1, 1) and (2, 0) at .01 come before (0, 0, 0) at .002
    assert default_tree(7, 3).depth == 3  # the prior goes deep
    # a rise in the measured table is flattened (ranks are taken as non-increasing): rank 2 scores as rank 1
    assert default_tree(3, 1, [[0.5, 0.1, 0.3]]).paths == ((0,), (1,), (2,))
    with pytest.raises(ValueError, match="a non-empty row for each of 3 heads"):
        default_tree(4, 3, [[0.5], [0.2]])


def test_expand_level_keeps_best_cumulative_children():
    front = torch.tensor([[-0.1, -2.0]])  # [B=1, F=2]
    child = torch.tensor([[[-0.5, -3.0], [-0.2, -0.3]]])  # [1, F, k=2]
    scores, nxt = expand_level(front, child, 2)
    assert torch.allclose(scores, torch.tensor([[-0.6, -3.1, -2.2, -2.3]]))
    assert nxt.tolist() == [[0, 2]]


def test_select_tree_keeps_a_tree_per_budget_and_breaks_ties_to_parents():
    # candidates: 0, 1 under the root; 2, 3 under 0; 4 under 2. Rows share them, with budgets 3 and 4.
    scores = torch.tensor([[-0.5, -1.0, -0.5, -2.0, -0.7]] * 2, dtype=torch.float64)
    parents = torch.tensor([[-1, -1, 0, 0, 2]] * 2)
    cand, parent_node, masks = select_tree(scores, parents, torch.tensor([3, 4]), 4, depth=3)
    assert cand[0, :3].tolist() == [0, 2, 4] and parent_node[0, :3].tolist() == [0, 1, 2]
    assert masks[0, :3].tolist() == [0b11, 0b111, 0b1111]
    assert cand[1].tolist() == [0, 1, 2, 4] and parent_node[1].tolist() == [0, 0, 1, 3]
    assert masks[1].tolist() == [0b11, 0b101, 0b1011, 0b11011]


def rerank_reference(scores: list[float], parents: list[int], budget: int) -> tuple[list[int], list[int]]:
    """The budget best candidates (ties: the earlier) in candidate order, and their parent nodes."""
    kept = sorted(sorted(range(len(scores)), key=lambda c: (-scores[c], c))[:budget])
    node = {c: j + 1 for j, c in enumerate(kept)}
    return kept, [node[parents[c]] if parents[c] >= 0 else 0 for c in kept]


def test_select_tree_equals_a_host_rerank_on_random_trees_with_ties():
    gen = torch.Generator().manual_seed(0)
    b, c, n = 16, 60, 48
    parents = torch.full((b, c), -1)
    scores = torch.zeros(b, c, dtype=torch.float64)
    depth = torch.ones(b, c, dtype=torch.int64)
    for j in range(c):
        p = torch.randint(-1, j, (b,), generator=gen) if j >= 4 else torch.full((b,), -1)
        step = -torch.rand(b, generator=gen, dtype=torch.float64).round(decimals=1)  # 0.0 steps: ties with parents
        parents[:, j] = p
        scores[:, j] = torch.where(p >= 0, scores.gather(1, p.clamp(min=0)[:, None])[:, 0], 0.0) + step
        depth[:, j] = torch.where(p >= 0, depth.gather(1, p.clamp(min=0)[:, None])[:, 0] + 1, 1)
    budgets = torch.randint(1, n + 1, (b,), generator=gen)
    cand, parent_node, masks = select_tree(scores, parents, budgets, n, int(depth.max()))
    for i in range(b):
        k = int(budgets[i])
        kept, tree_parents = rerank_reference(scores[i].tolist(), parents[i].tolist(), k)
        assert cand[i, :k].tolist() == kept
        assert parent_node[i, :k].tolist() == tree_parents
        assert masks[i, :k].tolist() == ancestor_masks(tree_parents)[1:]


def test_plan_chunks_splits_spans_across_forwards():
    assert plan_chunks([(0, 5), (3, 4)], 4) == [[(0, 0, 4)], [(0, 4, 5), (1, 3, 4)]]
    assert plan_chunks([(2, 2), (0, 3)], 8) == [[(1, 0, 3)]]


class _Req:
    """Hashable and weak-referenceable, as drafters key their per-request state weakly."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


def _req(tokens, computed, blocks):
    return _Req(token_ids=tokens, num_computed_tokens=computed, block_ids=blocks, request_id="r",
                metrics=SimpleNamespace(num_preemptions=0))


def test_draft_kv_validity_follows_blocks_and_preemption():
    target = SimpleNamespace(block_size=4, num_blocks=8, device=torch.device("cpu"), dtype=torch.float32)
    kv = DraftKVCache(target, 1, 1, 2, num_scratch=2)
    assert kv.layers[0][0].shape[0] == 10
    a = _req(list(range(10)), 9, [3, 5, 6])
    assert kv.num_valid(a) == 0
    kv.set_valid(a, 9)  # blocks 3 and 5 are full of a's entries
    shared = _req(list(range(8)) + [99, 98], 8, [3, 5, 7])
    assert kv.num_valid(shared) == 8  # same tokens in the same blocks: trusted
    other = _req([1] * 10, 8, [3, 5, 7])
    assert kv.num_valid(other) == 0  # another prefix: not trusted
    kv.metadata([DraftQuery([5], 1, 2)])  # a write into block 5 drops what it vouched for
    assert kv.num_valid(_req(list(range(10)), 8, [3, 5, 7])) == 4
    a.metrics.num_preemptions = 1
    a.block_ids = [3, 1]
    assert kv.num_valid(a) == 4  # restarted: only block 3 is still good
    assert kv.block_tables([a], [14]) == [[3, 1, 8, 9]]  # two scratch blocks past the pool
    with pytest.raises(RuntimeError, match="3 scratch blocks"):
        kv.block_tables([a], [18])


def test_draft_metadata_of_a_causal_run_and_a_tree():
    target = SimpleNamespace(block_size=4, num_blocks=8, device=torch.device("cpu"), dtype=torch.float32)
    kv = DraftKVCache(target, 1, 1, 2)
    # a: two causal entries after 3 cached ones; b: a root after 1 cached entry, then nodes under it (0, 0, 1)
    m = kv.metadata([DraftQuery([5, 6], 3, 2), DraftQuery([2, 7], 1, 1, [0, 0, 1])])
    assert m.positions.tolist() == [3, 4, 1, 2, 2, 3]  # tree nodes sit at root + depth
    assert m.slot_mapping.tolist() == [23, 24, 9, 10, 11, 28]  # in sequence order through each table
    assert m.tree_mask.tolist() == [0, 1, 1, 3, 5, 11]  # causal entries 0, roots 0b1, nodes their ancestors
    assert m.seq_lens.tolist() == [5, 5] and m.context_lens.tolist() == [3, 1] and m.tree_offsets.tolist() == [1, 0]
    assert m.block_tables.tolist() == [[5, 6], [2, 7]] and m.query_start_loc.tolist() == [0, 2, 6]


def test_tree_slots_equal_the_metadata_of_the_same_tree_queries():
    target = SimpleNamespace(block_size=4, num_blocks=8, device=torch.device("cpu"), dtype=torch.float32)
    tables, roots, parents = [[5, 6, 1], [2, 7]], [3, 1], [0, 0, 1, 1, 2]  # 6 query nodes: the root and 5 more
    kv, fast = DraftKVCache(target, 1, 1, 2), DraftKVCache(target, 1, 1, 2)
    for cache in (kv, fast):
        cache._block_hash.update({b: b for b in range(8)})  # every block vouched for
    m = kv.metadata([DraftQuery(t, r, 1, parents) for t, r in zip(tables, roots, strict=True)])
    slots, padded = fast.tree_slots(tables, roots, 1 + len(parents))
    assert slots.tolist() == m.slot_mapping.reshape(2, 6).tolist()
    assert padded.tolist() == m.block_tables.tolist() == [[5, 6, 1], [2, 7, 0]]
    assert fast._block_hash == kv._block_hash == {0: 0, 3: 3, 4: 4}  # blocks 1, 2, 5, 6, 7 are written

