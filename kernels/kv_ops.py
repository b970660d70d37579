"""Triton KV-cache writes and accepted-path compaction (semantics of kernels/reference.py).

KV pool layout per layer: [num_blocks, block_size, num_kv_heads, head_dim]; slot s is block s // block_size,
offset s % block_size. In a contiguous cache that is row s of a [num_slots, num_kv_heads * head_dim] view.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import reference

STRIP = 8192  # elements one copy_slots program holds in registers between its reads and its writes


@triton.jit
def _write_kv_kernel(
    k, v, k_cache, v_cache, slot_mapping,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    NUM_HEADS: tl.constexpr, HEADS_P: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """Store one token's K and V (all kv heads) in its slot; negative slots are padding."""
    t = tl.program_id(0)
    slot = tl.load(slot_mapping + t)
    if slot < 0:
        return
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    h = tl.arange(0, HEADS_P)[:, None]
    d = tl.arange(0, HEAD_DIM_P)[None, :]
    mask = (h < NUM_HEADS) & (d < HEAD_DIM)
    x = tl.load(k + t.to(tl.int64) * stride_kt + h * stride_kh + d, mask=mask)
    tl.store(k_cache + blk * stride_kcb + off * stride_kcs + h * stride_kch + d, x.to(k_cache.dtype.element_ty),
             mask=mask)
    x = tl.load(v + t.to(tl.int64) * stride_vt + h * stride_vh + d, mask=mask)
    tl.store(v_cache + blk * stride_vcb + off * stride_vcs + h * stride_vch + d, x.to(v_cache.dtype.element_ty),
             mask=mask)


def write_kv(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int64; negative slots are skipped (padding)
) -> None:
    """Store the step's new K/V in their slots."""
    num_tokens, num_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    assert k.stride(2) == v.stride(2) == k_cache.stride(3) == v_cache.stride(3) == 1
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3],
        NUM_HEADS=num_heads, HEADS_P=triton.next_power_of_2(num_heads), HEAD_DIM=head_dim,
        HEAD_DIM_P=triton.next_power_of_2(head_dim), BLOCK_SIZE=k_cache.shape[1],
    )


@triton.jit
def _copy_slots_kernel(cache_ptrs, like, src_slots, dst_slots, n, row_len, N_P: tl.constexpr,
                       COLS: tl.constexpr):
    """Move a strip of COLS columns of every listed row of one cache, reading all sources before writing."""
    cache = tl.load(cache_ptrs + tl.program_id(0)).to(like.dtype)  # this layer's cache, typed like `like`
    i = tl.arange(0, N_P)
    c = tl.program_id(1) * COLS + tl.arange(0, COLS)
    mask = (i < n)[:, None] & (c < row_len)[None, :]
    src = tl.load(src_slots + i, mask=i < n, other=0)
    dst = tl.load(dst_slots + i, mask=i < n, other=0)
    x = tl.load(cache + src[:, None] * row_len + c[None, :], mask=mask)  # [N_P, COLS]
    # a destination may be another pair's source (path [0, 2, 5] moves 5 -> 2 and 2 -> 1): no thread of the
    # program writes before all have read; programs own disjoint column strips, so they never race
    tl.debug_barrier()
    tl.store(cache + dst[:, None] * row_len + c[None, :], x, mask=mask)


@functools.lru_cache(maxsize=8)
def _pointer_table(ptrs: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """[num_caches] int64 device addresses, built once per set of caches; the copy from pinned memory is async."""
    host = torch.tensor(ptrs, dtype=torch.int64)
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host


def copy_slots(
    kv_caches: list[torch.Tensor],  # every layer's k_cache and v_cache
    src_slots: torch.Tensor,  # [n] int64
    dst_slots: torch.Tensor,  # [n] int64
) -> None:
    """Accepted-path compaction, one launch per cache shape (one in all for uniform layers); overlaps are safe."""
    n = src_slots.numel()
    if n == 0:
        return
    if n > STRIP:  # more rows than a register-resident strip holds: gather then scatter in torch
        reference.copy_slots(kv_caches, src_slots, dst_slots)
        return
    groups: dict[tuple, list[torch.Tensor]] = {}
    for cache in kv_caches:  # a drafter's own layers may have other head counts than the target's
        assert cache.is_contiguous(), "slot s is row s of a contiguous cache"
        groups.setdefault((cache.shape, cache.dtype), []).append(cache)
    n_p = triton.next_power_of_2(n)
    for (shape, _), caches in groups.items():
        row_len = shape[2] * shape[3]
        cols = min(max(STRIP // n_p, 1), triton.next_power_of_2(row_len))
        table = _pointer_table(tuple(c.data_ptr() for c in caches), caches[0].device)
        _copy_slots_kernel[(len(caches), triton.cdiv(row_len, cols))](
            table, caches[0], src_slots, dst_slots, n, row_len, N_P=n_p, COLS=cols,
        )
