"""The drafter interface: propose a chain or tree per request, then follow what the target accepted."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from specserve.sampler import HostCopy

if TYPE_CHECKING:
    from specserve.model_runner import ForwardOutput
    from specserve.request import Request
    from specserve.verify import VerifyResult


@dataclass
class DraftProposal:
    """Draft nodes 1..m of one request's verify tree; node 0 (the root) is its last committed token.

    `parents[j]` (0..j) is the parent of node j + 1, so a chain is [0, 1, 2, ...]. `draft_probs[j]` is the
    distribution node j + 1 was drawn from, or None for deterministic drafters (q is then one-hot). A tree made
    on the device (`on_device`, row `row` of it) has placeholder tokens and parents until `resolve()`.
    """

    tokens: list[int]
    parents: list[int]
    draft_probs: torch.Tensor | None = None  # [m, vocab_size] float32
    on_device: DeviceDrafts | None = None
    row: int = 0

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.parents):
            raise ValueError("a DraftProposal needs one parent per token")

    @classmethod
    def chain(cls, tokens: list[int], draft_probs: torch.Tensor | None = None) -> DraftProposal:
        return cls(list(tokens), list(range(len(tokens))), draft_probs)

    @property
    def is_chain(self) -> bool:
        return all(p == j for j, p in enumerate(self.parents))

    def resolve(self) -> None:
        """Read the tokens and parents of a tree made on the device (waits for their copy)."""
        if self.on_device is not None:
            self.tokens, self.parents = self.on_device.read(self.row, len(self.tokens))
            self.on_device = None


class DeviceDrafts:
    """Draft trees of one propose() call made on the device: the host knows their sizes, so the verify forward
    is prepared and queued behind them without a sync; their tokens and parents reach the host in one copy,
    started here and read when the step verifies."""

    def __init__(self, nodes: torch.Tensor):
        self.nodes = nodes  # [4, B, N] int64: per node its token, parent node, rope position, ancestor mask
        self._copy = HostCopy(nodes[:2])
        self._host: list | None = None

    def proposal(self, row: int, size: int) -> DraftProposal:
        """The first `size` nodes of row `row`; until resolved, its tokens and parents are a chain of zeros."""
        return DraftProposal([0] * size, list(range(size)), on_device=self, row=row)

    def read(self, row: int, size: int) -> tuple[list[int], list[int]]:
        if self._host is None:
            self._host = self._copy.tolist()
        tokens, parents = self._host
        return tokens[row][:size], parents[row][:size]


@dataclass
class DraftMemory:
    """What a drafter allocates beside the target's KV pool, in bytes: per pool block, and fixed (scratch blocks).

    slot_tables: the SlotFeatures it reads, key -> row width; arms asking for one key share its table.
    """

    per_block: int = 0
    fixed: int = 0
    slot_tables: dict[tuple, int] = field(default_factory=dict)


class Drafter(Protocol):
    """Proposes drafts for a batch; learned drafters keep their state in step through `observe`."""

    #: largest number of draft nodes this drafter proposes per request per step
    max_num_tokens: int
    #: extra KV layers it needs in the shared block pool (draft model / EAGLE layers), 0 for n-gram
    num_kv_layers: int

    def propose(self, requests: Sequence[Request], max_tokens: Sequence[int]) -> list[DraftProposal | None]:
        """At most max_tokens[i] nodes for requests[i] (0: propose nothing)."""
        ...

    def observe(
        self, requests: Sequence[Request], results: Sequence[VerifyResult | None], out: ForwardOutput
    ) -> None:
        """Called after every step with each request's verify result (None while still prefilling)."""
        ...
