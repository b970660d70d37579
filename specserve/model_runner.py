"""Turns a scheduled step into flat model inputs, runs the target forward and compacts accepted KV."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from specserve.attention import AttentionMetadata, ancestor_masks, tree_depths
from specserve.drafters.base import DraftProposal
from specserve.scheduler import ScheduledRequest


@dataclass
class StepBatch:
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [num_rows] int64: query tokens whose next-token logits are needed
    row_starts: list[int]  # per sequence: its root's row in the logits, -1 if it produces no token
    query_start_loc: list[int]  # [B + 1] host copy


@dataclass
class ForwardOutput:
    logits: torch.Tensor  # [num_rows, vocab] float32
    hidden_states: torch.Tensor  # [num_tokens, hidden] after the final norm
    prenorm_hidden_states: torch.Tensor  # [num_tokens, hidden] last layer output before the final norm
    aux_hidden_states: list[torch.Tensor]  # each [num_tokens, hidden]: layers in model.aux_layers
    batch: StepBatch


class ModelRunner:
    """Owns the target model and its paged KV pool."""

    def __init__(self, model, num_blocks: int, block_size: int, backend, device: torch.device, dtype: torch.dtype):
        cfg = model.config
        self.model = model
        self.backend = backend
        self.device = device
        self.block_size = block_size
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv_caches = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(cfg.num_layers)
        ]

    def _slots(self, block_ids: list[int], logical: np.ndarray) -> np.ndarray:
        blocks = np.asarray(block_ids, dtype=np.int64)
        return blocks[logical // self.block_size] * self.block_size + logical % self.block_size

    def prepare(self, scheduled: list[ScheduledRequest], proposals: list[DraftProposal | None]) -> StepBatch:
        ids, pos, slots, masks = [], [], [], []
        qsl, seq_lens, ctx_lens, offsets, row_starts, logits_idx = [0], [], [], [], [], []
        num_rows = 0
        for s, prop in zip(scheduled, proposals, strict=True):
            req, n = s.request, s.num_new_tokens
            ctx = req.num_computed_tokens
            parents = prop.parents if prop else []
            q_len = n + len(parents)
            ids.append(np.asarray(req.token_ids[ctx : ctx + n] + (prop.tokens if prop else []), dtype=np.int64))
            depth = np.asarray(tree_depths(parents)[1:], dtype=np.int64)
            pos.append(np.concatenate([np.arange(ctx, ctx + n), ctx + n - 1 + depth]))
            slots.append(self._slots(req.block_ids, np.arange(ctx, ctx + q_len)))
            masks.append(np.asarray([0] * (n - 1) + ancestor_masks(parents), dtype=np.int64))
            if s.produces_token:
                row_starts.append(num_rows)
                logits_idx.append(np.arange(qsl[-1] + n - 1, qsl[-1] + q_len))
                num_rows += q_len - n + 1
            else:
                row_starts.append(-1)
            qsl.append(qsl[-1] + q_len)
            seq_lens.append(ctx + q_len)
            ctx_lens.append(ctx)
            offsets.append(n - 1)
        max_blocks = max(len(s.request.block_ids) for s in scheduled)
        tables = np.zeros((len(scheduled), max_blocks), dtype=np.int32)
        for b, s in enumerate(scheduled):
            tables[b, : len(s.request.block_ids)] = s.request.block_ids

        def dev(x, dtype=torch.int64):
            return torch.from_numpy(np.asarray(x)).to(device=self.device, dtype=dtype, non_blocking=True)

        meta = AttentionMetadata(
            query_start_loc=dev(qsl, torch.int32),
            seq_lens=dev(seq_lens, torch.int32),
            context_lens=dev(ctx_lens, torch.int32),
            block_tables=dev(tables, torch.int32),
            slot_mapping=dev(np.concatenate(slots)),
            tree_offsets=dev(offsets, torch.int32),
            tree_mask=dev(np.concatenate(masks)),
            max_query_len=max(np.diff(qsl)),
            max_seq_len=max(seq_lens),
            block_size=self.block_size,
        )
        return StepBatch(
            input_ids=dev(np.concatenate(ids)),
            positions=dev(np.concatenate(pos)),
            meta=meta,
            logits_indices=dev(np.concatenate(logits_idx) if logits_idx else np.zeros(0)),
            row_starts=row_starts,
            query_start_loc=qsl,
        )

    @torch.inference_mode()
    def forward(self, batch: StepBatch) -> ForwardOutput:
        out = self.model(batch.input_ids, batch.positions, batch.meta, self.kv_caches, self.backend)
        logits = self.model.compute_logits(out.hidden_states[batch.logits_indices])
        return ForwardOutput(logits, out.hidden_states, out.prenorm_hidden_states, out.aux_hidden_states, batch)

    def compact(self, moves: list[tuple[list[int], int, int]]) -> None:
        """Move accepted tree nodes' K/V next to the context: (block_ids, src logical, dst logical) per move."""
        if not moves:
            return
        src = np.concatenate([self._slots(b, np.asarray([s])) for b, s, _ in moves])
        dst = np.concatenate([self._slots(b, np.asarray([d])) for b, _, d in moves])
        caches = [c for kv in self.kv_caches for c in kv]
        self.backend.copy_slots(caches, torch.from_numpy(src).to(self.device), torch.from_numpy(dst).to(self.device))
