"""Drafters propose tokens (chains or trees) that the target verifies in one forward.

Each method's drafter lives in its own module and is found here by name; the engine never branches on it.
"""

from __future__ import annotations

import importlib

from specserve.config import SpeculativeConfig

# method -> "module:Class" under specserve.drafters, imported on first use
DRAFTERS = {
    "ngram": "ngram:NgramDrafter",
    "draft_model": "draft_model:DraftModelDrafter",
    "medusa": "medusa:MedusaDrafter",
    "eagle": "eagle:EagleDrafter",
    "eagle3": "eagle3:Eagle3Drafter",
    "replay": "replay:ReplayDrafter",  # benchmarks only: a recorded continuation at a set acceptance
}


def build_drafter(spec: SpeculativeConfig, target):
    """Instantiate the drafter for spec.method; `target` is the engine's TargetContext."""
    if spec.method not in DRAFTERS:
        raise ValueError(f"speculative method {spec.method!r} is not available; have {sorted(DRAFTERS)}")
    module, cls = DRAFTERS[spec.method].split(":")
    return getattr(importlib.import_module(f"specserve.drafters.{module}"), cls)(spec, target)
