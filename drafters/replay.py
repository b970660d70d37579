"""Replay drafting, for benchmarks only: propose the target's own greedy continuation, recorded beforehand.

With dummy weights no real drafter gets accepted, so full-size speculative steps could not be timed at a
known acceptance rate. Replay drafts what the target is going to say, except that each drafted token is
corrupted with probability 1 - `acceptance`: a draft position is then accepted with probability
`acceptance` given that the ones before it were. Every number measured with it is a replay number.

The table maps prompt_key(prompt token ids) -> recorded output token ids. It comes from a JSON file named
by SpeculativeConfig.model, or from `set_table` (e.g. `table_from_outputs` of a plain greedy run). Whether
the token at an output position is kept is drawn from a generator seeded by the prompt, so a position
drafts the same token in every run, at any batch size. A request whose output has left the recording
(another numeric path, a stop string) gets no drafts.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from collections.abc import Sequence

import numpy as np

from specserve.config import SpeculativeConfig
from specserve.drafters.base import DraftProposal


def prompt_key(prompt_ids: Sequence[int]) -> str:
    """Stable 16-hex-digit key of a prompt's token ids."""
    return hashlib.blake2b(np.asarray(prompt_ids, dtype=np.int64).tobytes(), digest_size=8).hexdigest()


def table_from_outputs(outputs) -> dict[str, list[int]]:
    """Replay table of finished RequestOutputs (their first sample's tokens)."""
    return {prompt_key(o.prompt_token_ids): list(o.outputs[0].token_ids) for o in outputs}


class ReplayDrafter:
    """Deterministic chain drafter over a recorded continuation (q is one-hot), no model and no KV."""

    num_kv_layers = 0

    def __init__(self, spec: SpeculativeConfig, target):
        self.max_num_tokens = spec.num_speculative_tokens
        self.acceptance = spec.acceptance
        self.vocab_size = target.model.config.vocab_size
        self.table: dict[str, list[int]] = {}
        self._keep: dict[str, np.ndarray] = {}  # prompt key -> [len] bool: position drafts the recorded token
        self._keys: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # request -> its prompt key
        if spec.model:
            with open(spec.model) as f:
                self.set_table(json.load(f))

    def set_table(self, table: dict[str, list[int]]) -> None:
        self.table = {k: list(v) for k, v in table.items()}
        self._keep.clear()

    def _draft(self, req, k: int) -> list[int]:
        key = self._keys.get(req)
        if key is None:
            key = self._keys[req] = prompt_key(req.token_ids[: req.num_prompt_tokens])
        rec = self.table.get(key)
        done = req.num_output_tokens
        if rec is None or req.token_ids[req.num_prompt_tokens :] != rec[:done]:
            return []
        keep = self._keep.get(key)
        if keep is None:
            keep = self._keep[key] = np.random.default_rng(int(key, 16)).random(len(rec)) < self.acceptance
        span = range(done, min(done + k, len(rec)))
        return [rec[p] if keep[p] else (rec[p] + 1) % self.vocab_size for p in span]

    def propose(self, requests: Sequence, max_tokens: Sequence[int]) -> list[DraftProposal | None]:
        out: list[DraftProposal | None] = []
        for req, k in zip(requests, max_tokens, strict=True):
            draft = self._draft(req, k) if k > 0 else []
            out.append(DraftProposal.chain(draft) if draft else None)
        return out

    def observe(self, requests, results, out) -> None:
        """Stateless: the next proposal reads the request's tokens afresh."""
