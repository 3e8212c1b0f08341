"""What crosses between the event loops and the engine thread.

One way, commands: a loop appends ``Add`` / ``Abort`` / ``ABORT_ALL`` /
``REFRESH`` to the engine's list, and the engine thread applies them between
iterations. The other way, results: the engine thread hands a loop a
callable with ``call_soon`` (``loop.call_soon_threadsafe``, on a loop that
may have closed meanwhile), which settles a request's ``accepted`` future
(``resolve``; its caller may have cancelled it) or puts outputs on request
queues (``deliver``). A request's ``Route`` says where its outputs go.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

from orca_serve.sampling_params import SamplingParams


@dataclass
class Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    kwargs: dict
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    accepted: asyncio.Future


@dataclass
class Abort:
    request_id: str


@dataclass
class Route:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


ABORT_ALL = "abort-all"  # command: abort every in-flight request
REFRESH = "refresh"  # command: run one pass so a new observer sees the current stats


def call_soon(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop is closed: nobody is listening any more
        pass


def resolve(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():  # the caller gave up waiting (cancelled)
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def deliver(items: list) -> None:
    for queue, item in items:
        queue.put_nowait(item)
