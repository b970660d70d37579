"""Attention, KV and fused layer kernels: Triton on CUDA, the torch reference on CPU.

`get_backend(name)` returns the module implementing linear / write_kv / copy_slots / paged_attention / rms_norm /
silu_and_mul / rope_write_kv.
`SPECSERVE_ATTENTION_BACKEND=torch|triton` forces either.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch


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
