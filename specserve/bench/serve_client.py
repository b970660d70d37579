"""One streaming chat completion against an OpenAI-compatible server, timed chunk by chunk."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp


@dataclass
class StreamResult:
    """What one streamed request returned; `error` set means it failed and its timings are partial."""

    text: str = ""
    ttft_s: float | None = None
    latency_s: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # seconds since send of each chunk with text
    num_output_tokens: int = 0
    tokens_from_usage: bool = False  # False: counted as text chunks (the server sent no usage)
    arm: str | None = None  # the server's arm header, when it sends one
    error: str | None = None

    @property
    def itl_s(self) -> list[float]:
        """Gaps between text chunks (a speculative server may send several tokens per chunk)."""
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:], strict=False)]

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.num_output_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.num_output_tokens - 1)


def normalize_base_url(url: str) -> str:
    """`http://host:port`, `.../` and `.../v1` all name the same server root."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


async def stream_chat(
    session: aiohttp.ClientSession,
    base_url: str,
    payload: dict[str, Any],
    *,
    timeout_s: float,
    arm_header: str = "x-specserve-arm",
) -> StreamResult:
    """POST /v1/chat/completions with stream=true and parse the SSE events; never raises for server faults."""
    body = {**payload, "stream": True, "stream_options": {"include_usage": True}}
    result = StreamResult()
    start = time.perf_counter()
    try:
        async with session.post(
            f"{base_url}/v1/chat/completions", json=body, timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as resp:
            result.arm = resp.headers.get(arm_header)
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return result
            await _read_events(resp, result, start)
    except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
        result.error = f"timeout after {timeout_s:g}s"
    except aiohttp.ClientError as e:
        result.error = f"{type(e).__name__}: {e}"
    finally:
        result.latency_s = time.perf_counter() - start
    return result


async def _read_events(resp: aiohttp.ClientResponse, result: StreamResult, start: float) -> None:
    done = False
    parts: list[str] = []
    chunks_with_text = 0
    async for raw in resp.content:
        line = raw.decode("utf-8").strip()
        if not line.startswith("data:"):
            continue  # blank separators, comments (": keep-alive") and event/id fields carry no tokens
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            done = True
            break
        try:
            event = json.loads(data)
        except json.JSONDecodeError:
            result.error = f"bad SSE data: {data[:100]}"
            return
        if "error" in event:
            result.error = f"stream error: {str(event['error'])[:200]}"
            return
        text = "".join((c.get("delta") or {}).get("content") or "" for c in event.get("choices") or [])
        if text:
            now = time.perf_counter() - start
            result.ttft_s = now if result.ttft_s is None else result.ttft_s
            result.chunk_times.append(now)
            parts.append(text)
            chunks_with_text += 1
        usage = event.get("usage")
        if usage and usage.get("completion_tokens") is not None:
            result.num_output_tokens = int(usage["completion_tokens"])
            result.tokens_from_usage = True
    result.text = "".join(parts)
    if not result.tokens_from_usage:
        result.num_output_tokens = chunks_with_text
    if not done:
        result.error = "stream ended without data: [DONE]"
