"""Drafters propose tokens (chains or trees) that the target verifies in one forward.

Each method's drafter lives in its own module and is found here by name; the engine never branches on it.
"""

from __future__ import annotations

import importlib

from specserve.config import SpeculativeConfig
from specserve.drafters.base import DraftMemory
from specserve.models.config import ModelConfig

# method -> "module:Class" under specserve.drafters, imported on first use
DRAFTERS = {
    "ngram": "ngram:NgramDrafter",
    "draft_model": "draft_model:DraftModelDrafter",
    "medusa": "medusa:MedusaDrafter",
    "eagle": "eagle:EagleDrafter",
    "eagle3": "eagle3:Eagle3Drafter",
    "replay": "replay:ReplayDrafter",  # benchmarks only: a recorded continuation at a set acceptance
}


def _module_and_class(spec: SpeculativeConfig):
    if spec.method not in DRAFTERS:
        raise ValueError(f"speculative method {spec.method!r} is not available; have {sorted(DRAFTERS)}")
    module, cls = DRAFTERS[spec.method].split(":")
    return importlib.import_module(f"specserve.drafters.{module}"), cls


def build_drafter(spec: SpeculativeConfig, target):
    """Instantiate the drafter for spec.method; `target` is the engine's TargetContext."""
    module, cls = _module_and_class(spec)
    return getattr(module, cls)(spec, target)


def draft_memory(spec: SpeculativeConfig, target_config: ModelConfig, block_size: int, elem_size: int,
                 max_num_seqs: int) -> DraftMemory:
    """What spec's drafter will allocate beside the target's KV pool, from its checkpoint's config (no weights)."""
    module, _ = _module_and_class(spec)
    # modules without draft_memory (n-gram, replay) allocate no K/V and read no per-slot table
    sizes = getattr(module, "draft_memory", None)
    return DraftMemory() if sizes is None else sizes(spec, target_config, block_size, elem_size, max_num_seqs)
