"""The aiohttp application: middlewares (request id, errors, auth, drain) and the routes."""

from __future__ import annotations

import hmac
import logging
import re
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from specserve.config import SpeculativeConfig

from .arms import Arm, ArmSelector
from .async_engine import AsyncEngine
from .chat import chat_completions
from .completions import completions
from .errors import APIError, bad_request, from_http_exception, not_found_model, unavailable
from .metrics import ServerMetrics
from .prompts import chat_prompt
from .protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from .state import REQUEST_ID, STATE, ServerState, base_headers, json_response, read_request, state_of

logger = logging.getLogger(__name__)

UNGUARDED = {"/health"}  # no API key needed, and still answered while draining
_REQUEST_ID = re.compile(r"^[A-Za-z0-9_.:/+=-]{1,128}$")


@dataclass
class ServerConfig:
    model_name: str
    arm_configs: dict[str, SpeculativeConfig | None]  # engine arm name -> config ("none" -> None)
    max_num_seqs: int = 64
    max_queue: int = 256  # sequences waiting beyond the running batch before 429
    api_key: str | None = None
    ab_arms: list[Arm] | None = None
    max_body_bytes: int = 16 * 2**20  # long contexts need more than aiohttp's 1 MiB, but keep a cap
    keep_alive_s: float = 15.0


def build_app(engine: Any, config: ServerConfig) -> web.Application:
    """An app serving `engine`; its engine thread runs from app startup to cleanup."""
    missing = sorted(set(engine.spec_arms) ^ set(config.arm_configs))
    if missing:
        raise ValueError(f"arm configs {sorted(config.arm_configs)} do not match the engine's {engine.spec_arms}")
    metrics = ServerMetrics(config.model_name)
    state = ServerState(
        engine=AsyncEngine(engine, capacity=config.max_num_seqs + config.max_queue, observer=metrics),
        tokenizer=engine.tokenizer,
        model_name=config.model_name,
        max_model_len=engine.max_model_len,
        max_num_seqs=config.max_num_seqs,
        arms=ArmSelector(config.arm_configs, engine.default_arm, config.ab_arms),
        metrics=metrics,
        api_key=config.api_key,
        keep_alive_s=config.keep_alive_s,
    )
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=[_request_id, _errors, _auth, _drain])
    app[STATE] = state
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model}", model)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics_route)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    app.on_startup.append(_start)
    app.on_cleanup.append(_stop)
    return app


async def _start(app: web.Application) -> None:
    app[STATE].engine.start()


async def _stop(app: web.Application) -> None:
    app[STATE].engine.abort_all()
    app[STATE].engine.shutdown()


# ---- middlewares, outermost first ----


@web.middleware
async def _request_id(request: web.Request, handler: Any) -> web.StreamResponse:
    given = request.headers.get("x-request-id", "")
    request[REQUEST_ID] = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
    response = await handler(request)
    if not response.prepared:
        response.headers["x-request-id"] = request[REQUEST_ID]
    return response


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except APIError as e:
        return e.response()
    except web.HTTPException as e:
        return from_http_exception(e).response()
    except Exception:
        logger.exception("unhandled error in %s %s", request.method, request.path)
        return APIError(500, "Internal server error.", type="internal_server_error").response()


@web.middleware
async def _auth(request: web.Request, handler: Any) -> web.StreamResponse:
    key = state_of(request).api_key
    if key is not None and request.path not in UNGUARDED:
        given = request.headers.get("Authorization", "")
        if not given:
            raise APIError(
                401,
                "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.",
                code="invalid_api_key",
            )
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
    return await handler(request)


@web.middleware
async def _drain(request: web.Request, handler: Any) -> web.StreamResponse:
    state = state_of(request)
    if request.path in UNGUARDED or request.path == "/metrics":
        return await handler(request)
    if state.draining:
        raise unavailable("The server is shutting down.")
    state.in_flight += 1
    state.idle.clear()
    try:
        return await handler(request)
    finally:
        state.in_flight -= 1
        if state.in_flight == 0:
            state.idle.set()


# ---- small routes ----


async def models(request: web.Request) -> web.Response:
    return json_response(ModelList([_card(state_of(request))]), base_headers(request))


async def model(request: web.Request) -> web.Response:
    state = state_of(request)
    if request.match_info["model"] != state.model_name:
        raise not_found_model(request.match_info["model"])
    return json_response(_card(state), base_headers(request))


def _card(state: ServerState) -> ModelCard:
    return ModelCard(state.model_name, state.created, "specserve", state.max_model_len)


async def health(request: web.Request) -> web.Response:
    state = state_of(request)
    if not state.engine.alive:
        raise unavailable("The engine loop is not running.")
    if state.draining:
        raise unavailable("The server is shutting down.")
    return web.json_response({"status": "ok"})


async def metrics_route(request: web.Request) -> web.Response:
    return web.Response(body=state_of(request).metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def tokenize(request: web.Request) -> web.Response:
    state = state_of(request)
    req = await read_request(request, TokenizeRequest)
    state.check_model(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("Give exactly one of 'prompt' or 'messages'.", "prompt")
    if req.messages is not None:
        ids = chat_prompt(
            state.tokenizer,
            req.messages,
            add_generation_prompt=req.add_generation_prompt,
            add_special_tokens=bool(req.add_special_tokens),
        ).token_ids
    else:
        add_special = True if req.add_special_tokens is None else req.add_special_tokens
        ids = state.tokenizer.encode(req.prompt, add_special_tokens=add_special)
    strs = state.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
    return json_response(TokenizeResponse(len(ids), state.max_model_len, ids, strs), base_headers(request))


async def detokenize(request: web.Request) -> web.Response:
    state = state_of(request)
    req = await read_request(request, DetokenizeRequest)
    state.check_model(req.model)
    vocab = len(state.tokenizer)
    if any(not 0 <= t < vocab for t in req.tokens):
        raise bad_request(f"tokens must be integers in [0, {vocab}).", "tokens")
    return json_response(DetokenizeResponse(state.tokenizer.decode(req.tokens)), base_headers(request))
