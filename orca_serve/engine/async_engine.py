"""The engine in its own thread, bridged to asyncio.

``LLMEngine`` is not thread-safe and ``step()`` blocks for a whole model
iteration, so one dedicated thread owns it. The event loop never calls into
the engine: ``add`` and ``abort`` are commands appended to a list under a
condition variable, and the engine thread applies them between iterations.
So an HTTP handler never waits for an iteration to end before it can run, and
an iteration never waits for HTTP work. Outputs go back through
``loop.call_soon_threadsafe`` (one call per iteration per loop, not per
token) into each request's ``asyncio.Queue``. The commands and the calls
that hand results back are in ``thread_messages.py``.

With nothing to do the engine thread sleeps on the condition variable; a new
command wakes it. If ``step()`` raises, the engine is marked dead: every
in-flight request gets ``EngineDeadError`` and new ones are refused.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from orca_serve.config import EngineConfig
from orca_serve.engine.errors import EngineDeadError, EngineStoppedError, QueueFullError, SLORejectedError
from orca_serve.engine.thread_messages import ABORT_ALL, REFRESH, Abort, Add, Route, call_soon, deliver, resolve
from orca_serve.outputs import RequestOutput
from orca_serve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# When the engine has requests but an iteration scheduled nothing (e.g. the
# request-level baseline waiting out its queue delay), wait this long before
# trying again instead of spinning.
_IDLE_BACKOFF_S = 0.002


class EngineObserver(Protocol):
    """Called on the engine thread after every pass; must be cheap and thread-safe."""

    def on_step(self, stats: Any, outputs: list[RequestOutput]) -> None: ...


class AsyncLLMEngine:
    """Owns an engine thread; async callers add requests and read their outputs."""

    def __init__(self, engine_factory: Callable[[], Any], *, observer: EngineObserver | None = None) -> None:
        """Start the engine thread and build the engine on it (blocks until built).

        Raises whatever the factory raised, so a bad model path fails at start-up.
        ``observer`` (see ``set_observer``) sees stats and outputs after every pass.
        """
        self.observer = observer
        self._cond = threading.Condition()
        self._commands: list = []
        self._accepting = True
        self._exit = False
        self._dead: BaseException | None = None
        self._routes: dict[str, Route] = {}  # engine thread only
        self._engine: Any = None
        self._startup_error: BaseException | None = None
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(engine_factory, ready),
                                        name="orca-engine", daemon=True)
        self._thread.start()
        ready.wait()
        if self._startup_error is not None:
            raise self._startup_error

    @classmethod
    def from_config(cls, config: EngineConfig, **kwargs) -> "AsyncLLMEngine":
        from orca_serve.engine.llm_engine import LLMEngine

        return cls(lambda: LLMEngine(config), **kwargs)

    # ---- read-only engine facts (set once at construction) -------------
    @property
    def engine(self) -> Any:
        """The wrapped engine. Only its immutable facts may be read off-thread."""
        return self._engine

    @property
    def model_name(self) -> str:
        return self._engine.model_name

    @property
    def max_model_len(self) -> int:
        return self._engine.max_model_len

    @property
    def max_waiting_requests(self) -> int | None:
        """The waiting queue's bound (None: unbounded)."""
        return self._engine.config.scheduler.max_waiting_requests

    @property
    def tokenizer(self):
        return self._engine.tokenizer

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        """Prompt -> token ids (ValueError naming the field). Safe off the engine
        thread: it only reads the tokenizer and the vocabulary size."""
        return self._engine.tokenize(prompt)

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        """Chat messages -> prompt token ids; safe off the engine thread, like ``tokenize``."""
        return self._engine.apply_chat_template(messages)

    @property
    def is_healthy(self) -> bool:
        return self._dead is None and self._thread.is_alive()

    @property
    def is_accepting(self) -> bool:
        return self._accepting and self.is_healthy

    # ---- commands (any thread) ---------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    queue: asyncio.Queue, **kwargs) -> asyncio.Future:
        """Queue a request; returns a future that resolves once the engine took it.

        The future raises ValueError / QueueFullError / SLORejectedError (bad
        input, full queue, TTFT target out of reach), EngineStoppedError or
        EngineDeadError. Outputs, then the finished one,
        arrive on ``queue``; an exception instance there means the engine died.
        Must be called from the event loop that reads ``queue``.
        """
        loop = asyncio.get_running_loop()
        accepted = loop.create_future()
        if self._dead is not None:
            raise EngineDeadError(f"engine is dead: {self._dead}")
        if not self._accepting:
            raise EngineStoppedError("server is shutting down")
        self._submit(Add(request_id, prompt, params, kwargs, loop, queue, accepted))
        return accepted

    def abort(self, request_id: str) -> None:
        """Abort a request; its finished output (reason "abort") follows on its queue."""
        if not isinstance(request_id, str):  # never a request's; unhashable, it would kill the engine thread
            return
        self._submit(Abort(request_id))

    async def generate(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                       **kwargs) -> AsyncIterator[RequestOutput]:
        """One request's outputs; leaving the loop early aborts the request."""
        queue: asyncio.Queue = asyncio.Queue()
        finished = False
        try:
            await self.add_request(request_id, prompt, params, queue, **kwargs)
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    def set_observer(self, observer: EngineObserver | None) -> None:
        """Install the observer; it gets the current stats right away, not at the first request."""
        self.observer = observer
        self._submit(REFRESH)

    def begin_shutdown(self) -> None:
        """Refuse new requests and abort every in-flight one (they finish with "abort")."""
        self._accepting = False
        self._submit(ABORT_ALL)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort everything, let the engine thread deliver the aborts, stop it."""
        if self._thread.is_alive():
            self.begin_shutdown()
        with self._cond:
            self._exit = True
            self._cond.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("engine thread did not stop within %.1fs", timeout)

    def _submit(self, command) -> None:
        """Queue a command for the engine thread. Checked under the lock the
        thread drains with, so no command is left behind when it stops."""
        with self._cond:
            if self._dead is not None or self._exit:
                if isinstance(command, Add):  # aborts of a stopped engine are moot
                    raise (EngineDeadError(f"engine is dead: {self._dead}") if self._dead is not None
                           else EngineStoppedError("server is shutting down"))
                return
            self._commands.append(command)
            self._cond.notify()

    # ---- the engine thread --------------------------------------------
    def _run(self, engine_factory: Callable[[], Any], ready: threading.Event) -> None:
        try:
            self._engine = engine_factory()
        except BaseException as exc:  # reported to the constructor's caller
            self._startup_error = exc
            ready.set()
            return
        ready.set()
        engine = self._engine
        try:
            self._loop(engine)
        except BaseException as exc:
            logger.exception("engine loop died")
            self._die(exc)
        finally:
            try:
                engine.shutdown()
            except Exception:
                logger.exception("engine shutdown failed")

    def _loop(self, engine) -> None:
        idle_backoff = False
        while True:
            with self._cond:
                while not (self._commands or self._exit or engine.has_unfinished_requests()):
                    self._cond.wait()
                if idle_backoff and not self._commands and not self._exit:
                    self._cond.wait(_IDLE_BACKOFF_S)
                commands, self._commands = self._commands, []
                exiting = self._exit
            for command in commands:
                self._apply(engine, command)
            outputs: list[RequestOutput] = []
            if engine.has_unfinished_requests():
                outputs = engine.step()
                self._route(outputs)
                if not engine.is_healthy():
                    # A worker failed: its requests got their error outputs above;
                    # this raises EngineDeadError, and the engine refuses new ones.
                    engine.check_health()
            elif exiting:
                return
            stats = engine.stats()
            idle_backoff = not outputs and stats.last_num_reqs == 0
            if self.observer is not None:
                try:
                    self.observer.on_step(stats, outputs)
                except Exception:  # metrics must never take the engine down
                    logger.exception("engine observer failed")

    def _apply(self, engine, command) -> None:
        if isinstance(command, Add):
            error: BaseException | None = None
            if not self._accepting:
                error = EngineStoppedError("server is shutting down")
            else:
                try:
                    engine.add_request(command.request_id, command.prompt, command.params, **command.kwargs)
                except (ValueError, QueueFullError, SLORejectedError) as exc:
                    error = exc
                except Exception as exc:  # unexpected, but this request's alone
                    logger.exception("add_request %s failed", command.request_id)
                    error = exc
            if error is None:
                self._routes[command.request_id] = Route(command.loop, command.queue)
            call_soon(command.loop, resolve, command.accepted, error)
        elif isinstance(command, Abort):
            if command.request_id in self._routes:
                engine.abort_request(command.request_id)
        elif command == ABORT_ALL:
            for request_id in list(self._routes):
                engine.abort_request(request_id)

    def _route(self, outputs: list[RequestOutput]) -> None:
        """Hand outputs to their loops: one wake-up per loop per iteration."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        for out in outputs:
            route = self._routes.get(out.request_id)
            if route is None:
                continue
            by_loop[route.loop].append((route.queue, out))
            if out.finished:
                del self._routes[out.request_id]
        for loop, items in by_loop.items():
            call_soon(loop, deliver, items)

    def _die(self, exc: BaseException) -> None:
        error = EngineDeadError(f"engine failed: {type(exc).__name__}: {exc}")
        with self._cond:  # from here _submit refuses; refuse what already raced in
            self._dead = exc
            self._accepting = False
            commands, self._commands = self._commands, []
        for route in self._routes.values():
            call_soon(route.loop, deliver, [(route.queue, error)])
        self._routes.clear()
        for command in commands:
            if isinstance(command, Add):
                call_soon(command.loop, resolve, command.accepted, error)

