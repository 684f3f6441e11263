"""The one helper, besides `pipeline.py`, that creates task groups: N parallel workers of one stage."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from contextlib import AsyncExitStack
from typing import TypeVar

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

T = TypeVar("T")
U = TypeVar("U")


async def run_workers(n: int, receive: MemoryObjectReceiveStream[T],
                      worker: Callable[..., Coroutine[object, object, None]],
                      *sends: MemoryObjectSendStream[U] | None) -> None:
    """Run `n` copies of `worker(rx, *sends)`, each with its own clones; close the originals on exit.

    A `None` output stays `None` for every worker. End-of-stream flows downstream once every clone of a send end is
    closed; a closed consumer flows upstream.
    """
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(receive)
        for stream in sends:
            if stream is not None:
                await stack.enter_async_context(stream)
        async with anyio.create_task_group() as tg:
            for _ in range(n):
                tg.start_soon(worker, receive.clone(), *[s.clone() if s is not None else None for s in sends])
