"""Prompt-lookup (n-gram) drafting: continue the text the way it continued after the same suffix before.

vLLM's meaning of prompt_lookup_min/max: try suffixes of length max down to min; the first that occurred
earlier in prompt + output wins, and the tokens after its most recent occurrence are the draft. Example with
tokens [a b c d a b] and max 2: suffix [a b] occurred at 0, so the draft is [c d a ...] (up to k tokens).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from specserve.config import SpeculativeConfig
from specserve.drafters.base import DraftProposal


def ngram_lookup(tokens: np.ndarray, min_n: int, max_n: int, k: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the longest matching suffix."""
    total = len(tokens)
    for n in range(min(max_n, total - 1), min_n - 1, -1):
        suffix = tokens[total - n :]
        windows = sliding_window_view(tokens[: total - 1], n)  # window i = tokens[i : i + n]
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return tokens[start : start + k].tolist()
    return []


class NgramDrafter:
    """Deterministic chain drafter (q is one-hot), no model and no KV."""

    num_kv_layers = 0

    def __init__(self, spec: SpeculativeConfig, target=None):
        self.max_num_tokens = spec.num_speculative_tokens
        self.min_n, self.max_n = spec.prompt_lookup_min, spec.prompt_lookup_max

    def propose(self, requests: Sequence, max_tokens: Sequence[int]) -> list[DraftProposal | None]:
        out: list[DraftProposal | None] = []
        for req, k in zip(requests, max_tokens, strict=True):
            draft = ngram_lookup(np.asarray(req.token_ids), self.min_n, self.max_n, k) if k > 0 else []
            out.append(DraftProposal.chain(draft) if draft else None)
        return out

    def observe(self, requests, results, out) -> None:
        """Stateless: the next lookup reads the request's tokens afresh."""
