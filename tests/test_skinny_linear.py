"""The few-row Triton matmul against F.linear (CPU interpreter in CI, every dtype on CUDA)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from specserve.kernels import reference
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


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", [(1, 40, 200), (6, 33, 96), (16, 64, 130)])
def test_silu_mul_prologue_matches_the_two_ops(dtype, m, n, k):
    gen = torch.Generator().manual_seed(m + n + k)
    gate_up = torch.randn(m, 2 * k, generator=gen).to(DEV, dtype)
    w = torch.randn(n, k, generator=gen).to(DEV, dtype)
    b = torch.randn(n, generator=gen).to(DEV, dtype)
    y = sk.skinny_silu_mul_linear(gate_up, w, b, SMALL)
    up = gate_up[:, k:].double()
    ref = F.linear(F.silu(gate_up[:, :k].double()) * up, w.double(), b.double())
    assert y.shape == (m, n) and rel_err(y, ref) < TOL[dtype]
    # the prologue rounds as the SiLU-and-multiply kernel does: the same as running both ops
    assert rel_err(y, reference.silu_mul_linear(gate_up, w, b)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("m,n,k", [(1, 40, 200), (5, 33, 96), (16, 64, 130)])
def test_rms_norm_prologue_matches_the_two_ops(dtype, with_residual, m, n, k):
    gen = torch.Generator().manual_seed(m * n + k)
    x = torch.randn(m, k, generator=gen).to(DEV, dtype)
    res = torch.randn(m, k, generator=gen).to(DEV, dtype) if with_residual else None
    norm_w = (1 + 0.1 * torch.randn(k, generator=gen)).to(DEV, dtype)
    w = torch.randn(n, k, generator=gen).to(DEV, dtype)
    stream, y = sk.skinny_rms_norm_linear(x, res, norm_w, 1e-5, w, None, SMALL)
    ref_stream, ref_y = reference.rms_norm_linear(x, res, norm_w, 1e-5, w, None)
    assert torch.equal(stream, ref_stream)  # the residual stream is one rounded add, bit for bit
    s = stream.double()
    exact = F.linear(s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-5) * norm_w.double(), w.double())
    assert y.shape == (m, n) and rel_err(y, exact) < TOL[dtype] and rel_err(y, ref_y) < TOL[dtype]


def test_rows_do_not_depend_on_the_batch():
    """A row's result is the same bits alone or among 16 rows (fixed K order): batch invariance."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(16, 256, generator=gen).to(DEV, DTYPES[-1])
    w = torch.randn(40, 256, generator=gen).to(DEV, DTYPES[-1])
    norm_w = torch.rand(256, generator=gen).to(DEV, DTYPES[-1])
    runs = [
        lambda rows: sk.skinny_linear(x[rows], w, None, SMALL),
        lambda rows: sk.skinny_silu_mul_linear(torch.cat([x, x.flip(1)], 1)[rows], w[:, :256], None, SMALL),
        lambda rows: sk.skinny_rms_norm_linear(x[rows], x.flip(0)[rows], norm_w, 1e-6, w, None, SMALL)[1],
    ]
    for run in runs:
        full = run(slice(0, 16))
        for i in (0, 5, 15):
            assert torch.equal(run(slice(i, i + 1)), full[i : i + 1])
        assert torch.equal(run(slice(0, 7)), full[:7])


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
