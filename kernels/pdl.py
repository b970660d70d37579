"""Programmatic dependent launch (Hopper and later): a kernel launched with it is scheduled while the kernel before
it drains, instead of after; the first thing it does is `tl.extra.cuda.gdc_wait()`, so it reads nothing its
predecessors write before they are done. In a CUDA graph of a small model's step (~230 one-wave kernels) that hides
part of every node's launch latency: 0.71 against 1.02 us a node for trivial kernels on an H100 (RESULTS.md, tenth
session).

Each kernel on the decode path takes `PDL: tl.constexpr` (ENABLED) and starts with `if PDL: gdc_wait()`; its launch
passes `**LAUNCH`. SPECSERVE_PDL=0 turns it off; the CPU interpreter never uses it.
"""

from __future__ import annotations

import os

import torch

ENABLED = (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9
           and os.environ.get("SPECSERVE_PDL", "1") != "0")
LAUNCH = {"launch_pdl": True} if ENABLED else {}
