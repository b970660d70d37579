"""Drafter arms: the A/B config file (`--drafter-config`) and the choice of arm for each request.

The file is TOML with one table per served model name, each holding a list of arms:

    ["SmolLM2-135M-Instruct"]
    arms = [
      { name = "baseline", weight = 1 },                     # no speculative_config: plain decoding
      { name = "ngram4", weight = 3, speculative_config = { method = "ngram", num_speculative_tokens = 4 } },
    ]

A request that names no arm gets one at random in proportion to the weights; with a `user` field the draw
is a hash of the user, so one user always lands on the same arm (sticky A/B). Weight 0 keeps an arm
reachable only by asking for it.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Any

import tomllib

from specserve.config import EngineConfig, SpeculativeConfig

from .errors import bad_request
from .protocol import SpeculativeChoice

NO_SPEC = "none"  # the engine's name for plain decoding
_ARM_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")  # it becomes a metric label and a response header
_ARM_KEYS = {"name", "weight", "speculative_config"}


@dataclass(frozen=True)
class Arm:
    name: str
    speculative_config: dict[str, Any] | None  # None: plain decoding
    weight: float = 1.0


def load_drafter_config(path: str) -> dict[str, list[Arm]]:
    """Read and check a drafter A/B file; raise ValueError saying what is wrong and where."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ValueError(f"drafter config {path}: cannot read it: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"drafter config {path}: not valid TOML: {e}") from None
    return parse_drafter_config(data, source=path)


def arms_for_model(path: str, model_name: str) -> list[Arm]:
    """The arms a drafter file lists for one served model; ValueError if it lists none."""
    models = load_drafter_config(path)
    if model_name not in models:
        raise ValueError(
            f"drafter config {path} has no table for the served model {model_name!r} (it has {sorted(models)})"
        )
    return models[model_name]


def parse_drafter_config(data: dict[str, Any], source: str = "<drafter config>") -> dict[str, list[Arm]]:
    """The checked form of an already-parsed drafter file: model name -> arms."""
    if not data:
        raise ValueError(f'drafter config {source}: no model tables; expected ["<model name>"] arms = [...]')
    models = {}
    for model, table in data.items():
        where = f"drafter config {source}: model {model!r}"
        if not isinstance(table, dict):
            raise ValueError(f"{where}: expected a table with an 'arms' list")
        unknown = sorted(set(table) - {"arms"})
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; only 'arms' is allowed")
        arms = table.get("arms")
        if not isinstance(arms, list) or not arms:
            raise ValueError(f"{where}: 'arms' must be a non-empty list of tables")
        models[model] = [_parse_arm(arm, f"{where} arm #{i}") for i, arm in enumerate(arms)]
        names = [a.name for a in models[model]]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"{where}: arm names must be unique, repeated: {dupes}")
        if not any(a.weight > 0 for a in models[model]):
            raise ValueError(f"{where}: at least one arm needs a weight > 0")
    return models


def _parse_arm(arm: Any, where: str) -> Arm:
    if not isinstance(arm, dict):
        raise ValueError(f"{where}: expected a table like {{ name = ..., weight = ... }}")
    unknown = sorted(set(arm) - _ARM_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; allowed: {sorted(_ARM_KEYS)}")
    name = arm.get("name")
    if not isinstance(name, str) or not _ARM_NAME.match(name):
        raise ValueError(f"{where}: 'name' must be 1-64 characters of [A-Za-z0-9_.:-], got {name!r}")
    weight = arm.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < float("inf"):
        raise ValueError(f"{where} ({name}): 'weight' must be a finite number >= 0, got {weight!r}")
    spec = arm.get("speculative_config")
    if spec is not None:
        if name == NO_SPEC:
            raise ValueError(f"{where}: the arm named 'none' is plain decoding and takes no speculative_config")
        try:
            SpeculativeConfig.parse(spec)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where} ({name}): {e}") from None
    return Arm(name, spec, float(weight))


def engine_arms(arms: list[Arm]) -> dict[str, dict[str, Any]]:
    """The `EngineConfig.speculative_arms` that serve these A/B arms (plain arms need none)."""
    return {a.name: a.speculative_config for a in arms if a.speculative_config is not None}


def arm_configs(config: EngineConfig, default_arm: str) -> dict[str, SpeculativeConfig | None]:
    """Every arm of an engine built from `config`, by the engine's names (`default_arm`: the default)."""
    configs: dict[str, SpeculativeConfig | None] = {NO_SPEC: None, **config.speculative_arms}
    if config.speculative_config is not None:
        configs[default_arm] = config.speculative_config
    return configs


@dataclass(frozen=True)
class ArmChoice:
    engine_arm: str  # the name the engine knows ("none" for plain decoding)
    label: str  # the name clients and metrics see


class ArmSelector:
    """Picks the arm of each request: the one it names, else an A/B draw, else the engine's default."""

    def __init__(
        self,
        configs: dict[str, SpeculativeConfig | None],
        default: str,
        ab_arms: list[Arm] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._configs = configs  # engine arm name -> its config (None for "none")
        self._default = default
        self._ab = [a for a in ab_arms or [] if a.weight > 0]
        self._labels = {a.name: a for a in ab_arms or []}
        self._rng = rng or random.Random()

    @property
    def names(self) -> list[str]:
        return sorted(set(self._configs) | set(self._labels))

    def choose(self, wanted: str | SpeculativeChoice | None, user: str | None) -> ArmChoice:
        if wanted is None:
            return self._draw(user) if self._ab else ArmChoice(self._default, self._default)
        if isinstance(wanted, str):
            return self._by_name(wanted)
        return self._by_method(wanted)

    def _by_name(self, name: str) -> ArmChoice:
        if name in self._labels:
            return self._of(self._labels[name])
        if name in self._configs:
            return ArmChoice(name, name)
        raise bad_request(f"Unknown speculative arm {name!r}; this server has {self.names}.", param="speculative")

    def _by_method(self, wanted: SpeculativeChoice) -> ArmChoice:
        for name, cfg in self._configs.items():
            if cfg is None:
                continue
            if cfg.method == wanted.method and wanted.num_speculative_tokens in (
                None,
                cfg.num_speculative_tokens,
            ):
                return ArmChoice(name, name)
        have = sorted(cfg.arm_name for cfg in self._configs.values() if cfg is not None)
        k = wanted.num_speculative_tokens
        raise bad_request(
            f"No speculative arm with method {wanted.method!r}"
            + (f" and num_speculative_tokens={k}" if k is not None else "")
            + f"; this server has {have or 'no speculative arms'} (or 'none').",
            param="speculative",
        )

    def _draw(self, user: str | None) -> ArmChoice:
        total = sum(a.weight for a in self._ab)
        if user is not None:
            digest = hashlib.sha256(user.encode("utf-8", "surrogatepass")).digest()
            u = int.from_bytes(digest[:8], "big") / 2**64
        else:
            u = self._rng.random()
        point = u * total
        for arm in self._ab:
            point -= arm.weight
            if point < 0:
                return self._of(arm)
        return self._of(self._ab[-1])

    @staticmethod
    def _of(arm: Arm) -> ArmChoice:
        return ArmChoice(NO_SPEC if arm.speculative_config is None else arm.name, arm.name)
