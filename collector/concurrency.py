"""Concurrency helpers on anyio: worker threads for blocking work, and waiting for the first of
several events.

Worker threads run the state store's SQL and the blocking calls of file or database sinks.
Everything blocking goes through :func:`run_sync`, i.e. :func:`anyio.to_thread.run_sync` under
anyio's default thread limiter (one :class:`anyio.CapacityLimiter` per event loop). Its size is
``runtime.worker_threads`` (default 8), set by :func:`set_worker_threads` when a runtime opens, so
a thousand tenants planning at once queue for eight threads instead of starting a thread each; a
call waiting for a thread is an ordinary cancellable wait.

``abandon_on_cancel``: a cancelled caller normally waits for its thread to finish (a state store
write holds the store's write lock until its transaction is really over). A sink's blocking call
is abandoned instead (:func:`collector.sink.run_blocking`), so the sink's ``timeout`` still ends a
write that hangs in a driver; the thread finishes on its own.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar, TypeVarTuple, Unpack

import anyio
import anyio.to_thread

R = TypeVar("R")
Ts = TypeVarTuple("Ts")

DEFAULT_WORKER_THREADS = 8


def set_worker_threads(count: int) -> None:
    """Size the running event loop's worker-thread limiter (``runtime.worker_threads``)."""
    anyio.to_thread.current_default_thread_limiter().total_tokens = count


def worker_threads() -> int:
    """The running event loop's worker-thread limit."""
    return int(anyio.to_thread.current_default_thread_limiter().total_tokens)


async def run_sync(
    func: Callable[[Unpack[Ts]], R], *args: *Ts, abandon_on_cancel: bool = False
) -> R:
    """``func(*args)`` in a worker thread; the event loop goes on meanwhile."""
    return await anyio.to_thread.run_sync(func, *args, abandon_on_cancel=abandon_on_cancel)


async def first_of(*waits: Callable[[], Awaitable[object]]) -> None:
    """Run every ``wait`` at once; return when the first one returns, cancelling the others.

    ``await first_of(stopping.wait, wake.wait)`` under ``anyio.move_on_after(seconds)`` is
    "sleep until stopped, woken, or the time is up".
    """
    async with anyio.create_task_group() as group:

        async def until(wait: Callable[[], Awaitable[object]]) -> None:
            await wait()
            group.cancel_scope.cancel()

        for wait in waits:
            group.start_soon(until, wait)
