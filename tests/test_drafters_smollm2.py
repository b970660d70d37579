"""Drafters trained for SmolLM2-135M-Instruct, committed under drafters/weights/smollm2-135m-instruct/<method>/:
greedy speculation through each is token-identical to plain greedy on the real model, and each accepts
more than nothing (a loader that misreads a layout or a feature convention drafts junk and accepts ~0).

One engine serves every committed drafter as a named arm, so the model loads once. Skipped when no weights
are committed.
"""

from __future__ import annotations

import json
import os

import pytest

import specserve.drafters
from specserve.drafters.medusa import CHOICES_KEY
from specserve.llm import LLM
from specserve.sampling_params import SamplingParams

WEIGHTS = os.path.join(os.path.dirname(specserve.drafters.__file__), "weights", "smollm2-135m-instruct")
ARMS = {
    "draft_model": {"num_speculative_tokens": 4},
    "medusa": {"num_speculative_tokens": 8},
    "eagle": {"num_speculative_tokens": 16, "top_k": 4, "depth": 5},
    "eagle3": {"num_speculative_tokens": 16, "top_k": 4, "depth": 5},
}
QUESTIONS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Give me three tips for sleeping better.",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=32)
MIN_TOKENS_PER_STEP = 1.2  # trained drafters on their own target's greedy answers do much better


@pytest.mark.slow
def test_trained_drafters_are_lossless_on_smollm2(request):
    arms = {m: {"method": m, "model": os.path.join(WEIGHTS, m), **extra} for m, extra in ARMS.items()
            if os.path.isfile(os.path.join(WEIGHTS, m, "config.json"))}
    if not arms:
        pytest.skip(f"no trained drafter weights under {WEIGHTS}")
    loaded = request.getfixturevalue("smollm2")
    llm = LLM(device="cpu", dtype="float32", loaded_model=loaded, speculative_arms=arms)
    convs = [[{"role": "user", "content": q}] for q in QUESTIONS]
    plain = [o.outputs[0].token_ids for o in llm.chat(convs, GREEDY, spec_arm="none")]
    for arm in arms:
        outs = llm.chat(convs, GREEDY, spec_arm=arm)
        assert [o.outputs[0].token_ids for o in outs] == plain, f"{arm} changed the greedy output"
        steps = sum(o.metrics.num_steps for o in outs)
        tokens = sum(o.metrics.num_generated_tokens for o in outs)
        assert tokens / steps > MIN_TOKENS_PER_STEP, f"{arm} emits {tokens / steps:.2f} tokens per step"


@pytest.mark.slow
def test_committed_medusa_default_tree_is_its_stored_choices(request):
    """The committed heads' 63-node default tree is the first 63 of their stored choices, in that order."""
    path = os.path.join(WEIGHTS, "medusa")
    if not os.path.isfile(os.path.join(path, "config.json")):
        pytest.skip(f"no Medusa heads under {WEIGHTS}")
    with open(os.path.join(path, "config.json")) as f:
        choices = json.load(f)[CHOICES_KEY]
    llm = LLM(device="cpu", dtype="float32", loaded_model=request.getfixturevalue("smollm2"),
              speculative_config={"method": "medusa", "model": path, "num_speculative_tokens": 63})
    tree = llm.engine.drafters[llm.engine.default_arm].tree
    assert tree.paths == tuple(tuple(p) for p in choices[:63])
    assert all(tree.paths[parent - 1] == p[:-1] for p, parent in zip(tree.paths, tree.parents, strict=True) if parent)
