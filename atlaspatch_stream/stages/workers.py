"""The one helper, besides `pipeline.py`, that creates task groups: N parallel workers of one stage."""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from contextlib import AsyncExitStack
from typing import Any, TypeVar

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

T = TypeVar("T")


async def run_workers(
    n: int,
    receive: MemoryObjectReceiveStream[T],
    send: MemoryObjectSendStream[Any] | None,
    worker: Callable[..., Coroutine[Any, Any, None]],
    *more: MemoryObjectSendStream[Any] | None,
) -> None:
    """Run `n` copies of `worker(rx, tx, *more_tx)`, each with its own clones; close the originals on exit.

    A `None` output stays `None` for every worker. End-of-stream flows downstream once every clone of a send end is
    closed; a closed consumer flows upstream.
    """
    sends = (send, *more)
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(receive)
        for stream in sends:
            if stream is not None:
                await stack.enter_async_context(stream)
        async with anyio.create_task_group() as tg:
            for _ in range(n):
                clones = [s.clone() if s is not None else None for s in sends]
                tg.start_soon(worker, receive.clone(), *clones)


def closing(streams: Sequence[MemoryObjectSendStream[Any] | None]) -> AsyncExitStack:
    """An exit stack that closes every given send end (None skipped) when the block ends."""
    stack = AsyncExitStack()
    for stream in streams:
        if stream is not None:
            stack.push_async_callback(stream.aclose)
    return stack
