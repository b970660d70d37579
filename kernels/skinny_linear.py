"""Triton matmul for few rows (decode and verify steps): y = x @ w.T + b with x [M <= 16, K], w [N, K].

At batch 1 a decoder step is a stream over its weights; cuBLAS's kernels for such shapes leave part of the
bandwidth unused. Each program owns BLOCK_N output features and streams their [BLOCK_N, K] weight rows once,
in BLOCK_K steps, against all M rows padded to one 16-row MMA tile. The K order of the fp32 sums is fixed by
the config, not by M, so a row's result does not depend on how many rows share the launch (batch invariance).

With `gated`, the gate/up projection's launch also applies SiLU-and-multiply: each program streams matching gate
and up rows, so the activation costs nothing but the launch it saves (at batch 1 every launch is latency-bound).
Folding the RMSNorm before a matmul in as well was slower (see benchmarks/RESULTS.md): scaling the x tile in
registers takes it off the asynchronous copy path into the MMAs.
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
    x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
    GATED: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """BLOCK_N weight rows against all (<= 16) rows of x. GATED: the rows are BLOCK_N // 2 gate rows and their up
    rows (N // 2 rows further), and the program writes silu(gate) * up."""
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
    w_rows = w_ptr + rn[:, None].to(tl.int64) * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + rk) < K
        x = tl.load(x_rows + (k0 + rk)[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # [16, BLOCK_K]
        w = tl.load(w_rows + (k0 + rk)[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_K]
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PREC)
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


def skinny_linear(
    x: torch.Tensor,  # [M, K], M <= MAX_ROWS
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
    config: SkinnyConfig | None = None,  # None: config_for(K)
    gated: bool = False,
) -> torch.Tensor:
    """x @ weight.T + bias for at most MAX_ROWS rows, in x's dtype; no host syncs. gated: the rows of weight are
    [gate; up], and the result is silu_and_mul of the product ([M, N / 2])."""
    m, k = x.shape
    n = weight.shape[0]
    assert m <= MAX_ROWS and weight.shape[1] == k and x.stride(1) == 1 and weight.stride(1) == 1
    assert not gated or n % 2 == 0
    y = torch.empty(m, n // 2 if gated else n, device=x.device, dtype=x.dtype)  # [M, N] ([M, N / 2] gated)
    if m == 0:
        return y
    config = config or config_for(k)
    _skinny_kernel[(triton.cdiv(n, config.block_n),)](
        x, weight, bias if bias is not None else weight, y, m, n, k, x.stride(0), weight.stride(0), y.stride(0),
        GATED=gated, HAS_BIAS=bias is not None, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        DOT_PREC="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return y
