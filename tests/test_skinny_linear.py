"""The few-row Triton matmul against F.linear (CPU interpreter in CI, every dtype on CUDA)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import nan_allocations

import specserve.kernels.triton_backend  # noqa: F401  sets TRITON_INTERPRET on CPU before the kernels exist
from specserve.kernels import fused_ops, reference
from specserve.kernels import skinny_linear as sk

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
# the CPU interpreter mis-multiplies bf16 dots (see tree_attention.py), so bf16 runs on CUDA only
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
SMALL = sk.SkinnyConfig(block_n=16, block_k=64, num_warps=4, num_stages=2)  # CI-sized: a few K steps


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,bias", [(1, 48, 200, False), (5, 33, 64, True), (16, 70, 130, True),
                                        (3, 16, 16, False)])
def test_matches_f_linear(dtype, m, n, k, bias):
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=gen).to(DEV, dtype)
    w = torch.randn(n, k, generator=gen).to(DEV, dtype)
    b = torch.randn(n, generator=gen).to(DEV, dtype) if bias else None
    y = sk.skinny_linear(x, w, b, SMALL)
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert y.shape == (m, n) and y.dtype == dtype and not y.isnan().any()
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < TOL[dtype]


@pytest.mark.parametrize("config,k", [(SMALL, 256), (None, 576)])  # None: the config the weight's shape picks
def test_rows_do_not_depend_on_the_batch(config, k):
    """A row's result is the same bits alone or among 16 rows (fixed K order): batch invariance."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(16, k, generator=gen).to(DEV, DTYPES[-1])
    w = torch.randn(40, k, generator=gen).to(DEV, DTYPES[-1])
    full = sk.skinny_linear(x, w, None, config)
    for i in (0, 5, 15):
        assert torch.equal(sk.skinny_linear(x[i : i + 1], w, None, config), full[i : i + 1])
    assert torch.equal(sk.skinny_linear(x[:7], w, None, config), full[:7])


def test_config_follows_the_weight_not_the_rows():
    """Short rows get narrow programs over short K steps; long rows over more output tiles than SMs (on an H100: the
    8B shape's q/k/v, gate/up and LM head) get programs that fit 3 to an SM, the others the default."""
    assert sk.config_for(960, 576, 132) == sk.SkinnyConfig(block_n=16, block_k=128, num_warps=2, num_stages=4)
    assert sk.config_for(576, 1536, 132).block_k == 256
    assert [sk.config_for(n, 4096, 132) for n in (6144, 28672, 128256)] == [sk.MANY_TILES_CONFIG] * 3
    assert sk.config_for(4096, 4096, 132) == sk.config_for(4096, 14336, 132) == sk.DEFAULT_CONFIG
    assert sk.config_for(6144, 4096, 192) == sk.DEFAULT_CONFIG  # a bigger GPU: 192 tiles are one wave


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,bias", [(1, 48, 200, False), (6, 68, 130, True), (16, 34, 64, False)])
def test_gated_rounds_like_silu_and_mul_after_the_matmul(dtype, m, n, k, bias):
    """gated: the bits of the matmul followed by fused_ops.silu_and_mul, and close to the reference."""
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=gen).to(DEV, dtype)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(DEV, dtype)
    b = torch.randn(n, generator=gen).to(DEV, dtype) if bias else None
    with nan_allocations():
        got = sk.skinny_linear(x, w, b, SMALL, gated=True)
    assert got.shape == (m, n // 2) and not got.isnan().any()
    assert torch.equal(got, fused_ops.silu_and_mul(sk.skinny_linear(x, w, b, SMALL)))
    want = reference.gated_linear(x.double(), w.double(), None if b is None else b.double())
    assert ((got.double() - want).abs().max() / want.abs().max()).item() < TOL[dtype]


@pytest.mark.parametrize("config,k", [(SMALL, 256), (None, 576)])
def test_gated_rows_do_not_depend_on_the_batch(config, k):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(16, k, generator=gen).to(DEV, DTYPES[-1])
    w = torch.randn(40, k, generator=gen).to(DEV, DTYPES[-1])
    full = sk.skinny_linear(x, w, None, config, gated=True)
    for rows in (slice(0, 1), slice(5, 6), slice(15, 16), slice(0, 7)):
        assert torch.equal(sk.skinny_linear(x[rows], w, None, config, gated=True), full[rows])


def rope_tables(head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.arange(4096)[:, None].float() * inv[None, :]  # [4096, head_dim // 2]
    return freqs.cos().to(DEV), freqs.sin().to(DEV)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,heads,kv_heads,head_dim,bias", [(1, 9, 3, 32, False), (6, 4, 2, 16, True),
                                                            (16, 2, 2, 64, False)])
