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

from .fused_ops import rms_norm, rope_write_kv, silu_and_mul  # noqa: E402
from .kv_ops import copy_slots, write_kv  # noqa: E402
from .skinny_linear import MAX_ROWS, skinny_linear, skinny_rms_norm_linear, skinny_silu_mul_linear  # noqa: E402
from .tree_attention import tree_attention  # noqa: E402

__all__ = ["copy_slots", "linear", "paged_attention", "rms_norm", "rms_norm_linear", "rope_write_kv", "silu_and_mul",
           "silu_mul_linear", "write_kv"]


def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_q_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attention of every query token over its sequence's cached keys and tree ancestors (K/V written)."""
    return tree_attention(q, k_cache, v_cache, meta, scale)


def _skinny(x: torch.Tensor) -> bool:
    """Few enough rows of a CUDA half-precision input for the skinny matmul (decode and verify steps)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and 0 < rows <= MAX_ROWS and x.is_contiguous()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """[..., K] @ weight[N, K].T + bias: the skinny Triton matmul for decode/verify shapes, cuBLAS otherwise."""
    if _skinny(x):
        return skinny_linear(x.reshape(-1, x.shape[-1]), weight, bias).unflatten(0, x.shape[:-1])
    return F.linear(x, weight, bias)


def silu_mul_linear(gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """silu_and_mul(gate_up) @ weight.T + bias, one kernel for few rows."""
    if _skinny(gate_up):
        y = skinny_silu_mul_linear(gate_up.reshape(-1, gate_up.shape[-1]), weight, bias)
        return y.unflatten(0, gate_up.shape[:-1])
    return F.linear(silu_and_mul(gate_up), weight, bias)


def rms_norm_linear(
    x: torch.Tensor,  # [T, K]
    residual: torch.Tensor | None,  # [T, K]
    norm_weight: torch.Tensor,  # [K]
    eps: float,
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(stream, rms_norm(stream) @ weight.T + bias), stream = x + residual: one kernel for few rows."""
    if x.dim() == 2 and _skinny(x) and (residual is None or residual.is_contiguous()):
        return skinny_rms_norm_linear(x, residual, norm_weight, eps, weight, bias)
    if residual is None:
        return x, F.linear(rms_norm(x, norm_weight, eps), weight, bias)
    stream, normed = rms_norm(x, norm_weight, eps, residual)
    return stream, F.linear(normed, weight, bias)
