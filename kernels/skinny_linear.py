"""Triton matmul for few rows (decode and verify steps): y = x @ w.T + b with x [M <= 16, K], w [N, K].

At batch 1 a decoder step is a stream over its weights; cuBLAS's kernels for such shapes leave part of the
bandwidth unused. Each program owns BLOCK_N output features and streams their [BLOCK_N, K] weight rows once,
in BLOCK_K steps, against all M rows padded to one 16-row MMA tile. The K order of the fp32 sums is fixed by
the config, not by M, so a row's result does not depend on how many rows share the launch (batch invariance).

With `gated`, the gate/up projection's launch also applies SiLU-and-multiply: each program streams matching gate
and up rows, so the activation costs nothing but the launch it saves (at batch 1 every launch is latency-bound).
`skinny_qkv_rope` likewise gives the q/k/v projection rope and the K/V store: each program streams the rows of
rope pairs (d, d + head_dim / 2) of one head.
Folding the RMSNorm before a matmul in as well was slower (see benchmarks/RESULTS.md): scaling the x tile in
registers takes it off the asynchronous copy path into the MMAs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from specserve.kernels import num_sms, pdl

MAX_ROWS = 16  # one MMA tile of rows; more rows go to cuBLAS, where the weight read is shared by enough rows


@dataclass(frozen=True)
class SkinnyConfig:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# A config follows the weight's shape and the GPU only (it sets the K order of the sums, so it must not follow M).
# On an H100 over the 8B shape's five weights at M = 1..16 (benchmarks/bench_linear.py shapes, 24 configs)
# DEFAULT_CONFIG was the fastest or within 0.5 us of it on four weights: 0.90-1.03x copy bandwidth on the large ones,
# 14.9 us for o_proj against cuBLAS's 17.8. Its programs take 192 KB of shared memory, one an SM: a weight of more
# output tiles than SMs runs in two waves or more, so those take 256-wide K steps at 3 stages, three programs an SM.
# H100, PDL, engines A/B (RESULTS.md, fifteenth session): the 8B shape's q/k/v 19.8 against 24.2 us alone and its
# graph forward 5.86 against 5.94 ms; the same for o and down (fewer tiles than SMs) made it 6.35.
DEFAULT_CONFIG = SkinnyConfig(block_n=32, block_k=512, num_warps=4, num_stages=4)
MANY_TILES_CONFIG = SkinnyConfig(block_n=32, block_k=256, num_warps=4, num_stages=3)
# Short rows (SmolLM2: K = 576 and 1536) leave DEFAULT_CONFIG one or two K steps, nothing to pipeline, and its wide
# programs too few for small N: narrower programs over shorter K steps. H100, `bench_linear.py shapes --smol` (72
# configs): 3.4 / 3.3 / 4.0 / 4.3 / 22.0 us for SmolLM2's q/k/v, o, gate/up, down and LM head at M = 1 against
# DEFAULT_CONFIG's 3.9 / 3.8 / 4.7 / 4.9 / 38.1, and within 0.11 us of the best config on each.
SHORT_K = 2048


@functools.cache  # every eager few-row matmul asks
def config_for(n: int, k: int, sms: int) -> SkinnyConfig:
    """The launch config of an [n, k] weight on a GPU of sms SMs."""
    if k <= SHORT_K:
        return SkinnyConfig(block_n=16, block_k=128 if k <= 1024 else 256, num_warps=2, num_stages=4)
    return MANY_TILES_CONFIG if triton.cdiv(n, DEFAULT_CONFIG.block_n) > sms else DEFAULT_CONFIG


@triton.jit
def _rows_times_weight(x_ptr, w_ptr, b_ptr, rn, n_ok, M, K, stride_xm, stride_wn,
                       HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr):
    """[16, BLOCK_N] fp32: all (<= 16) rows of x times weight rows rn, plus their bias."""
    BLOCK_M: tl.constexpr = 16
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
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
    return acc


@triton.jit
def _halves(y, BLOCK_N: tl.constexpr):
    """Columns [0, BLOCK_N / 2) and [BLOCK_N / 2, BLOCK_N) of a [16, BLOCK_N] tile, as two [16, BLOCK_N / 2] tiles."""
    return tl.split(tl.permute(tl.reshape(y, [16, 2, BLOCK_N // 2]), (0, 2, 1)))


@triton.jit(do_not_specialize=["M"])  # one variant for 1..16 rows: no compile when a new row count comes
def _skinny_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
    GATED: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PREC: tl.constexpr, PDL: tl.constexpr,
):
    """BLOCK_N weight rows against all (<= 16) rows of x. GATED: the rows are BLOCK_N // 2 gate rows and their up
    rows (N // 2 rows further), and the program writes silu(gate) * up."""
    pdl.enter(PDL)
    HALF_N: tl.constexpr = BLOCK_N // 2
    pid = tl.program_id(0)
    rm = tl.arange(0, 16)
    rj = tl.arange(0, BLOCK_N)
    if GATED:
        col = pid * HALF_N + rj % HALF_N  # the output feature of each weight row
        rn = col + (rj // HALF_N) * (N // 2)
        n_ok = col < N // 2
    else:
        rn = pid * BLOCK_N + rj
        n_ok = rn < N
    acc = _rows_times_weight(x_ptr, w_ptr, b_ptr, rn, n_ok, M, K, stride_xm, stride_wn, HAS_BIAS, BLOCK_N, BLOCK_K,
                             DOT_PREC)
    y = acc.to(y_ptr.dtype.element_ty)
    if GATED:  # rounded like silu_and_mul after a matmul: gate and up in the dtype, then silu(gate), then the product
        gate, up = _halves(y, BLOCK_N)
        gf = gate.to(tl.float32)
        act = (gf / (1.0 + tl.exp(-gf))).to(y_ptr.dtype.element_ty)
        y = (act.to(tl.float32) * up.to(tl.float32)).to(y_ptr.dtype.element_ty)
        rn = pid * HALF_N + tl.arange(0, HALF_N)
        n_ok = rn < N // 2
    tl.store(y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :], y, mask=(rm < M)[:, None] & n_ok[None, :])


@triton.jit
def _rope_halves(x1, x2, pos, cos_ptr, sin_ptr, stride_cos, d, m_ok):
    """Rope of the two halves' columns d at each row's position, each product and sum rounded to the dtype as torch
    does it op by op (fused_ops._rotate's arithmetic)."""
    dt = x1.dtype
    rows = pos[:, None] * stride_cos + d[None, :]
    cos = tl.load(cos_ptr + rows, mask=m_ok[:, None], other=0.0).to(dt).to(tl.float32)  # HF casts the tables first
    sin = tl.load(sin_ptr + rows, mask=m_ok[:, None], other=0.0).to(dt).to(tl.float32)
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    a = (x1f * cos).to(dt).to(tl.float32) - (x2f * sin).to(dt).to(tl.float32)
    b = (x2f * cos).to(dt).to(tl.float32) + (x1f * sin).to(dt).to(tl.float32)
    return a.to(dt), b.to(dt)


@triton.jit(do_not_specialize=["M"])
def _qkv_rope_kernel(
    x_ptr, w_ptr, b_ptr, q_ptr, pos_ptr, cos_ptr, sin_ptr, slot_ptr, k_cache, v_cache, M, K,
    stride_xm, stride_wn, stride_qm, stride_cos, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    NUM_Q: tl.constexpr, NUM_KV: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr,
    PDL: tl.constexpr,
):
    """The q/k/v projection of all (<= 16) rows for BLOCK_N / 2 rope pairs (d, d + HEAD_DIM / 2) of one head, then
    rope_write_kv's work on them: rotated q to q_ptr, rotated k and plain v to their cache slots."""
    pdl.enter(PDL)
    HALF_N: tl.constexpr = BLOCK_N // 2
    PER_HEAD: tl.constexpr = HEAD_DIM // BLOCK_N  # programs per head
    pid = tl.program_id(0)
    head = pid // PER_HEAD  # q heads, then k heads, then v heads, as the weight's rows
    d = (pid % PER_HEAD) * HALF_N + tl.arange(0, HALF_N)  # the program's first-half dims
    rj = tl.arange(0, BLOCK_N)
    rn = head * HEAD_DIM + (pid % PER_HEAD) * HALF_N + rj % HALF_N + (rj // HALF_N) * (HEAD_DIM // 2)
    acc = _rows_times_weight(x_ptr, w_ptr, b_ptr, rn, rn >= 0, M, K, stride_xm, stride_wn, HAS_BIAS, BLOCK_N,
                             BLOCK_K, DOT_PREC)
    x1, x2 = _halves(acc.to(q_ptr.dtype.element_ty), BLOCK_N)  # [16, HALF_N] each, rounded like the matmul's output
    rm = tl.arange(0, 16)
    m_ok = rm < M
    pos = tl.load(pos_ptr + rm, mask=m_ok, other=0)
    if head < NUM_Q:
        a, b = _rope_halves(x1, x2, pos, cos_ptr, sin_ptr, stride_cos, d, m_ok)
        q_out = q_ptr + rm[:, None].to(tl.int64) * stride_qm + head * HEAD_DIM + d[None, :]
        tl.store(q_out, a, mask=m_ok[:, None])
        tl.store(q_out + HEAD_DIM // 2, b, mask=m_ok[:, None])
    else:
        slot = tl.load(slot_ptr + rm, mask=m_ok, other=-1)
        ok = (m_ok & (slot >= 0))[:, None]  # negative slots are padding: nothing to store
        blk, off = (slot // BLOCK_SIZE).to(tl.int64), (slot % BLOCK_SIZE).to(tl.int64)
        if head < NUM_Q + NUM_KV:
            a, b = _rope_halves(x1, x2, pos, cos_ptr, sin_ptr, stride_cos, d, m_ok)
            kc = k_cache + (blk * stride_kb + off * stride_ks + (head - NUM_Q) * stride_kh)[:, None] + d[None, :]
            tl.store(kc, a.to(k_cache.dtype.element_ty), mask=ok)
            tl.store(kc + HEAD_DIM // 2, b.to(k_cache.dtype.element_ty), mask=ok)
        else:
            vh = head - NUM_Q - NUM_KV
            vc = v_cache + (blk * stride_vb + off * stride_vs + vh * stride_vh)[:, None] + d[None, :]
            tl.store(vc, x1.to(v_cache.dtype.element_ty), mask=ok)
            tl.store(vc + HEAD_DIM // 2, x2.to(v_cache.dtype.element_ty), mask=ok)


def skinny_linear(
    x: torch.Tensor,  # [M, K], M <= MAX_ROWS
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
    config: SkinnyConfig | None = None,  # None: config_for(N, K, SMs)
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
    config = config or config_for(n, k, num_sms(x.device))
    _skinny_kernel[(triton.cdiv(n, config.block_n),)](
        x, weight, bias if bias is not None else weight, y, m, n, k, x.stride(0), weight.stride(0), y.stride(0),
        GATED=gated, HAS_BIAS=bias is not None, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        DOT_PREC="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages, **pdl.flags(),
    )
    return y


def skinny_qkv_rope(
    x: torch.Tensor,  # [M, K], M <= MAX_ROWS
    weight: torch.Tensor,  # [(num_q_heads + 2 num_kv_heads) head_dim, K]: rows [q; k; v]
    bias: torch.Tensor | None,  # [(num_q_heads + 2 num_kv_heads) head_dim]
    num_q_heads: int,
    positions: torch.Tensor,  # [M] int64
    cos: torch.Tensor,  # [max_positions, head_dim // 2] fp32
    sin: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [M] int64; negative slots are skipped (padding)
    config: SkinnyConfig | None = None,
) -> torch.Tensor:
    """fused_ops.rope_write_kv of the q/k/v projection, in one launch: rotated q [M, num_q_heads, head_dim], rotated
    k and v stored in their slots. The same bits as skinny_linear then rope_write_kv."""
    m, k = x.shape
    num_kv, head_dim = k_cache.shape[2], k_cache.shape[3]
    n = (num_q_heads + 2 * num_kv) * head_dim
    config = config or config_for(n, k, num_sms(x.device))
    assert fits_qkv_rope(m, head_dim, config) and weight.shape == (n, k)
    assert x.stride(1) == 1 and weight.stride(1) == 1 and k_cache.stride(3) == v_cache.stride(3) == 1
    assert cos.is_contiguous() and sin.is_contiguous()
    q = torch.empty(m, num_q_heads, head_dim, device=x.device, dtype=x.dtype)  # [M, num_q_heads, head_dim]
    if m == 0:
        return q
    _qkv_rope_kernel[(n // config.block_n,)](
        x, weight, bias if bias is not None else weight, q, positions, cos, sin, slot_mapping, k_cache, v_cache, m,
        k, x.stride(0), weight.stride(0), q.stride(0), cos.stride(0), *k_cache.stride()[:3], *v_cache.stride()[:3],
        NUM_Q=num_q_heads, NUM_KV=num_kv, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1], HAS_BIAS=bias is not None,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, DOT_PREC="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages,
        enable_fp_fusion=False,  # rope rounds like fused_ops.rope_write_kv, which does not contract either
        **pdl.flags(),
    )
    return q


def fits_qkv_rope(rows: int, head_dim: int, config: SkinnyConfig) -> bool:
    """Whether skinny_qkv_rope takes the step: few rows, and a head's rope pairs split evenly among programs."""
    return rows <= MAX_ROWS and head_dim % config.block_n == 0
