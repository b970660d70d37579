"""Triton backend: every kernel of reference.py (attention, KV writes, the layer's fused small ops), same semantics.

Without CUDA the kernels run in Triton's CPU interpreter (slow: tests and debugging only).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernel modules below define their kernels

from specserve.attention import AttentionMetadata  # noqa: E402

from .fused_ops import rms_norm, rope_write_kv, silu_and_mul  # noqa: E402
from .kv_ops import copy_slots, write_kv  # noqa: E402
from .tree_attention import tree_attention  # noqa: E402

__all__ = ["copy_slots", "paged_attention", "rms_norm", "rope_write_kv", "silu_and_mul", "write_kv"]


def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_q_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attention of every query token over its sequence's cached keys and tree ancestors (K/V written)."""
    return tree_attention(q, k_cache, v_cache, meta, scale)
