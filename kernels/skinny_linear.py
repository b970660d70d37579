"""Triton matmul for few rows (decode and verify steps): y = x @ w.T + b with x [M <= 16, K], w [N, K].

At batch 1 a decoder step is a stream over its weights; cuBLAS's kernels for such shapes leave part of the
bandwidth unused. Each program owns BLOCK_N output features and streams their [BLOCK_N, K] weight rows once,
in BLOCK_K steps, against all M rows padded to one 16-row MMA tile. The K order of the fp32 sums is fixed by
the config, not by M, so a row's result does not depend on how many rows share the launch (batch invariance).

The small op before a matmul can ride its input loads (a prologue), which saves its kernel: SiLU-and-multiply
before the MLP's down projection, and the residual add + RMSNorm before q/k/v and gate/up. The input is a few
rows that every program reads from L2, so recomputing the prologue per program costs little at these sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAX_ROWS = 16  # one MMA tile of rows; more rows go to cuBLAS, where the weight read is shared by enough rows


@dataclass(frozen=True)
class SkinnyConfig:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# One config for every shape (it sets the K order of the sums, so it must not follow M). On an H100 over the 8B
# shape's five weights at M = 1..16 it was the fastest of 24 (benchmarks/bench_linear.py shapes) or within
# 0.5 us of it: 0.90-1.02x copy bandwidth on the large weights, 14.9 us for o_proj against cuBLAS's 17.8.
DEFAULT_CONFIG = SkinnyConfig(block_n=32, block_k=512, num_warps=4, num_stages=4)


@triton.jit
def _load_x(x_ptr, r_ptr, nw_ptr, rows, stride_xm, stride_rm, k, m_ok, k_ok, inv, K,
            PROLOGUE: tl.constexpr, HAS_RES: tl.constexpr):
    """[16, BLOCK_K] of the matmul's input at columns k: x itself, silu(gate) * up of x = [gate | up], or
    norm_weight * rmsnorm(x + residual) given the rows' 1 / rms `inv`; rounded where fused_ops rounds."""
    mask = m_ok[:, None] & k_ok[None, :]
    x = tl.load(x_ptr + rows * stride_xm + k[None, :], mask=mask, other=0.0)
    if PROLOGUE == "silu_mul":
        g = x.to(tl.float32)
        u = tl.load(x_ptr + rows * stride_xm + K + k[None, :], mask=mask, other=0.0)
        s = (g / (1.0 + tl.exp(-g))).to(u.dtype)
        x = (s.to(tl.float32) * u.to(tl.float32)).to(u.dtype)
    if PROLOGUE == "rms_norm":
        if HAS_RES:
            r = tl.load(r_ptr + rows * stride_rm + k[None, :], mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        y = (x.to(tl.float32) * inv[:, None]).to(x.dtype)
        w = tl.load(nw_ptr + k, mask=k_ok, other=0.0)
        x = (w.to(tl.float32)[None, :] * y.to(tl.float32)).to(x.dtype)
    return x


@triton.jit
def _skinny_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, r_ptr, nw_ptr, s_ptr, M, N, K, eps, stride_xm, stride_rm, stride_sm, stride_wn,
    stride_ym, HAS_BIAS: tl.constexpr, PROLOGUE: tl.constexpr, HAS_RES: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One BLOCK_N slice of output features for all (<= 16) rows, after the input's PROLOGUE (see _load_x)."""
    BLOCK_M: tl.constexpr = 16
    n0 = tl.program_id(0) * BLOCK_N
    rm = tl.arange(0, BLOCK_M)
    rn = n0 + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    rows = rm[:, None].to(tl.int64)
    inv = tl.zeros([BLOCK_M], tl.float32)
    if PROLOGUE == "rms_norm":
        # each program norms the rows itself (they sit in L2); program 0 also stores x + residual, the stream
        sq = tl.zeros([BLOCK_M], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + rk
            mask = m_ok[:, None] & (k < K)[None, :]
            x = tl.load(x_ptr + rows * stride_xm + k[None, :], mask=mask, other=0.0)
            if HAS_RES:
                r = tl.load(r_ptr + rows * stride_rm + k[None, :], mask=mask, other=0.0)
                x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
                if tl.program_id(0) == 0:
                    tl.store(s_ptr + rows * stride_sm + k[None, :], x, mask=mask)
            xf = x.to(tl.float32)
            sq += tl.sum(xf * xf, axis=1)
        inv = tl.rsqrt(sq / K + eps)
    w_rows = w_ptr + rn[:, None].to(tl.int64) * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        k_ok = k < K
        x = _load_x(x_ptr, r_ptr, nw_ptr, rows, stride_xm, stride_rm, k, m_ok, k_ok, inv, K, PROLOGUE, HAS_RES)
        w = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_K]
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PREC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def _launch(x, weight, bias, k, config, prologue="none", residual=None, norm_weight=None, stream=None, eps=0.0):
    m, n = x.shape[0], weight.shape[0]
    assert m <= MAX_ROWS and weight.shape[1] == k and x.stride(1) == 1 and weight.stride(1) == 1
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)  # [M, N]
    if m == 0:
        return y
    r = residual if residual is not None else x
    s = stream if stream is not None else x
    _skinny_kernel[(triton.cdiv(n, config.block_n),)](
        x, weight, bias if bias is not None else weight, y, r, norm_weight if norm_weight is not None else weight,
        s, m, n, k, eps, x.stride(0), r.stride(0), s.stride(0), weight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, PROLOGUE=prologue, HAS_RES=residual is not None,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, DOT_PREC="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return y


def skinny_linear(
    x: torch.Tensor,  # [M, K], M <= MAX_ROWS
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
    config: SkinnyConfig = DEFAULT_CONFIG,
) -> torch.Tensor:
    """x @ weight.T + bias for at most MAX_ROWS rows, in x's dtype; no host syncs."""
    return _launch(x, weight, bias, x.shape[1], config)


def skinny_silu_mul_linear(
    gate_up: torch.Tensor,  # [M, 2 K] = [gate | up]
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,
    config: SkinnyConfig = DEFAULT_CONFIG,
) -> torch.Tensor:
    """(silu(gate) * up) @ weight.T + bias: the MLP's down projection with SiLU-and-multiply on its input."""
    return _launch(gate_up, weight, bias, gate_up.shape[1] // 2, config, "silu_mul")


def skinny_rms_norm_linear(
    x: torch.Tensor,  # [M, K]
    residual: torch.Tensor | None,  # [M, K]
    norm_weight: torch.Tensor,  # [K]
    eps: float,
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,
    config: SkinnyConfig = DEFAULT_CONFIG,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(stream, norm(stream) @ weight.T + bias) with stream = x + residual (x itself without a residual)."""
    stream = torch.empty_like(x) if residual is not None else x
    y = _launch(x, weight, bias, x.shape[1], config, "rms_norm", residual, norm_weight, stream, eps)
    return stream, y
