"""Programmatic dependent launch (Hopper and later): a kernel launched with it is scheduled while the kernel before
it drains, instead of after; the first thing it does is `tl.extra.cuda.gdc_wait()`, so it reads nothing its
predecessors write before they are done. In a CUDA graph of a small model's step (~230 one-wave kernels) that hides
part of every node's launch latency: 0.71 against 1.02 us a node for trivial kernels on an H100 (RESULTS.md, tenth
session).

Each kernel on the decode path takes `PDL: tl.constexpr` and starts with `pdl.enter(PDL)` (the wait, then the trigger
below); its launch passes `**flags()`, which turns it on only for launches captured into CUDA graphs: on SmolLM2 the
graph forward took 0.74 against 0.78 ms with it, but 8 prompts at once (eager prefill included) ran at 6,300-6,700
against 7,900 tok/s with it on every launch (not understood). On by default; SPECSERVE_PDL=0 turns it off. The CPU
interpreter never uses it. Captures that failed now and then ("operation failed due to a previous error during
capture", most often with the trigger below, whose kernel variants compile during the capture) were the cycle
collector freeing an earlier engine's CUDA graphs mid-capture: cuda_graphs.collector_paused (RESULTS.md, thirteenth
session).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

ENABLED = (os.environ.get("SPECSERVE_PDL", "1") != "0" and torch.cuda.is_available()
           and torch.cuda.get_device_capability()[0] >= 9)
# Each kernel lets the next one launch as soon as its own wait is over, so the next kernel's programs are scheduled
# while this one runs and wait at their gdc_wait; without it the next launches when this one's programs exit. H100,
# one process each way (RESULTS.md, twelfth session): SmolLM2's graph forward 0.645 against 0.745 ms, the 8B shape's
# decode step 6.09 against 6.18 ms. SPECSERVE_PDL_TRIGGER=0 turns it off.
TRIGGER = os.environ.get("SPECSERVE_PDL_TRIGGER", "1") != "0"


def flags() -> dict:
    """A launch's PDL constexpr (0 off, 1 wait, 2 wait then trigger) and launch option: on while a CUDA graph is
    being captured."""
    if ENABLED and torch.cuda.is_current_stream_capturing():
        return {"PDL": 2 if TRIGGER else 1, "launch_pdl": True}
    return {"PDL": 0}


@triton.jit
def enter(PDL: tl.constexpr):
    """A kernel's first step: under PDL wait until the kernels before it are done (their writes visible); PDL 2 then
    lets the next kernel launch."""
    if PDL:
        tl.extra.cuda.gdc_wait()
    if PDL == 2:
        tl.extra.cuda.gdc_launch_dependents()
