"""`bench serve`: a bounded load test of an OpenAI-compatible chat endpoint (specserve's, vLLM's, ...)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import aiohttp
import numpy as np
from tqdm import tqdm

from specserve.bench.datasets import BenchPrompt
from specserve.bench.prom import ArmAcceptance, acceptance_delta, scrape
from specserve.bench.serve_client import StreamResult, normalize_base_url, stream_chat
from specserve.bench.stats import percentile

QUANTILES = (50, 90, 99)


@dataclass
class ServeConfig:
    base_url: str
    model: str
    dataset: str
    num_prompts: int
    max_tokens: int = 128
    temperature: float = 0.0
    concurrency: int | None = None  # most requests in flight; None with no rate: 1
    request_rate: float | None = None  # Poisson arrivals of prompts per second; None: as fast as allowed
    slo_ttft_s: float | None = None
    slo_tpot_s: float | None = None
    timeout_s: float = 120.0  # per request
    max_duration_s: float = 600.0  # the whole run; what is left then is cancelled and counted as errors
    speculative: str | None = None  # specserve's extra field: force one drafter arm by name
    api_key: str | None = field(default=None, repr=False)  # sent as a bearer token; never written to JSON
    seed: int = 0


@dataclass
class ServeRecord:
    """One turn of one prompt as the client saw it."""

    arm: str  # the server's arm header when it sends one, else the model name
    prompt_id: str
    category: str
    turn: int
    start_s: float  # since the run began
    ttft_s: float | None
    tpot_s: float | None
    latency_s: float
    num_output_tokens: int
    tokens_from_usage: bool
    itl_s: list[float]
    error: str | None

    @classmethod
    def of(cls, r: StreamResult, model: str, p: BenchPrompt, turn: int, start_s: float) -> ServeRecord:
        return cls(
            r.arm or model,
            p.prompt_id,
            p.category,
            turn,
            start_s,
            r.ttft_s,
            r.tpot_s,
            r.latency_s,
            r.num_output_tokens,
            r.tokens_from_usage,
            r.itl_s,
            r.error,
        )


@dataclass
class ServeSummary:
    num_requests: int
    num_ok: int
    num_errors: int
    errors: dict[str, int]  # message -> count
    duration_s: float
    request_throughput: float  # successful requests per second
    output_tok_s: float
    ttft_ms: dict[str, float | None]  # "p50" | "p90" | "p99"
    itl_ms: dict[str, float | None]
    tpot_ms: dict[str, float | None]
    e2e_ms: dict[str, float | None]
    goodput: float | None  # requests per second meeting every SLO given; None without SLOs
    slo_attainment: float | None  # fraction of all requests meeting them (errors count as misses)


@dataclass
class ServeResult:
    config: ServeConfig
    records: list[ServeRecord]
    summary: ServeSummary
    server_acceptance: dict[str, ArmAcceptance] | None  # None: no /metrics page; {}: no drafting seen there
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        acceptance = None
        if self.server_acceptance is not None:
            acceptance = {
                arm: {
                    **asdict(a),
                    "acceptance_rate": a.acceptance_rate,
                    "mean_accepted_length": a.mean_accepted_length,
                }
                for arm, a in self.server_acceptance.items()
            }
        return {
            "kind": "serve",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": {k: v for k, v in asdict(self.config).items() if k != "api_key"},
            "summary": asdict(self.summary),
            "server_acceptance": acceptance,
            "notes": self.notes,
            "requests": [asdict(r) for r in self.records],
        }


def run_serve(config: ServeConfig, prompts: list[BenchPrompt], progress: bool = True) -> ServeResult:
    return asyncio.run(_run(config, prompts, progress))


async def _run(config: ServeConfig, prompts: list[BenchPrompt], progress: bool) -> ServeResult:
    base = normalize_base_url(config.base_url)
    limit = config.concurrency or (len(prompts) if config.request_rate else 1)
    records: list[ServeRecord] = []
    notes: list[str] = []
    connector = aiohttp.TCPConnector(limit=limit)
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else None
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        before = await scrape(session, base)
        gate = asyncio.Semaphore(limit)
        bar = tqdm(total=sum(len(p.turns) for p in prompts), disable=not progress, desc="bench serve", unit="req")
        t0 = time.perf_counter()
        tasks = [
            asyncio.create_task(_session(session, base, config, p, delay, gate, t0, records, bar))
            for p, delay in zip(prompts, _arrivals(config, len(prompts)), strict=True)
        ]
        _, pending = await asyncio.wait(tasks, timeout=config.max_duration_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        duration = time.perf_counter() - t0
        bar.close()
        after = await scrape(session, base) if before is not None else None
    missing = _missing_turns(prompts, records)
    if missing:
        notes.append(f"{len(missing)} requests not finished within --max-duration {config.max_duration_s:g}s")
        records += [
            ServeRecord(
                config.model,
                p.prompt_id,
                p.category,
                t,
                duration,
                None,
                None,
                0.0,
                0,
                False,
                [],
                "cancelled: run exceeded --max-duration",
            )
            for p, t in missing
        ]
    acceptance = acceptance_delta(before, after) if before is not None and after is not None else None
    if acceptance is None:
        notes.append("no /metrics page at the target: server-side acceptance not reported")
    elif not acceptance:
        notes.append("no specserve spec-decode counters moved at /metrics (another server, or no drafting arm)")
    return ServeResult(config, records, summarize_serve(records, duration, config), acceptance, notes)


def _arrivals(config: ServeConfig, n: int) -> list[float]:
    """Start offsets of each prompt: all at 0 (closed loop) or a seeded Poisson process at request_rate."""
    if not config.request_rate:
        return [0.0] * n
    gaps = np.random.default_rng(config.seed).exponential(1.0 / config.request_rate, size=n)
    return list(np.cumsum(gaps) - gaps[0])


async def _session(
    session: aiohttp.ClientSession,
    base: str,
    config: ServeConfig,
    prompt: BenchPrompt,
    delay: float,
    gate: asyncio.Semaphore,
    t0: float,
    records: list[ServeRecord],
    bar: tqdm,
) -> None:
    """All turns of one prompt; turn 2 of MT-bench continues from the server's own first answer."""
    await asyncio.sleep(max(0.0, t0 + delay - time.perf_counter()))
    messages: list[dict[str, str]] = []
    async with gate:
        for turn, text in enumerate(prompt.turns):
            messages.append({"role": "user", "content": text})
            payload = {
                "model": config.model,
                "messages": messages,
                "max_tokens": config.max_tokens,
                "temperature": config.temperature,
            }
            if config.speculative:
                payload["speculative"] = config.speculative
            start = time.perf_counter() - t0
            result = await stream_chat(session, base, payload, timeout_s=config.timeout_s)
            records.append(ServeRecord.of(result, config.model, prompt, turn, start))
            bar.update(1)
            if result.error:
                bar.update(len(prompt.turns) - turn - 1)
                for later in range(turn + 1, len(prompt.turns)):
                    records.append(
                        ServeRecord(
                            config.model,
                            prompt.prompt_id,
                            prompt.category,
                            later,
                            start,
                            None,
                            None,
                            0.0,
                            0,
                            False,
                            [],
                            "skipped: an earlier turn failed",
                        )
                    )
                return
            messages.append({"role": "assistant", "content": result.text})


