"""The process-wide H5 thread: every h5py call of the process runs on one `WriterThread` (see `h5store` for why).

Store code calls `h5_executor().submit(fn, ...)`, or `await h5_executor().acall(fn, ..., limiter=h5_limiter)` from
async code; `writer_thread` says what those guarantee.
"""

from __future__ import annotations

import os
import threading

from .writer_thread import WriterThread

_EXECUTOR: list[WriterThread] = []
_EXECUTOR_LOCK = threading.Lock()


def h5_executor() -> WriterThread:
    """The process-wide H5 thread (started on first use)."""
    with _EXECUTOR_LOCK:
        if not _EXECUTOR:
            _EXECUTOR.append(WriterThread("atlaspatch-h5"))
        return _EXECUTOR[0]


def _after_fork_in_child() -> None:
    """A forked child has no H5 thread (threads do not survive fork): it starts its own on first use."""
    global _EXECUTOR_LOCK
    _EXECUTOR_LOCK = threading.Lock()
    _EXECUTOR.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
