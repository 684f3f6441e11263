"""`WriterThread`: one thread that runs submitted calls one at a time, in order — for state that must stay on one
thread — and `h5_executor()`, the process-wide one that runs every h5py call of the process (see `h5store` for why).
The daemon ledger's SQLite connection lives on a `WriterThread` of its own.

Callers in any thread use `submit(fn, *args)`, which runs `fn` on the writer thread and returns its result or raises
its exception (a call made on the writer thread itself runs inline, so methods can call each other); functions
decorated with `on_h5_thread` do so by themselves. From async code, `await writer.acall(fn, *args,
limiter=limiter)`, which is `anyio.to_thread.run_sync(submit, ..., limiter=...)`:
- it works on every anyio backend (no asyncio-only future bridging);
- a cancelled task still waits for a call in progress to finish (`to_thread` without `abandon_on_cancel`), so a
  write, finalize or transaction is never left half-done while the caller moves on;
- a limiter of 1 keeps at most one loop-side waiter per limiter instead of a pile-up of parked worker threads.

Exceptions leave the writer thread with the locals of their frames cleared, so objects those frames held (h5py
handles, cursors) are released here, on the writer thread, and never by a garbage collection in another thread.
"""

from __future__ import annotations

import functools
import os
import queue
import threading
import traceback
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, ParamSpec, TypeVar

import anyio

T = TypeVar("T")
P = ParamSpec("P")

_Job = tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class WriterThread:
    """A single daemon thread that runs submitted calls one at a time, in order, until `stop()`."""

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def on_thread(self) -> bool:
        """Whether the caller is the writer thread."""
        return threading.current_thread() is self._thread

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run `fn(*args, **kwargs)` on the writer thread and wait for it; re-raises what it raises."""
        if self.on_thread():
            return fn(*args, **kwargs)
        future: Future[T] = Future()
        self._queue.put((future, fn, args, kwargs))
        return future.result()

    async def acall(self, fn: Callable[..., T], /, *args: Any, limiter: anyio.CapacityLimiter) -> T:
        """`submit` from async code, through a worker thread of `limiter` (capacity 1 is enough)."""
        return await anyio.to_thread.run_sync(functools.partial(self.submit, fn, *args), limiter=limiter)

    def stop(self) -> None:
        """End the thread after the calls already submitted (a call submitted later never runs)."""
        self._queue.put(None)

    def join(self) -> None:
        """Wait for the thread to end (after `stop`)."""
        self._thread.join()

    def _loop(self) -> None:
        while (job := self._queue.get()) is not None:
            future, fn, args, kwargs = job
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - every failure goes back to the caller
                traceback.clear_frames(exc.__traceback__)
                future.set_exception(exc)
            else:
                future.set_result(result)
            finally:
                del fn, args, kwargs, job  # drop references here, on this thread
            del future


_EXECUTOR: list[WriterThread] = []
_EXECUTOR_LOCK = threading.Lock()


def h5_executor() -> WriterThread:
    """The process-wide H5 thread (started on first use)."""
    with _EXECUTOR_LOCK:
        if not _EXECUTOR:
            _EXECUTOR.append(WriterThread("atlaspatch-h5"))
        return _EXECUTOR[0]


def on_h5_thread(fn: Callable[P, T]) -> Callable[P, T]:
    """`fn`, run on the H5 thread whichever thread calls it."""

    @functools.wraps(fn)
    def hop(*args: P.args, **kwargs: P.kwargs) -> T:
        return h5_executor().submit(fn, *args, **kwargs)

    return hop


def _after_fork_in_child() -> None:
    """A forked child has no H5 thread (threads do not survive fork): it starts its own on first use."""
    global _EXECUTOR_LOCK
    _EXECUTOR_LOCK = threading.Lock()
    _EXECUTOR.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
