"""The engine behind an asyncio server: one thread owns the engine, handlers talk to it through queues.

The engine is not thread-safe, so only the engine thread touches it. Handlers send add/abort commands
through a thread-safe queue; after each step the thread posts the step's outputs to the event loop
(`call_soon_threadsafe`), which hands each to the OutputSink of the API call that owns the request.
Outputs are cumulative, so a sink keeps only the newest one per request: a slow client never makes
outputs pile up, it just gets bigger deltas.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

from specserve.outputs import CompletionOutput, RequestMetrics, RequestOutput
from specserve.sampling_params import SamplingParams

from .arms import ArmChoice
from .errors import APIError, bad_request, server_error, unavailable

logger = logging.getLogger(__name__)


class StepObserver(Protocol):
    """Told about requests and steps from inside the engine thread (metrics)."""

    def on_add(self, request_id: str, label: str, num_prompt_tokens: int, num_seqs: int) -> None: ...
    def on_outputs(self, outputs: list[RequestOutput]) -> None: ...
    def on_abort(self, request_id: str) -> None: ...
    def on_stats(self, stats: Any) -> None: ...


class OutputSink:
    """Newest output of each request of one API call; the handler awaits `next()` for what changed."""

    def __init__(self) -> None:
        self._updates: dict[str, RequestOutput] = {}
        self._event = asyncio.Event()
        self._error: APIError | None = None

    def push(self, output: RequestOutput) -> None:
        self._updates[output.request_id] = output
        self._event.set()

    def fail(self, error: APIError) -> None:
        self._error = error
        self._event.set()

    async def next(self) -> list[RequestOutput]:
        """Outputs that changed since the last call; raises the APIError that ended the call."""
        await self._event.wait()
        self._event.clear()
        if self._error is not None:
            raise self._error
        updates, self._updates = list(self._updates.values()), {}
        return updates


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arm: ArmChoice
    ack: asyncio.Future[None]


@dataclass
class _Abort:
    request_id: str


_STOP = object()


@dataclass
class _Live:
    """A request the loop side is waiting on."""

    sink: OutputSink
    num_seqs: int
    prompt_token_ids: list[int]
    arrival_time: float
    ack: asyncio.Future[None]  # resolved when the engine thread has taken (or refused) the request
    last: RequestOutput | None = None


class AsyncEngine:
    """Runs `engine.step()` in a dedicated thread and routes outputs to asyncio sinks."""

    def __init__(self, engine: Any, *, capacity: int, observer: StepObserver | None = None) -> None:
        self.engine = engine
        self.capacity = capacity  # sequences (requests x n) admitted at once, running plus waiting
        self._observer = observer
        self._commands: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._live: dict[str, _Live] = {}  # loop thread only
        self._num_seqs = 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failure: BaseException | None = None
        self._stats: Any = None

    # ---- loop side ----

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stats = self.engine.stats()
        self._thread = threading.Thread(target=self._run, name="specserve-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._failure is None

    @property
    def num_requests(self) -> int:
        return len(self._live)

    def stats(self) -> Any:
        """The engine's stats as of the thread's last iteration (never calls into the engine)."""
        return self._stats

    async def add(
        self,
        sink: OutputSink,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arm: ArmChoice,
    ) -> None:
        """Queue a request and wait until the engine has taken it (or refused it)."""
        if not self.alive:
            raise unavailable("The engine loop is not running.")
        if self._num_seqs + params.n > self.capacity:
            raise APIError(
                429,
                f"The server is overloaded: {self._num_seqs} sequences are already running or queued "
                f"(limit {self.capacity}). Retry later.",
                type="rate_limit_error",
                code="server_overloaded",
                retry_after=1,
            )
        assert self._loop is not None
        ack = self._loop.create_future()
        self._live[request_id] = _Live(sink, params.n, prompt_token_ids, time.time(), ack)
        self._num_seqs += params.n
        self._commands.put(_Add(request_id, prompt_token_ids, params, arm, ack))
        try:
            await ack
        except BaseException:
            # Refused, or the caller went away while waiting: the engine may have taken it by now.
            self._forget(request_id)
            self._commands.put(_Abort(request_id))
            raise

    def abort(self, request_id: str) -> None:
        """Stop generating for a request the caller no longer wants (idempotent)."""
        if self._forget(request_id):
            self._commands.put(_Abort(request_id))

    def abort_all(self) -> None:
        """End every live request with finish_reason "abort" (shutdown after the grace period)."""
        for request_id, live in list(self._live.items()):
            live.sink.push(_aborted(request_id, live))
            self.abort(request_id)

    def shutdown(self, timeout: float = 10.0) -> None:
        self._commands.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout)

    def _forget(self, request_id: str) -> bool:
        live = self._live.pop(request_id, None)
        if live is not None:
            self._num_seqs -= live.num_seqs
        return live is not None

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            live = self._live.get(out.request_id)
            if live is None:  # aborted after the step began
                continue
            live.last = out
            live.sink.push(out)
            if out.finished:
                self._forget(out.request_id)

    def _fail(self, request_ids: list[str] | None, error: APIError) -> None:
        for request_id in list(self._live) if request_ids is None else request_ids:
            live = self._live.get(request_id)
            if live is not None:
                live.sink.fail(error)
                _settle(live.ack, error)  # a request still waiting to be taken must hear it too
                self._forget(request_id)

    def _post(self, fn: Any, *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)  # type: ignore[union-attr]
        except RuntimeError:  # the loop closed under us: nobody is left to tell
            pass

    # ---- engine thread ----

    def _run(self) -> None:
        running: set[str] = set()  # requests the engine holds
        try:
            while True:
                for command in self._drain(block=not self.engine.has_unfinished_requests()):
                    if command is _STOP:  # after the aborts queued before it: the engine is left empty
                        return
                    self._apply(command, running)
                if self.engine.has_unfinished_requests():
                    self._step(running)
                self._stats = self.engine.stats()
                if self._observer is not None:
                    self._observer.on_stats(self._stats)
        except BaseException as e:  # the loop itself broke: /health goes 503 and waiters hear of it
            logger.exception("engine loop died")
            self._failure = e
            self._post(self._fail, None, unavailable("The engine loop died; see the server log."))

    def _drain(self, block: bool) -> list[Any]:
        commands = [self._commands.get()] if block else []
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def _apply(self, command: Any, running: set[str]) -> None:
        if isinstance(command, _Abort):
            if command.request_id in running:
                running.discard(command.request_id)
                self.engine.abort_request(command.request_id)
                if self._observer is not None:
                    self._observer.on_abort(command.request_id)
            return
        try:
            self.engine.add_request(
                command.request_id, command.prompt_token_ids, command.params, spec_arm=command.arm.engine_arm
            )
        except ValueError as e:
            self._post(_settle, command.ack, bad_request(str(e)))
            return
        except Exception as e:
            logger.exception("add_request failed")
            self._post(_settle, command.ack, server_error(f"The engine could not take the request: {e}"))
            return
        running.add(command.request_id)
        if self._observer is not None:
            self._observer.on_add(
                command.request_id, command.arm.label, len(command.prompt_token_ids), command.params.n
            )
        self._post(_settle, command.ack, None)

    def _step(self, running: set[str]) -> None:
        try:
            outputs = self.engine.step()
        except Exception:
            # The step's requests are lost but the engine may still serve new ones: fail them all, go on.
            logger.exception("engine step failed; failing its %d requests", len(running))
            failed = sorted(running)
            for request_id in failed:
                self._quiet_abort(request_id)
            running.clear()
            self._post(self._fail, failed, server_error())
            return
        for out in outputs:
            if out.finished:
                running.discard(out.request_id)
        if self._observer is not None:
            self._observer.on_outputs(outputs)
        self._post(self._deliver, outputs)

    def _quiet_abort(self, request_id: str) -> None:
        try:
            self.engine.abort_request(request_id)
        except Exception:
            logger.exception("abort_request(%s) failed after a failed step", request_id)
        if self._observer is not None:
            self._observer.on_abort(request_id)


def _settle(ack: asyncio.Future[None], error: APIError | None) -> None:
    if ack.done():  # the handler gave up waiting (client gone)
        return
    if error is None:
        ack.set_result(None)
    else:
        ack.set_exception(error)


def _aborted(request_id: str, live: _Live) -> RequestOutput:
    """The request's last output with every unfinished sample marked "abort"."""
    if live.last is None:
        outputs = [CompletionOutput(i, "", [], finish_reason="abort") for i in range(live.num_seqs)]
        return RequestOutput(
            request_id,
            None,
            live.prompt_token_ids,
            outputs,
            True,
            RequestMetrics(arrival_time=live.arrival_time),
        )
    outputs = [o if o.finished else dataclasses.replace(o, finish_reason="abort") for o in live.last.outputs]
    return dataclasses.replace(live.last, outputs=outputs, finished=True)
