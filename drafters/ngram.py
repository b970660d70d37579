"""Prompt-lookup (n-gram) drafting: continue the text the way it continued after the same suffix before.

vLLM's meaning of prompt_lookup_min/max: try suffixes of length max down to min; the first that occurred
earlier in prompt + output wins, and the tokens after its most recent occurrence are the draft. Example with
tokens [a b c d a b] and max 2: suffix [a b] occurred at 0, so the draft is [c d a ...] (up to k tokens).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

from specserve.config import SpeculativeConfig
from specserve.drafters.base import DraftProposal


class NgramIndex:
    """Latest start of every n-gram (min_n <= n <= max_n) of a growing token list, indexed as tokens arrive.

    A lookup costs O(max_n) plus the new tokens' windows: rescanning the whole sequence per step (numpy
    windows) cost ~0.1 ms a request, which at batch 128 was more host time than the step's forward.
    """

    def __init__(self, min_n: int, max_n: int):
        self.min_n, self.max_n = min_n, max_n
        self.latest: dict[tuple[int, ...], int] = {}  # n-gram -> its latest start (keys of each n differ in length)
        self.indexed_end = 0  # windows ending (exclusive) at or before this are indexed

    def lookup(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest matching suffix."""
        total = len(tokens)
        for end in range(self.indexed_end + 1, total):  # windows that end before the last token
            for n in range(self.min_n, min(self.max_n, end) + 1):
                self.latest[tuple(tokens[end - n : end])] = end - n
        self.indexed_end = max(self.indexed_end, total - 1)
        for n in range(min(self.max_n, total - 1), self.min_n - 1, -1):
            start = self.latest.get(tuple(tokens[total - n :]))
            if start is not None:
                return tokens[start + n : start + n + k]
        return []


class NgramDrafter:
    """Deterministic chain drafter (q is one-hot), no model and no KV."""

    num_kv_layers = 0

    def __init__(self, spec: SpeculativeConfig, target=None):
        self.max_num_tokens = spec.num_speculative_tokens
        self.min_n, self.max_n = spec.prompt_lookup_min, spec.prompt_lookup_max
        self._index: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Request -> NgramIndex

    def propose(self, requests: Sequence, max_tokens: Sequence[int]) -> list[DraftProposal | None]:
        out: list[DraftProposal | None] = []
        for req, k in zip(requests, max_tokens, strict=True):
            index = self._index.get(req)
            if index is None:
                index = self._index[req] = NgramIndex(self.min_n, self.max_n)
            draft = index.lookup(req.token_ids, k) if k > 0 else []
            out.append(DraftProposal.chain(draft) if draft else None)
        return out

    def observe(self, requests, results, out) -> None:
        """Token lists only grow (rejected drafts are never appended): the index catches up at the next lookup."""
