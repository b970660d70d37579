"""kv_cache_memory_gb covers the whole KV pool: the target's K/V, drafters' K/V layers and scratch blocks, and the
per-slot tables drafters read, so the bytes allocated fit the budget with less than one more block to spare."""

from __future__ import annotations

import pytest
import torch
from test_drafters_checkpoints import write_eagle, write_eagle3, write_medusa, write_shared_draft

from specserve.config import EngineConfig
from specserve.drafters.draft_kv import DraftKVCache
from specserve.engine import LLMEngine
from specserve.models.loader import load_model

BUDGET_GB = 2**-9  # 2 MiB: some tens of blocks of the tiny target
ENGINE = dict(device="cpu", dtype="float32", max_num_seqs=4, kv_cache_memory_gb=BUDGET_GB)


@pytest.fixture(scope="module")
def target(tiny_model_dir):
    return tiny_model_dir()


@pytest.fixture(scope="module")
def loaded(target):
    return load_model(target, torch.float32, "cpu")


@pytest.fixture(scope="module")
def checkpoints(target, tmp_path_factory):
    d = tmp_path_factory.mktemp("kv_budget")
    return {
        # two layers and one KV head where the target has three and two: its own config.json sizes its K/V
        "draft_model": write_shared_draft(str(d / "draft"), target, layers=2, num_key_value_heads=1),
        "eagle": write_eagle(str(d / "eagle"), target),
        "eagle3": write_eagle3(str(d / "eagle3"), target),
        "medusa": write_medusa(str(d / "medusa"), target),
    }


def build(target, loaded, arms: dict, **engine) -> LLMEngine:
    return LLMEngine(EngineConfig(model=target, speculative_arms=arms, **{**ENGINE, **engine}), loaded)


def allocated_bytes(engine: LLMEngine) -> int:
    """Bytes of the target's KV pool, every drafter's draft K/V layers and every per-slot table."""
    tensors = [t for kv in engine.runner.kv_caches for t in kv]
    for drafter in engine.drafters.values():
        if isinstance(getattr(drafter, "kv", None), DraftKVCache):
            tensors += [t for kv in drafter.kv.layers for t in kv]
    tensors += [f.table for f in engine.runner.slot_features.values()]
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("names", [
    ["draft_model"], ["eagle"], ["eagle3"], ["medusa"],
    ["eagle", "medusa"],  # one hidden-state table for both
    ["draft_model", "eagle", "eagle3", "eagle3:2", "medusa"],  # the two EAGLE-3 arms share their feature table
], ids="+".join)
def test_budget_covers_drafters_kv_and_tables(target, loaded, checkpoints, names):
    arms = {n: {"method": n.split(":")[0], "model": checkpoints[n.split(":")[0]],
                "num_speculative_tokens": int(n.split(":")[1]) if ":" in n else 3} for n in names}
    plain = build(target, loaded, {}).kv.pool.num_blocks
    engine = build(target, loaded, arms)
    num_blocks = engine.kv.pool.num_blocks
    assert num_blocks < plain
    budget = int(BUDGET_GB * 2**30)
    one_more = build(target, loaded, arms, num_kv_blocks=num_blocks + 1)  # an explicit count wins
    assert one_more.kv.pool.num_blocks == num_blocks + 1
    assert allocated_bytes(engine) <= budget < allocated_bytes(one_more)


@pytest.mark.parametrize("method", ["ngram", "replay"])
def test_drafters_without_kv_keep_the_plain_block_count(target, loaded, method):
    engine = build(target, loaded, {method: {"method": method}})
    plain = build(target, loaded, {})
    assert engine.kv.pool.num_blocks == plain.kv.pool.num_blocks
    assert allocated_bytes(engine) == allocated_bytes(plain) <= int(BUDGET_GB * 2**30)


def test_budget_too_small_for_eagle_scratch_blocks(target, loaded, checkpoints):
    with pytest.raises(ValueError, match="holds no KV block"):
        build(target, loaded, {"eagle": {"method": "eagle", "model": checkpoints["eagle"]}}, kv_cache_memory_gb=2**-14)
