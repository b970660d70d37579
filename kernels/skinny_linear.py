"""Triton matmul for few rows (decode and verify steps): y = x @ w.T + b with x [M <= 16, K], w [N, K].

At batch 1 a decoder step is a stream over its weights; cuBLAS's kernels for such shapes leave part of the
bandwidth unused. Each program owns BLOCK_N output features and streams their [BLOCK_N, K] weight rows once,
in BLOCK_K steps, against all M rows padded to one 16-row MMA tile. The K order of the fp32 sums is fixed by
the config, not by M, so a row's result does not depend on how many rows share the launch (batch invariance).

`skinny_norm_linear` folds the layer's small ops around a matmul into the same launch: the residual add and the
RMSNorm before it (the q/k/v and gate/up projections), and SiLU-and-multiply after it (gate/up). At batch 1 each
of those was a launch of its own, latency-bound like every op of a small model's step.
"""

from __future__ import annotations

import functools
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


# A config follows the weight's shape only (it sets the K order of the sums, so it must not follow M). On an H100
# over the 8B shape's five weights at M = 1..16 (benchmarks/bench_linear.py shapes, 24 configs) DEFAULT_CONFIG was
# the fastest or within 0.5 us of it on four weights: 0.90-1.03x copy bandwidth on the large ones, 14.9 us for
# o_proj against cuBLAS's 17.8. On q/k/v it takes 22.8 us, against 21.4 for the best config there and 21.9 for
# cuBLAS.
DEFAULT_CONFIG = SkinnyConfig(block_n=32, block_k=512, num_warps=4, num_stages=4)
# Short rows (SmolLM2: K = 576 and 1536) leave DEFAULT_CONFIG one or two K steps, nothing to pipeline, and its wide
# programs too few for small N: narrower programs over shorter K steps. H100, `bench_linear.py shapes --smol` (72
# configs): 3.4 / 3.3 / 4.0 / 4.3 / 22.0 us for SmolLM2's q/k/v, o, gate/up, down and LM head at M = 1 against
# DEFAULT_CONFIG's 3.9 / 3.8 / 4.7 / 4.9 / 38.1, and within 0.11 us of the best config on each.
SHORT_K = 2048


@functools.cache  # every eager few-row matmul asks
def config_for(k: int) -> SkinnyConfig:
    """The launch config of a weight with k input features."""
    if k > SHORT_K:
        return DEFAULT_CONFIG
    return SkinnyConfig(block_n=16, block_k=128 if k <= 1024 else 256, num_warps=2, num_stages=4)


