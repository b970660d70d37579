"""Attention, KV and fused layer kernels: Triton on CUDA, the torch reference on CPU.

`get_backend(name)` returns the module implementing linear / write_kv / copy_slots / paged_attention / rms_norm /
silu_and_mul / rope_write_kv.
`SPECSERVE_ATTENTION_BACKEND=torch|triton` forces either.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import torch


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (launch configs and plans follow it); 1 off CUDA."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def get_backend(name: str | None, device: torch.device) -> ModuleType:
    name = name or os.environ.get("SPECSERVE_ATTENTION_BACKEND") or "auto"
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        from specserve.kernels import reference

        return reference
    if name == "triton":
        from specserve.kernels import triton_backend

        return triton_backend
    raise ValueError(f"unknown attention backend {name!r}: use 'torch', 'triton' or 'auto'")