def test_qkv_rope_is_the_projection_then_rope_write_kv(dtype, m, heads, kv_heads, head_dim, bias):
    """One launch gives the bits of skinny_linear then fused_ops.rope_write_kv: rotated q, rotated k and plain v in
    their slots, padding slots and every other slot untouched (caches start as NaN)."""
    gen = torch.Generator().manual_seed(m * 100 + heads + head_dim)
    k_in, n = 48, (heads + 2 * kv_heads) * head_dim
    x = torch.randn(m, k_in, generator=gen).to(DEV, dtype)
    w = (torch.randn(n, k_in, generator=gen) / k_in**0.5).to(DEV, dtype)
    b = torch.randn(n, generator=gen).to(DEV, dtype) if bias else None
    positions = torch.randint(0, 4096, (m,), generator=gen).to(DEV)
    slots = torch.randperm(4 * 16, generator=gen)[:m].to(DEV)
    slots[m // 2] = -1  # padding: written nowhere
    cos, sin = rope_tables(head_dim)
    caches = [[torch.full((4, 16, kv_heads, head_dim), float("nan"), dtype=dtype, device=DEV) for _ in "kv"]
              for _ in range(2)]
    apart = dict(linear_op=lambda *a: sk.skinny_linear(*a, SMALL), rope_op=fused_ops.rope_write_kv)
    want = reference.qkv_rope_write_kv(x, w, b, heads, positions, cos, sin, *caches[0], slots, **apart)
    with nan_allocations():
        got = sk.skinny_qkv_rope(x, w, b, heads, positions, cos, sin, *caches[1], slots, SMALL)
    assert got.shape == (m, heads, head_dim) and torch.equal(got, want)
    for want_c, got_c in zip(*caches, strict=True):
        assert torch.equal(got_c.nan_to_num(7.0), want_c.nan_to_num(7.0))
        assert got_c.isnan().sum() == want_c.isnan().sum() == (4 * 16 - (m - 1)) * kv_heads * head_dim
    exact = reference.qkv_rope_write_kv(x.double(), w.double(), None if b is None else b.double(), heads, positions,
                                        cos, sin, *(c.double() for c in caches[0]), slots)
    assert ((got.double() - exact).abs().max() / exact.abs().max()).item() < TOL[dtype]


@pytest.mark.skipif(not CUDA, reason="the backend routes to the kernel on CUDA only")
def test_backend_routes_few_rows_to_the_kernel(monkeypatch):
    from specserve.kernels import triton_backend

    calls = []
    monkeypatch.setattr(triton_backend, "skinny_linear", lambda *a: calls.append(a[0].shape) or F.linear(*a))
    w = torch.randn(32, 64, device="cuda", dtype=torch.bfloat16)
    triton_backend.linear(torch.randn(2, 3, 64, device="cuda", dtype=torch.bfloat16), w)
    triton_backend.linear(torch.randn(17, 64, device="cuda", dtype=torch.bfloat16), w)
    triton_backend.linear(torch.randn(4, 64, device="cuda"), w.float())
    assert calls == [(6, 64)]


@pytest.mark.skipif(not CUDA, reason="the configs of long rows are picked by the GPU's SM count")
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 4096), (4096, 14336)])
def test_long_row_configs_match_f_linear_and_the_batch(n, k):
    """The configs the 8B shape's weights get on this GPU (either side of the tiles-vs-SMs rule) are close to
    F.linear and batch invariant, plain and gated."""
    gen = torch.Generator(device="cuda").manual_seed(n + k)
    x = torch.randn(16, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) / k**0.5
    for gated in (False, True):
        full = sk.skinny_linear(x, w, gated=gated)
        ref = F.linear(x.double(), w.double())
        ref = reference.silu_and_mul(ref) if gated else ref
        assert ((full.double() - ref).abs().max() / ref.abs().max()).item() < 2e-2
        for rows in (slice(0, 1), slice(3, 4), slice(0, 9)):
            assert torch.equal(sk.skinny_linear(x[rows], w, gated=gated), full[rows])
