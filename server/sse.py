"""Server-sent events framed as OpenAI frames them: `data: {json}\n\n` per chunk, `data: [DONE]\n\n` last."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .errors import APIError
from .protocol import encoder

DONE = b"data: [DONE]\n\n"


class EventStream:
    """A streamed response; every `send` is one write, so a step's chunks leave in one packet."""

    def __init__(self, request: web.Request, headers: dict[str, str]) -> None:
        self._request = request
        self.response = web.StreamResponse(
            headers={
                **headers,
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",  # proxies must not hold chunks back
            }
        )

    async def open(self) -> None:
        await self.response.prepare(self._request)

    async def send(self, *events: Any) -> None:
        if events:
            await self.response.write(b"".join(b"data: " + encoder.encode(e) + b"\n\n" for e in events))

    async def fail(self, error: APIError) -> None:
        """A mid-stream failure: the status line is gone, so the error travels as a frame."""
        await self.response.write(b"data: " + encoder.encode(error.body()) + b"\n\n" + DONE)
        await self.response.write_eof()

    async def keep_alive(self) -> None:
        """An SSE comment: proxies see traffic while a request waits in the queue; clients skip it."""
        await self.response.write(b": keep-alive\n\n")

    async def done(self) -> None:
        await self.response.write(DONE)
        await self.response.write_eof()
