"""What every handler needs: the engine, the tokenizer, the arms, the metrics and the server's limits."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from .arms import ArmSelector
from .async_engine import AsyncEngine
from .errors import not_found_model
from .metrics import ServerMetrics
from .protocol import decode, encoder

T = TypeVar("T")


@dataclass
class ServerState:
    engine: AsyncEngine
    tokenizer: Any
    model_name: str
    max_model_len: int
    max_num_seqs: int
    arms: ArmSelector
    metrics: ServerMetrics
    api_key: str | None = None
    keep_alive_s: float = 15.0  # SSE comment after this long without output (queued or slow requests)
    created: int = field(default_factory=lambda: int(time.time()))
    draining: bool = False  # SIGTERM seen: refuse new work, let in-flight requests finish
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set whenever in_flight drops to 0

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise not_found_model(model)


STATE = web.AppKey("specserve_state", ServerState)
REQUEST_ID = web.RequestKey("specserve_request_id", str)


def state_of(request: web.Request) -> ServerState:
    return request.app[STATE]


async def read_request(request: web.Request, cls: type[T]) -> T:
    """The body decoded as `cls` (413 past the app's client_max_size, 400 for bad JSON or types)."""
    return decode(await request.read(), cls)


def base_headers(request: web.Request) -> dict[str, str]:
    return {"x-request-id": request[REQUEST_ID]}


def json_response(obj: msgspec.Struct, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=encoder.encode(obj), content_type="application/json", headers=headers)
