"""Triton backend: every kernel of reference.py (attention, KV writes, the layer's fused small ops), same semantics.

Without CUDA the kernels run in Triton's CPU interpreter (slow: tests and debugging only).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernel modules below define their kernels

from specserve.attention import AttentionMetadata  # noqa: E402
from specserve.kernels import num_sms, reference  # noqa: E402

from .fused_ops import rms_norm, rope_write_kv, silu_and_mul  # noqa: E402
from .kv_ops import copy_slots, write_kv  # noqa: E402
from .skinny_linear import MAX_ROWS, config_for, fits_qkv_rope, skinny_linear, skinny_qkv_rope  # noqa: E402
from .tree_attention import tree_attention  # noqa: E402

__all__ = ["copy_slots", "gated_linear", "linear", "paged_attention", "qkv_rope_write_kv", "rms_norm", "rope_write_kv",
           "silu_and_mul", "write_kv"]


def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_q_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attention of every query token over its sequence's cached keys and tree ancestors (K/V written)."""
    return tree_attention(q, k_cache, v_cache, meta, scale)


def _few_rows(x: torch.Tensor) -> int:
    """x's row count where the few-row Triton matmul takes it (decode/verify shapes on CUDA), else 0."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    ok = x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and rows <= MAX_ROWS and x.is_contiguous()
    return rows if ok else 0


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """[..., K] @ weight[N, K].T + bias: the few-row Triton matmul for decode/verify shapes, cuBLAS otherwise."""
    if rows := _few_rows(x):
        return skinny_linear(x.reshape(rows, -1), weight, bias).unflatten(0, x.shape[:-1])
    return F.linear(x, weight, bias)


def gated_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """silu_and_mul(linear(x)) for weight rows [gate; up]; one launch for decode/verify shapes."""
    if rows := _few_rows(x):
        return skinny_linear(x.reshape(rows, -1), weight, bias, gated=True).unflatten(0, x.shape[:-1])
    return silu_and_mul(F.linear(x, weight, bias))


def qkv_rope_write_kv(
    x: torch.Tensor,  # [T, K]
    weight: torch.Tensor,  # [(num_q_heads + 2 num_kv_heads) head_dim, K]: rows [q; k; v]
    bias: torch.Tensor | None,
    num_q_heads: int,
    positions: torch.Tensor,  # [T] int64
    cos: torch.Tensor,  # [max_positions, head_dim // 2] fp32
    sin: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int64
) -> torch.Tensor:
    """rope_write_kv of the q/k/v projection: rotated q [T, num_q_heads, head_dim]; one launch for decode/verify
    shapes (the same bits as the two launches)."""
    rows = _few_rows(x)
    if rows and x.dim() == 2 and fits_qkv_rope(rows, k_cache.shape[3], config_for(*weight.shape, num_sms(x.device))):
        return skinny_qkv_rope(x, weight, bias, num_q_heads, positions, cos, sin, k_cache, v_cache, slot_mapping)
    return reference.qkv_rope_write_kv(x, weight, bias, num_q_heads, positions, cos, sin, k_cache, v_cache,
                                       slot_mapping, linear_op=linear, rope_op=rope_write_kv)