def _missing_turns(prompts: list[BenchPrompt], records: list[ServeRecord]) -> list[tuple[BenchPrompt, int]]:
    seen = {(r.prompt_id, r.turn) for r in records}
    return [(p, t) for p in prompts for t in range(len(p.turns)) if (p.prompt_id, t) not in seen]


def summarize_serve(records: list[ServeRecord], duration_s: float, config: ServeConfig) -> ServeSummary:
    """Latency percentiles over successful requests; goodput counts those meeting every SLO given."""
    ok = [r for r in records if r.error is None]
    errors: dict[str, int] = {}
    for r in records:
        if r.error is not None:
            errors[r.error] = errors.get(r.error, 0) + 1
    slos = config.slo_ttft_s is not None or config.slo_tpot_s is not None
    good = [r for r in ok if _meets(r, config)]

    def ms(values: list[float]) -> dict[str, float | None]:
        return {f"p{q}": None if (v := percentile(values, q)) is None else v * 1e3 for q in QUANTILES}

    return ServeSummary(
        num_requests=len(records),
        num_ok=len(ok),
        num_errors=len(records) - len(ok),
        errors=errors,
        duration_s=duration_s,
        request_throughput=len(ok) / duration_s if duration_s else 0.0,
        output_tok_s=sum(r.num_output_tokens for r in ok) / duration_s if duration_s else 0.0,
        ttft_ms=ms([r.ttft_s for r in ok if r.ttft_s is not None]),
        itl_ms=ms([gap for r in ok for gap in r.itl_s]),
        tpot_ms=ms([r.tpot_s for r in ok if r.tpot_s is not None]),
        e2e_ms=ms([r.latency_s for r in ok]),
        goodput=len(good) / duration_s if slos and duration_s else None,
        slo_attainment=len(good) / len(records) if slos and records else None,
    )


def _meets(r: ServeRecord, config: ServeConfig) -> bool:
    # A request with a single token has no TPOT: it cannot miss a TPOT SLO.
    if config.slo_ttft_s is not None and (r.ttft_s is None or r.ttft_s > config.slo_ttft_s):
        return False
    return config.slo_tpot_s is None or r.tpot_s is None or r.tpot_s <= config.slo_tpot_s
