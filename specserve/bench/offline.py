"""`bench offline`: every drafter arm over one prompt set through one engine; acceptance and speed."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

from tqdm import tqdm

from specserve.bench.arm_specs import BenchArm
from specserve.bench.datasets import BenchPrompt
from specserve.bench.records import BatchRecord, RequestRecord
from specserve.bench.summary import ArmSummary, summarize
from specserve.outputs import RequestOutput
from specserve.sampling_params import SamplingParams

NO_SPEC = "none"  # the engine's arm without a drafter


@dataclass
class OfflineConfig:
    """What to run; everything here lands in the JSON so that a result says how it was made."""

    arms: list[BenchArm]
    dataset: str
    num_prompts: int | None
    max_tokens: int = 256
    temperature: float = 0.0
    seed: int = 0
    batch_size: int = 1  # 1: the latency use case, one request at a time
    warmup: bool = True  # one short untimed request per arm first (allocator and kernel warm-up)
    ignore_eos: bool = False
    model: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    # Off by default: arms run the same prompts back to back, so with caching every arm after the first
    # would prefill from cache and win TTFT unfairly.
    enable_prefix_caching: bool = False


class Generator(Protocol):
    """The part of `specserve.LLM` the benchmark drives."""

    def generate(self, prompts: list[str], params: list[SamplingParams], *, spec_arm: str) -> list[RequestOutput]: ...

    def chat(
        self, messages: list[list[dict]], params: list[SamplingParams], *, spec_arm: str
    ) -> list[RequestOutput]: ...


@dataclass
class OfflineResult:
    config: OfflineConfig
    baseline: str
    records: list[RequestRecord]
    batches: list[BatchRecord]
    summaries: dict[str, ArmSummary] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "offline",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": asdict(self.config),
            "baseline": self.baseline,
            "summary": {arm: s.to_json() for arm, s in self.summaries.items()},
            "batches": [asdict(b) for b in self.batches],
            "requests": [r.to_json() for r in self.records],
        }


def load_llm(config: OfflineConfig, loaded_model=None):
    """One engine holding every drafting arm, so the model loads once; `loaded_model` reuses loaded weights."""
    from specserve import LLM

    arms = {a.name: a.speculative_config for a in config.arms if a.speculative_config is not None}
    return LLM(
        model=config.model,
        loaded_model=loaded_model,
        device=config.device,
        dtype=config.dtype,
        speculative_arms=arms,
        enable_prefix_caching=config.enable_prefix_caching,
        seed=config.seed,
    )


def run_offline(
    llm: Generator, config: OfflineConfig, prompts: list[BenchPrompt], progress: bool = True
) -> OfflineResult:
    """Arms interleaved per batch of prompts (prompt 1 arm A, prompt 1 arm B, ...) so drift hits all alike."""
    baseline = config.arms[0].name
    if config.warmup:
        for arm in config.arms:
            _run_turn(llm, _engine_arm(arm), [prompts[0]], [[]], 0, [_params(config, 0, max_tokens=8)])
    records, batches = [], []
    total = len(config.arms) * sum(len(p.turns) for p in prompts)
    with tqdm(total=total, disable=not progress, desc="bench offline", unit="req") as bar:
        for batch, start in enumerate(range(0, len(prompts), config.batch_size)):
            chunk = prompts[start : start + config.batch_size]
            for arm in config.arms:
                recs, wall = _run_chunk(llm, arm, chunk, config, start, batch, bar)
                records += recs
                batches.append(BatchRecord(arm.name, batch, wall, sum(r.num_output_tokens for r in recs)))
    summaries = summarize(records, batches, baseline=baseline, greedy=config.temperature == 0.0, seed=config.seed)
    return OfflineResult(config, baseline, records, batches, summaries)


def _run_chunk(
    llm: Generator,
    arm: BenchArm,
    chunk: list[BenchPrompt],
    config: OfflineConfig,
    first_index: int,
    batch: int,
    bar,
) -> tuple[list[RequestRecord], float]:
    """All turns of a few prompts under one arm; later turns continue from the arm's own earlier answers."""
    history: list[list[dict]] = [[] for _ in chunk]
    records = []
    start = time.perf_counter()
    for turn in range(max(len(p.turns) for p in chunk)):
        active = [i for i, p in enumerate(chunk) if turn < len(p.turns)]
        params = [_params(config, first_index + i, config.max_tokens) for i in active]
        outs = _run_turn(llm, _engine_arm(arm), [chunk[i] for i in active], [history[i] for i in active], turn, params)
        for i, out in zip(active, outs, strict=True):
            p = chunk[i]
            history[i] += [
                {"role": "user", "content": p.turns[turn]},
                {"role": "assistant", "content": out.outputs[0].text},
            ]
            records.append(
                RequestRecord.from_output(
                    out, arm=arm.name, prompt_id=p.prompt_id, category=p.category, turn=turn, batch=batch
                )
            )
        bar.update(len(active))
    return records, time.perf_counter() - start


def _run_turn(
    llm: Generator,
    spec_arm: str,
    prompts: list[BenchPrompt],
    history: list[list[dict]],
    turn: int,
    params: list[SamplingParams],
) -> list[RequestOutput]:
    """One turn of several prompts as one batch: chats get the template, completions (HumanEval) do not."""
    # NOTE: a batch is homogeneous in practice (one dataset); a mixed one runs as two sub-batches.
    outs: dict[int, RequestOutput] = {}
    chats = [i for i, p in enumerate(prompts) if p.chat]
    plain = [i for i, p in enumerate(prompts) if not p.chat]
    if chats:
        convs = [history[i] + [{"role": "user", "content": prompts[i].turns[turn]}] for i in chats]
        outs.update(zip(chats, llm.chat(convs, [params[i] for i in chats], spec_arm=spec_arm), strict=True))
    if plain:
        texts = [prompts[i].turns[turn] for i in plain]
        outs.update(zip(plain, llm.generate(texts, [params[i] for i in plain], spec_arm=spec_arm), strict=True))
    return [outs[i] for i in range(len(prompts))]


def _params(config: OfflineConfig, index: int, max_tokens: int) -> SamplingParams:
    # Seeded per prompt, not per arm: sampled arms see the same random stream for the same prompt.
    return SamplingParams(
        temperature=config.temperature,
        max_tokens=max_tokens,
        seed=config.seed + index,
        ignore_eos=config.ignore_eos,
    )


def _engine_arm(arm: BenchArm) -> str:
    return NO_SPEC if arm.speculative_config is None else arm.name
