"""Reading drafter checkpoints in their authors' layouts: config.json plus one weights file.

Errors name the problem: a missing directory or file, tensors the checkpoint lacks or has in excess, and
shapes that disagree with the target (hidden size, vocabulary).
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn


def read_config(path: str) -> dict:
    """The checkpoint directory's config.json as a dict."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"drafter checkpoint {path!r} is not a directory")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"drafter checkpoint {path!r} has no config.json")
    with open(cfg_path) as f:
        return json.load(f)


def read_tensors(path: str, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """All tensors of the first of `names` present in path (.safetensors, or a torch .bin/.pt state dict)."""
    for name in names:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            continue
        if name.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(file)
        return torch.load(file, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"drafter checkpoint {path!r} has none of {', '.join(names)}")


def check_names(tensors: dict[str, torch.Tensor], required: set[str], optional: set[str], what: str) -> None:
    """ValueError listing the required tensors that are missing, or the tensors nobody expects."""
    missing = sorted(required - tensors.keys())
    if missing:
        raise ValueError(f"{what} lacks {len(missing)} tensors: {', '.join(missing)}")
    unexpected = sorted(tensors.keys() - required - optional)
    if unexpected:
        raise ValueError(f"{what} has {len(unexpected)} unexpected tensors: {', '.join(unexpected)}")


def check_dim(what: str, got: int, target: int, name: str) -> None:
    """ValueError when a checkpoint dimension (hidden size, vocabulary) disagrees with the target's."""
    if got != target:
        raise ValueError(f"{what} has {name} {got}, but the target model's {name} is {target}")


@torch.no_grad()
def load_module(module: nn.Module, tensors: dict[str, torch.Tensor], what: str) -> None:
    """Copy tensors into module's parameters and buffers by name (all of them, cast to theirs), checking shapes."""
    state = module.state_dict()
    check_names(tensors, set(state), set(), what)
    for name, dst in state.items():
        src = tensors[name]
        if src.shape != dst.shape:
            raise ValueError(f"{what} tensor {name} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
    module.load_state_dict(tensors)
