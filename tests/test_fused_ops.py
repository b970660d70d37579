"""Fused layer kernels (kernels/fused_ops.py; CPU interpreter without CUDA) against their torch references.

Every buffer a kernel wrapper allocates starts as NaN, and K/V caches start as NaN, so an element the kernel
forgets to write fails the comparison; untouched cache slots must stay NaN.
"""

from __future__ import annotations

import pytest
import torch
from helpers import nan_allocations

from specserve.kernels import reference
from specserve.kernels import triton_backend as fused_ops  # sets TRITON_INTERPRET before the kernels exist

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    assert not got.isnan().any()
    err = ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-6)).item()
    assert err < TOL[dtype], err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [64, 576, 100])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype, hidden, with_residual):
    gen = torch.Generator().manual_seed(hidden)
    x = (torch.randn(7, hidden, generator=gen) * 3).to(DEVICE, dtype)
    res = torch.randn(7, hidden, generator=gen).to(DEVICE, dtype) if with_residual else None
    w = (1 + torch.randn(hidden, generator=gen) * 0.1).to(DEVICE, dtype)
    want = reference.rms_norm(x, w, 1e-5, res)
    with nan_allocations():
        got = fused_ops.rms_norm(x, w, 1e-5, res)
    if with_residual:
        if DEVICE == "cuda":  # the sum rounds once, like torch's add (the interpreter's casts do not round)
            torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
        close(got[0], want[0], dtype)
        close(got[1], want[1], dtype)
    else:
        close(got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inter", [96, 1536, 3000])
def test_silu_and_mul(dtype, inter):
    gen = torch.Generator().manual_seed(inter)
    x = (torch.randn(5, 2 * inter, generator=gen) * 4).to(DEVICE, dtype)
    with nan_allocations():
        got = fused_ops.silu_and_mul(x)
    close(got, reference.silu_and_mul(x), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 16), (9, 3, 64), (8, 8, 128)])
def test_rope_write_kv(dtype, heads, kv_heads, head_dim):
    gen = torch.Generator().manual_seed(heads * head_dim)
    num_tokens, block_size, num_blocks = 6, 16, 4
    qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * head_dim, generator=gen).to(DEVICE, dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)  # strided views
    q, k, v = (t.unflatten(-1, (-1, head_dim)) for t in (q, k, v))
    positions = torch.tensor([0, 5, 17, 300, 4095, 9], device=DEVICE)
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.arange(4096)[:, None].float() * inv[None, :]  # [4096, head_dim // 2]
    cos, sin = freqs.cos().to(DEVICE), freqs.sin().to(DEVICE)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens].to(DEVICE)
    slots[2] = -1  # padding: written nowhere
    caches = []
    for _ in range(2):  # reference, kernel
        shape = (num_blocks, block_size, kv_heads, head_dim)
        caches.append(tuple(torch.full(shape, float("nan"), dtype=dtype, device=DEVICE) for _ in "kv"))
    want = reference.rope_write_kv(q, k, v, positions, cos, sin, *caches[0], slots)
    with nan_allocations():
        got = fused_ops.rope_write_kv(q, k, v, positions, cos, sin, *caches[1], slots)
    close(got, want, dtype)
    if DEVICE == "cuda":  # each product and sum rounds as torch's ops do (the interpreter's casts do not round)
        assert torch.equal(got, want)
    for want_c, got_c in zip(caches[0], caches[1], strict=True):
        flat_w, flat_g = want_c.view(-1, kv_heads, head_dim), got_c.view(-1, kv_heads, head_dim)
        written = slots[slots >= 0]
        close(flat_g[written], flat_w[written], dtype)
        if DEVICE == "cuda":
            assert torch.equal(flat_g[written], flat_w[written])
        untouched = torch.ones(flat_g.shape[0], dtype=torch.bool, device=DEVICE)
        untouched[written] = False
        assert flat_g[untouched].isnan().all()
