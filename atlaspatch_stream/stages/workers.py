"""The one helper, besides `pipeline.py`, that creates task groups: N parallel workers of one stage."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream


async def run_workers(
    n: int,
    receive: ObjectReceiveStream[Any],
    send: ObjectSendStream[Any] | None,
    worker: Callable[[Any, Any], Coroutine[Any, Any, None]],
) -> None:
    """Run `n` copies of `worker`, each with clones of the stream ends; closes the originals on exit.

    End-of-stream flows downstream once every clone of `send` is closed; a closed consumer flows upstream.
    """
    async with receive, optional(send), anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(worker, receive.clone(), send.clone() if send is not None else None)  # type: ignore[attr-defined]


class _Null:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


def optional(stream: Any) -> Any:
    """`stream` as a context manager that closes it, or a no-op context when there is no stream."""
    return stream if stream is not None else _Null()


def optional_clone(stream: Any) -> Any:
    """A clone of `stream`, or a no-op context (yielding None) when there is no stream."""
    return stream.clone() if stream is not None else _Null()