@triton.jit(do_not_specialize=["M"])  # one variant for 1..16 rows: no compile when a new row count comes
def _skinny_kernel(
    x_ptr, r_ptr, s_ptr, g_ptr, w_ptr, b_ptr, y_ptr, M, N, K, eps,
    stride_xm, stride_rm, stride_sm, stride_wn, stride_ym,
    NORM: tl.constexpr, HAS_RES: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """BLOCK_N weight rows against all (<= 16) rows of x.

    HAS_RES: x is first x + r, which program 0 stores to s. NORM: then RMS-normalized with weight g: g scales x's
    columns before the dot and 1 / rms scales the sums after it, so the one pass over K that feeds the MMAs also
    sums the squares, and no program redoes row-wide work. GATED: the program's rows are BLOCK_N // 2 gate rows
    and their up rows (N // 2 rows further), and it writes silu(gate) * up.
    """
    BLOCK_M: tl.constexpr = 16
    HALF_N: tl.constexpr = BLOCK_N // 2
    pid = tl.program_id(0)
    rm = tl.arange(0, BLOCK_M)
    rj = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    if GATED:
        col = pid * HALF_N + rj % HALF_N  # the output feature of each weight row
        rn = col + (rj // HALF_N) * (N // 2)
        n_ok = col < N // 2
    else:
        rn = pid * BLOCK_N + rj
        n_ok = rn < N
    x_rows = x_ptr + rm[:, None].to(tl.int64) * stride_xm
    r_rows = r_ptr + rm[:, None].to(tl.int64) * stride_rm
    s_rows = s_ptr + rm[:, None].to(tl.int64) * stride_sm
    w_rows = w_ptr + rn[:, None].to(tl.int64) * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    sum_sq = tl.zeros([BLOCK_M], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + rk) < K
        x_ok = m_ok[:, None] & k_ok[None, :]
        x = tl.load(x_rows + (k0 + rk)[None, :], mask=x_ok, other=0.0)  # [16, BLOCK_K]
        if HAS_RES:
            r = tl.load(r_rows + (k0 + rk)[None, :], mask=x_ok, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)  # torch's add: fp32, rounded
            if pid == 0:
                tl.store(s_rows + (k0 + rk)[None, :], x, mask=x_ok)
        if NORM:
            xf = x.to(tl.float32)
            sum_sq += tl.sum(xf * xf, axis=1)
            g = tl.load(g_ptr + k0 + rk, mask=k_ok, other=0.0).to(tl.float32)
            x = (xf * g[None, :]).to(x_ptr.dtype.element_ty)
        w = tl.load(w_rows + (k0 + rk)[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_K]
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PREC)
    if NORM:
        acc = acc * tl.rsqrt(sum_sq / K + eps)[:, None]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y = acc.to(y_ptr.dtype.element_ty)
    if GATED:  # rounded like silu_and_mul after a matmul: gate and up in the dtype, then silu(gate), then the product
        gate, up = tl.split(tl.permute(tl.reshape(y, [BLOCK_M, 2, HALF_N]), (0, 2, 1)))  # [16, HALF_N] each
        gf = gate.to(tl.float32)
        act = (gf / (1.0 + tl.exp(-gf))).to(y_ptr.dtype.element_ty)
        y = (act.to(tl.float32) * up.to(tl.float32)).to(y_ptr.dtype.element_ty)
        rn = pid * HALF_N + tl.arange(0, HALF_N)
        n_ok = rn < N // 2
    tl.store(y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :], y, mask=m_ok[:, None] & n_ok[None, :])


def _launch(x, residual, norm_weight, eps, weight, bias, gated, config) -> tuple[torch.Tensor, torch.Tensor]:
    m, k = x.shape
    n = weight.shape[0]
    assert m <= MAX_ROWS and weight.shape[1] == k and x.stride(1) == 1 and weight.stride(1) == 1
    assert not gated or n % 2 == 0
    stream = torch.empty_like(x) if residual is not None else x  # [M, K]
    y = torch.empty(m, n // 2 if gated else n, device=x.device, dtype=x.dtype)  # [M, N] ([M, N / 2] gated)
    if m == 0:
        return stream, y
    config = config or config_for(k)
    res = residual if residual is not None else x
    _skinny_kernel[(triton.cdiv(n, config.block_n),)](
        x, res, stream, norm_weight if norm_weight is not None else weight, weight,
        bias if bias is not None else weight, y, m, n, k, eps,
        x.stride(0), res.stride(0), stream.stride(0), weight.stride(0), y.stride(0),
        NORM=norm_weight is not None, HAS_RES=residual is not None, GATED=gated, HAS_BIAS=bias is not None,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, DOT_PREC="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return stream, y


def skinny_linear(
    x: torch.Tensor,  # [M, K], M <= MAX_ROWS
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
    config: SkinnyConfig | None = None,  # None: config_for(K)
) -> torch.Tensor:
    """x @ weight.T + bias for at most MAX_ROWS rows, in x's dtype; no host syncs."""
    return _launch(x, None, None, 0.0, weight, bias, False, config)[1]


def skinny_norm_linear(
    x: torch.Tensor,  # [M, K], M <= MAX_ROWS
    residual: torch.Tensor | None,  # [M, K]
    norm_weight: torch.Tensor,  # [K]
    eps: float,
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
    gated: bool = False,
    config: SkinnyConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(stream, y) in one launch: stream = x + residual (x without one), y = rms_norm(stream) @ weight.T + bias,
    and gated: silu_and_mul(y). Not reference.norm_linear's bits: the norm scales the matmul's sums."""
    assert norm_weight.shape == (x.shape[1],) and norm_weight.is_contiguous()
    return _launch(x, residual, norm_weight, eps, weight, bias, gated, config)
