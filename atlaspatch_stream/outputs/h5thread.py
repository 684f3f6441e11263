"""`H5Executor`: the one thread on which every h5py call of the process runs (see `h5store` for why).

Callers in any thread use `submit(fn, *args)`, which runs `fn` on the H5 thread and returns its result or raises its
exception (a call made on the H5 thread itself runs inline, so store methods can call each other). From async code,
`await executor.acall(fn, *args, limiter=h5_limiter)`, which is `anyio.to_thread.run_sync(submit, ..., limiter=...)`:
- it works on every anyio backend (no asyncio-only future bridging);
- a cancelled task still waits for a call in progress to finish (`to_thread` without `abandon_on_cancel`), so a
  write, finalize or abort is never left half-done while the caller moves on;
- a limiter of 1 keeps at most one loop-side waiter per limiter instead of a pile-up of parked worker threads.

Exceptions leave the H5 thread with the locals of their frames cleared, so h5py objects those frames held are
released here, on the H5 thread, and never by a garbage collection in another thread.
"""

from __future__ import annotations

import functools
import os
import queue
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import anyio

T = TypeVar("T")

_Job = tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class H5Executor:
    """A single daemon thread that runs submitted calls one at a time, in order."""

    def __init__(self, name: str = "atlaspatch-h5") -> None:
        self._queue: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()
        self._calls = 0
        self._busy = 0.0
        self._pending = 0
        self._lock = threading.Lock()

    def on_thread(self) -> bool:
        """Whether the caller is the H5 thread."""
        return threading.current_thread() is self._thread

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run `fn(*args, **kwargs)` on the H5 thread and wait for it; re-raises what it raises."""
        if self.on_thread():
            return fn(*args, **kwargs)
        future: Future[T] = Future()
        with self._lock:
            self._pending += 1
        self._queue.put((future, fn, args, kwargs))
        return future.result()

    async def acall(self, fn: Callable[..., T], /, *args: Any, limiter: anyio.CapacityLimiter) -> T:
        """`submit` from async code, through a worker thread of `limiter` (capacity 1 is enough)."""
        return await anyio.to_thread.run_sync(functools.partial(self.submit, fn, *args), limiter=limiter)

    def statistics(self) -> dict[str, float | int]:
        """Calls run, seconds busy, and calls waiting now."""
        with self._lock:
            return {"calls": self._calls, "busy_s": round(self._busy, 6), "pending": self._pending}

    def _loop(self) -> None:
        while True:
            future, fn, args, kwargs = self._queue.get()
            started = time.perf_counter()
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - every failure goes back to the caller
                traceback.clear_frames(exc.__traceback__)
                future.set_exception(exc)
            else:
                future.set_result(result)
            finally:
                del fn, args, kwargs  # drop references here, on this thread
                with self._lock:
                    self._calls += 1
                    self._pending -= 1
                    self._busy += time.perf_counter() - started
            del future


_EXECUTOR: list[H5Executor] = []
_EXECUTOR_LOCK = threading.Lock()


def h5_executor() -> H5Executor:
    """The process-wide H5 executor (started on first use)."""
    with _EXECUTOR_LOCK:
        if not _EXECUTOR:
            _EXECUTOR.append(H5Executor())
        return _EXECUTOR[0]


def _after_fork_in_child() -> None:
    """A forked child has no H5 thread (threads do not survive fork): it starts its own on first use."""
    global _EXECUTOR_LOCK
    _EXECUTOR_LOCK = threading.Lock()
    _EXECUTOR.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
