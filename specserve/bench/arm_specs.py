"""Drafter arms named on the command line: `none,ngram,ngram:k=8,eagle:PATH,medusa:PATH:k=6,...`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from specserve.config import SpeculativeConfig

BASELINE = "none"


@dataclass(frozen=True)
class BenchArm:
    """One drafter configuration to benchmark; `speculative_config` None is plain decoding."""

    name: str
    speculative_config: dict[str, Any] | None


def parse_drafters(spec: str) -> list[BenchArm]:
    """Comma-separated `method[:PATH][:key=value...]`; `k` means num_speculative_tokens. Baseline first."""
    arms = [parse_arm(part.strip()) for part in spec.split(",") if part.strip()]
    if not arms:
        raise ValueError("--drafters names no arms")
    return with_baseline(arms)


def parse_arm(spec: str) -> BenchArm:
    """One `method[:PATH][:key=value...]` item, validated by SpeculativeConfig before any model loads."""
    method, *parts = spec.split(":")
    if method == BASELINE:
        if parts:
            raise ValueError(f"drafter {spec!r}: 'none' takes no options")
        return BenchArm(BASELINE, None)
    config: dict[str, Any] = {"method": method}
    name_parts = [method]
    for part in parts:
        if "=" in part:
            key, value = part.split("=", 1)
            key = "num_speculative_tokens" if key == "k" else key
            config[key] = _parse_value(value)
            name_parts.append(part)
        elif "model" in config:
            raise ValueError(f"drafter {spec!r}: more than one checkpoint path")
        else:
            config["model"] = part
            name_parts.append(Path(part).name or part)  # the basename keeps table columns readable
    try:
        SpeculativeConfig.parse(config)
    except (TypeError, ValueError) as e:
        raise ValueError(f"drafter {spec!r}: {e}") from None
    return BenchArm(":".join(name_parts), config)


def with_baseline(arms: list[BenchArm]) -> list[BenchArm]:
    """The `none` arm first, added if absent: speedups and greedy equality are measured against it."""
    names = [a.name for a in arms]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"drafter arms named twice: {duplicates}")
    base = [a for a in arms if a.speculative_config is None] or [BenchArm(BASELINE, None)]
    if len(base) > 1:
        raise ValueError(f"more than one arm without a drafter: {[a.name for a in base]}")
    return base + [a for a in arms if a.speculative_config is not None]


def arms_from_drafter_config(path: str, model_name: str) -> list[BenchArm]:
    """The arms that a serving A/B config file gives `model_name` (traffic weights do not matter offline)."""
    from specserve.server.arms import arms_for_model  # the server owns the file format and its checks

    return with_baseline([BenchArm(a.name, a.speculative_config) for a in arms_for_model(path, model_name)])


def _parse_value(text: str) -> Any:
    """Ints, floats and JSON (trees) as such; anything else stays a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
