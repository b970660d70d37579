"""Host cost of CUDAGraph.replay() against its node count (one-program Triton kernels, like a model step's), and
launch-to-done time, for one graph and for the same nodes in four graphs launched back to back (H100 output in
graph_launch.txt). Run: python3 -P graph_launch.py"""

import statistics
import time

import torch
import triton
import triton.language as tl


@triton.jit
def _add1(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=m) + 1.0, mask=m)


x = torch.zeros(4096, device="cuda")


def body(k: int) -> None:
    for _ in range(k):
        _add1[(4,)](x, 4096, BLOCK=1024)


def capture(k: int) -> torch.cuda.CUDAGraph:
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        body(k)
    g.replay()
    return g


def med(v) -> float:
    return statistics.median(v) * 1e6


for nodes in (30, 100, 300, 600):
    body(nodes)
    torch.cuda.synchronize()
    g, parts = capture(nodes), [capture(nodes // 4) for _ in range(4)]
    host, total, first4, host4, total4 = [], [], [], [], []
    for _ in range(50):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        g.replay()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        host.append(t1 - t0)
        total.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        parts[0].replay()
        t1 = time.perf_counter()
        for gp in parts[1:]:
            gp.replay()
        t2 = time.perf_counter()
        torch.cuda.synchronize()
        first4.append(t1 - t0)
        host4.append(t2 - t0)
        total4.append(time.perf_counter() - t0)
    print(f"{nodes} nodes: one graph host {med(host):.0f} us, launch->done {med(total):.0f} us | 4 graphs: first "
          f"launch {med(first4):.0f} us, all launches {med(host4):.0f} us, launch->done {med(total4):.0f} us")
