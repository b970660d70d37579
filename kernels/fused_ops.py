"""Triton kernels for the decoder layer's small ops (semantics of the same names in kernels/reference.py).

A Llama layer written op by op in torch runs ~40 elementwise kernels per token (fp32 RMSNorm, rope's gathers,
halves and cat, SiLU, residual adds); at batch 1 each costs a few microseconds even inside a CUDA graph, which
on an 8B model adds up to as much as the weight reads. These kernels make it three: RMSNorm with the residual
add folded in, rope with the K/V store folded in, and SiLU-and-multiply. Each rounds where transformers'
torch code rounds (RMSNorm in fp32 cast back before the weight; rope products in the model dtype), and a
row's result never depends on the other rows (batch invariance).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from specserve.kernels import pdl


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, stride_x, stride_r, stride_o, stride_ro, n_cols, eps,
    HAS_RES: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    """One row: optionally x += residual (stored, rounded to the dtype), then weight * rmsnorm(x)."""
    pdl.enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)  # torch's add: fp32, rounded
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    y = (xf * inv).to(x_ptr.dtype.element_ty)  # HF casts back to the input dtype before the weight
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_o + cols, (w.to(tl.float32) * y.to(tl.float32)).to(out_ptr.dtype.element_ty),
             mask=mask)


def rms_norm(
    x: torch.Tensor,  # [T, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,  # [T, hidden]
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """weight * rmsnorm(x); with residual: (x + residual, weight * rmsnorm(x + residual))."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    assert x2.stride(-1) == 1 and weight.is_contiguous()
    out = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    res2 = x2 if residual is None else residual.reshape(-1, shape[-1])
    res_out = torch.empty_like(x2) if residual is not None else x2
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](
            x2, res2, weight, out, res_out, x2.stride(0), res2.stride(0), out.stride(0), res_out.stride(0),
            shape[-1], eps, HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(shape[-1]),
            num_warps=4 if shape[-1] <= 4096 else 8, **pdl.flags(),
        )
    if residual is None:
        return out.view(shape)
    return res_out.view(shape), out.view(shape)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n_cols, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """silu(gate) * up for one row of x = [gate | up], rounded like torch's two ops."""
    pdl.enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0)
    s = (g / (1.0 + tl.exp(-g))).to(u.dtype)
    tl.store(out_ptr + row * stride_o + cols, (s.to(tl.float32) * u.to(tl.float32)).to(u.dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[T, 2 I] = [gate | up] -> [T, I] silu(gate) * up."""
    assert x.stride(-1) == 1
    n = x.shape[-1] // 2
    out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    x2, o2 = x.reshape(-1, 2 * n), out.view(-1, n)
    block = min(triton.next_power_of_2(n), 2048)
    if x2.shape[0]:
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(n, block))](x2, o2, x2.stride(0), o2.stride(0), n,
                                                                   BLOCK=block, **pdl.flags())
    return out


@triton.jit
def _rotate(x_ptr, base, cos, sin, HALF: tl.constexpr, HALF_P: tl.constexpr, mask):
    """Rope of one token's heads [H_P, 2 HALF] at base offsets: (x1 cos - x2 sin, x2 cos + x1 sin), each product
    and sum rounded to the dtype as torch does it op by op."""
    d = tl.arange(0, HALF_P)[None, :]
    x1 = tl.load(x_ptr + base + d, mask=mask, other=0.0)
    x2 = tl.load(x_ptr + base + HALF + d, mask=mask, other=0.0)
    dt = x1.dtype
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    a = (x1f * cos).to(dt).to(tl.float32) - (x2f * sin).to(dt).to(tl.float32)
    b = (x2f * cos).to(dt).to(tl.float32) + (x1f * sin).to(dt).to(tl.float32)
    return a.to(dt), b.to(dt)


@triton.jit
def _rope_write_kv_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, cos_ptr, sin_ptr, q_out, k_cache, v_cache, slot_mapping,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_cos,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    NUM_Q: tl.constexpr, NUM_KV: tl.constexpr, QH_P: tl.constexpr, KVH_P: tl.constexpr,
    HALF: tl.constexpr, HALF_P: tl.constexpr, BLOCK_SIZE: tl.constexpr, PDL: tl.constexpr,
):
    """One token: rotate its q heads into q_out, and its rotated k and its v into its cache slot."""
    pdl.enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t)
    d = tl.arange(0, HALF_P)
    d_ok = d < HALF
    # the tables are fp32; HF casts them to the model dtype before multiplying
    cos = tl.load(cos_ptr + pos * stride_cos + d, mask=d_ok, other=0.0).to(q_ptr.dtype.element_ty).to(tl.float32)
    sin = tl.load(sin_ptr + pos * stride_cos + d, mask=d_ok, other=0.0).to(q_ptr.dtype.element_ty).to(tl.float32)
    cos, sin = cos[None, :], sin[None, :]

    hq = tl.arange(0, QH_P)[:, None]
    mq = (hq < NUM_Q) & d_ok[None, :]
    a, b = _rotate(q_ptr, t * stride_qt + hq * stride_qh, cos, sin, HALF, HALF_P, mq)
    o = q_out + t * stride_ot + hq * stride_oh + d[None, :]
    tl.store(o, a, mask=mq)
    tl.store(o + HALF, b, mask=mq)

    slot = tl.load(slot_mapping + t)
    if slot >= 0:  # negative slots are padding: nothing to store
        blk, off = slot // BLOCK_SIZE, slot % BLOCK_SIZE
        hk = tl.arange(0, KVH_P)[:, None]
        mk = (hk < NUM_KV) & d_ok[None, :]
        k1, k2 = _rotate(k_ptr, t * stride_kt + hk * stride_kh, cos, sin, HALF, HALF_P, mk)  # (other shape than q's)
        kc = k_cache + blk * stride_kcb + off * stride_kcs + hk * stride_kch + d[None, :]
        tl.store(kc, k1.to(k_cache.dtype.element_ty), mask=mk)
        tl.store(kc + HALF, k2.to(k_cache.dtype.element_ty), mask=mk)
        vc = v_cache + blk * stride_vcb + off * stride_vcs + hk * stride_vch + d[None, :]
        vs = v_ptr + t * stride_vt + hk * stride_vh + d[None, :]
        tl.store(vc, tl.load(vs, mask=mk).to(v_cache.dtype.element_ty), mask=mk)
        tl.store(vc + HALF, tl.load(vs + HALF, mask=mk).to(v_cache.dtype.element_ty), mask=mk)


def rope_write_kv(
    q: torch.Tensor,  # [T, num_q_heads, head_dim]
    k: torch.Tensor,  # [T, num_kv_heads, head_dim]
    v: torch.Tensor,  # [T, num_kv_heads, head_dim]
    positions: torch.Tensor,  # [T] int64
    cos: torch.Tensor,  # [max_positions, head_dim // 2] fp32
    sin: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int64; negative slots are skipped (padding)
) -> torch.Tensor:
    """Rotated q [T, num_q_heads, head_dim]; rotated k and v stored in their slots."""
    num_tokens, num_q, head_dim = q.shape
    num_kv = k.shape[1]
    assert q.stride(2) == k.stride(2) == v.stride(2) == k_cache.stride(3) == v_cache.stride(3) == 1
    assert cos.is_contiguous() and sin.is_contiguous() and head_dim % 2 == 0
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_tokens:
        half = head_dim // 2
        _rope_write_kv_kernel[(num_tokens,)](
            q, k, v, positions, cos, sin, q_out, k_cache, v_cache, slot_mapping,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            q_out.stride(0), q_out.stride(1), cos.stride(0), *k_cache.stride()[:3], *v_cache.stride()[:3],
            NUM_Q=num_q, NUM_KV=num_kv, QH_P=triton.next_power_of_2(num_q), KVH_P=triton.next_power_of_2(num_kv),
            HALF=half, HALF_P=triton.next_power_of_2(half), BLOCK_SIZE=k_cache.shape[1],
            enable_fp_fusion=False,  # no FMA contraction: skinny_qkv_rope's rope rounds alike
            **pdl.flags(),
        )
    return q_out
