"""`specserve serve`: flags, engine construction, and a run loop that drains gracefully on SIGTERM.

Shutdown: stop listening, let in-flight requests finish for up to --shutdown-timeout seconds (new ones
get 503), then end whatever is left with finish_reason "abort", stop the engine thread and exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from aiohttp import web

from .app import ServerConfig, build_app
from .arms import arm_configs, arms_for_model, engine_arms
from .state import STATE

logger = logging.getLogger("specserve.server")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"  # what the engine loads when no model is given


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    """The serve flags; adds the shared engine flags too unless the caller already did."""
    from specserve.cli import add_engine_args

    parser.add_argument("model_path", nargs="?", metavar="MODEL", help="same as --model")
    if "--model" not in parser._option_string_actions:  # argparse has no public "is this flag defined"
        add_engine_args(parser)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api-key",
        default=os.environ.get("SPECSERVE_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $SPECSERVE_API_KEY)",
    )
    parser.add_argument("--served-model-name", default=None, help="the model id clients send (default: MODEL)")
    parser.add_argument(
        "--max-queue",
        type=int,
        default=256,
        help="sequences allowed to wait beyond --max-num-seqs before answering 429",
    )
    parser.add_argument("--drafter-config", default=None, help="TOML file of A/B drafter arms per model")
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds in-flight requests get to finish after SIGTERM",
    )


def run_serve(args: argparse.Namespace) -> int:
    """Load the engine, serve until SIGTERM/SIGINT, drain, return the exit code."""
    from specserve.cli import engine_kwargs
    from specserve.config import EngineConfig
    from specserve.engine import LLMEngine

    if args.model_path is not None:
        args.model = args.model_path
    name = args.served_model_name or args.model or DEFAULT_MODEL_NAME
    ab = arms_for_model(args.drafter_config, name) if args.drafter_config else None
    config = EngineConfig(**engine_kwargs(args), speculative_arms=engine_arms(ab or []))
    engine = LLMEngine(config)
    app = build_app(
        engine,
        ServerConfig(
            model_name=name,
            arm_configs=arm_configs(config, engine.default_arm),
            max_num_seqs=config.max_num_seqs,
            max_queue=args.max_queue,
            api_key=args.api_key or None,
            ab_arms=ab,
        ),
    )
    asyncio.run(serve(app, args.host, args.port, args.shutdown_timeout))
    return 0


def make_runner(app: web.Application, shutdown_timeout: float = 5.0) -> web.AppRunner:
    # handler_cancellation: a client that hangs up cancels its handler, whose `finally` aborts the request
    return web.AppRunner(app, handler_cancellation=True, shutdown_timeout=shutdown_timeout, access_log=None)


async def serve(app: web.Application, host: str, port: int, grace: float) -> None:
    runner = make_runner(app)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    logger.info("serving %s on http://%s:%d", app[STATE].model_name, host, port)
    stop = asyncio.Event()

    def on_signal() -> None:
        if stop.is_set():  # a second signal: stop waiting for in-flight requests
            app[STATE].engine.abort_all()
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    await stop.wait()
    await drain(app, site, grace)
    await runner.cleanup()


async def drain(app: web.Application, site: web.BaseSite, grace: float) -> None:
    """Stop listening, give in-flight requests `grace` seconds, then abort the rest."""
    state = app[STATE]
    state.draining = True
    await site.stop()
    logger.info("draining %d in-flight requests (up to %.0f s)", state.in_flight, grace)
    if state.in_flight:
        try:
            await asyncio.wait_for(state.idle.wait(), grace)
        except asyncio.TimeoutError:
            logger.warning("grace period over: aborting %d requests", state.engine.num_requests)
    state.engine.abort_all()
    if state.in_flight:  # aborted streams still send their closing frames
        try:
            await asyncio.wait_for(state.idle.wait(), 5.0)
        except asyncio.TimeoutError:
            pass


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="specserve serve", description=__doc__)
    add_serve_args(parser)
    args = parser.parse_args(argv)
    try:
        return run_serve(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"specserve serve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
