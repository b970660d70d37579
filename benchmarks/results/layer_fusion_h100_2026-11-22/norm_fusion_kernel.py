"""Time of the few-row kernel with the RMSNorm / residual add / SiLU-and-multiply flags of commit e937f50 (run from a
checkout of that commit: the flags are gone since), with its registers and spills (H100 output in
norm_fusion_kernel.txt). Run: python3 -P norm_fusion_kernel.py"""

import sys

import torch
import triton

sys.path.insert(0, "benchmarks")
from bench_linear import graph_time  # noqa: E402

from specserve.kernels import skinny_linear as sk  # noqa: E402

dev, dt = "cuda", torch.bfloat16
for n, k in [(6144, 4096), (28672, 4096), (960, 576), (3072, 576)]:
    x, r = torch.randn(1, k, device=dev, dtype=dt), torch.randn(1, k, device=dev, dtype=dt)
    g = torch.ones(k, device=dev, dtype=dt)
    ws = [torch.randn(n, k, device=dev, dtype=dt) * 0.02 for _ in range(max(1, (512 << 20) // (n * k * 2)))]
    cfg = sk.config_for(k)
    variants = {"plain": (None, None, False), "norm": (None, g, False), "res+norm": (r, g, False),
                "gated": (None, None, True), "res+norm+gated": (r, g, True)}
    for name, (res, norm, gated) in variants.items():
        t = graph_time(lambda i, x=x, ws=ws, cfg=cfg, res=res, norm=norm, gated=gated: sk._launch(
            x, res, norm, 1e-5, ws[i % len(ws)], None, gated, cfg), 64) * 1e6
        stream, y = torch.empty_like(x), torch.empty(1, n, device=dev, dtype=dt)
        ck = sk._skinny_kernel[(triton.cdiv(n, cfg.block_n),)](
            x, r if res is not None else x, stream, g if norm is not None else ws[0], ws[0], ws[0], y, 1, n, k, 1e-5,
            x.stride(0), x.stride(0), x.stride(0), ws[0].stride(0), y.stride(0), NORM=norm is not None,
            HAS_RES=res is not None, GATED=gated, HAS_BIAS=False, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            DOT_PREC="tf32", num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        print(f"{n}x{k} {name}: {t:.1f} us  regs {ck.n_regs} spills {ck.n_spills}", flush=True)
