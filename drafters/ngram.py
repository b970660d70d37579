"""Prompt-lookup (n-gram) drafting: continue the text the way it continued after the same suffix before.

vLLM's meaning of prompt_lookup_min/max: try suffixes of length max down to min; the first that occurred
earlier in prompt + output wins, and the tokens after its most recent occurrence are the draft. Example with
tokens [a b c d a b] and max 2: suffix [a b] occurred at 0, so the draft is [c d a ...] (up to k tokens).

With prompt_lookup_matches = m > 1 the draft is a tree: the continuations after the m latest occurrences
of that suffix, merged where they agree (a trie), cut to the k nodes that most continuations pass through.
It catches text that continued differently last time: on MT-bench with SmolLM2 tokens per step rose from
1.63 to 1.67-1.73, though there the larger verify cost more than that saved (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

from specserve.config import SpeculativeConfig
from specserve.drafters.base import DraftProposal


class NgramIndex:
    """The starts of every n-gram (min_n <= n <= max_n) of a growing token list, indexed as tokens arrive.

    A lookup costs O(max_n + max_matches) plus the new tokens' windows: rescanning the whole sequence per
    step (numpy windows) cost ~0.1 ms a request, which at batch 128 was more host time than the step's
    forward. Earlier starts form linked lists through `earlier`, flat int lists: a list per n-gram would add
    ~200k objects at batch 128 for every full garbage collection to scan (+20 ms each, measured).
    """

    def __init__(self, min_n: int, max_n: int, max_matches: int = 1):
        self.min_n, self.max_n, self.max_matches = min_n, max_n, max_matches
        self.latest: dict[tuple[int, ...], int] = {}  # n-gram -> its latest start (keys of each n differ in length)
        # [n - min_n][start]: the previous start of the n-gram at start, -1 if none (kept when max_matches > 1)
        self.earlier: list[list[int]] = [[] for _ in range(min_n, max_n + 1)]
        self.indexed_end = 0  # windows ending (exclusive) at or before this are indexed

    def matches(self, tokens: list[int]) -> tuple[int, list[int]]:
        """(n, up to max_matches latest earlier starts, latest first) of the longest suffix that occurred before."""
        total = len(tokens)
        chained = self.max_matches > 1
        for end in range(self.indexed_end + 1, total):  # windows that end before the last token
            for n in range(self.min_n, min(self.max_n, end) + 1):
                key = tuple(tokens[end - n : end])
                if chained:  # windows of one n arrive in start order: this appends entry end - n
                    self.earlier[n - self.min_n].append(self.latest.get(key, -1))
                self.latest[key] = end - n
        self.indexed_end = max(self.indexed_end, total - 1)
        for n in range(min(self.max_n, total - 1), self.min_n - 1, -1):
            start = self.latest.get(tuple(tokens[total - n :]))
            if start is None:
                continue
            starts, earlier = [start], self.earlier[n - self.min_n]
            while len(starts) < self.max_matches and (start := earlier[start]) >= 0:
                starts.append(start)
            return n, starts
        return 0, []

    def lookup(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest matching suffix."""
        n, starts = self.matches(tokens)
        return tokens[starts[0] + n : starts[0] + n + k] if starts else []


def continuation_tree(tokens: list[int], n: int, starts: list[int], k: int) -> DraftProposal | None:
    """The k trie nodes of the continuations after `starts` (latest first) that most continuations share.

    Ties go to the shallower node, then to the later occurrence. A node never outranks its parent (it has
    at most the parent's count and is deeper), so any cut keeps a tree; one start gives the plain chain.
    """
    children: list[dict[int, int]] = [{}]  # trie node -> {token: child}; node 0 is the root
    token, parent, depth, count = [-1], [-1], [0], [0]
    for s in starts:
        node = 0
        for tok in tokens[s + n : s + n + k]:
            child = children[node].get(tok)
            if child is None:
                child = children[node][tok] = len(token)
                children.append({})
                token.append(tok)
                parent.append(node)
                depth.append(depth[node] + 1)
                count.append(0)
            count[child] += 1
            node = child
    kept = sorted(range(1, len(token)), key=lambda i: (-count[i], depth[i], i))[:k]
    if not kept:
        return None
    node_of = {0: 0} | {t: j + 1 for j, t in enumerate(kept)}  # trie node -> draft node
    return DraftProposal([token[t] for t in kept], [node_of[parent[t]] for t in kept])


class NgramDrafter:
    """Deterministic chain or tree drafter (q is one-hot), no model and no KV."""

    num_kv_layers = 0

    def __init__(self, spec: SpeculativeConfig, target=None):
        self.max_num_tokens = spec.num_speculative_tokens
        self.min_n, self.max_n = spec.prompt_lookup_min, spec.prompt_lookup_max
        self.num_matches = spec.prompt_lookup_matches
        self._index: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Request -> NgramIndex

    def propose(self, requests: Sequence, max_tokens: Sequence[int]) -> list[DraftProposal | None]:
        out: list[DraftProposal | None] = []
        for req, k in zip(requests, max_tokens, strict=True):
            index = self._index.get(req)
            if index is None:
                index = self._index[req] = NgramIndex(self.min_n, self.max_n, self.num_matches)
            if k == 0:
                out.append(None)
            elif self.num_matches == 1:  # the plain prompt-lookup chain: no trie to build
                draft = index.lookup(req.token_ids, k)
                out.append(DraftProposal.chain(draft) if draft else None)
            else:
                n, starts = index.matches(req.token_ids)
                out.append(continuation_tree(req.token_ids, n, starts, k) if starts else None)
        return out

    def observe(self, requests, results, out) -> None:
        """Token lists only grow (rejected drafts are never appended): the index catches up at the next lookup."""
