"""Stage `embed`: slides whose patch features are complete -> slide embeddings, in the same run.

Upstream 1.1 runs the whole patch pipeline, re-opens every H5, then runs the slide encoder over all slides. Here a
slide's result is held back by `EmbeddingBook` the moment its H5 is final (new, extended or already complete), and
this stage embeds it on the feature device while later slides are still being read; only then is its result issued
and its lock released.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ..items import Failure, SlideJob, SlideResult, Status
from ..protocols import SlideEmbedder
from .book import SlideBook

EMBEDDED: frozenset[Status] = frozenset({"done", "reused", "skipped"})


class EmbeddingBook(SlideBook):
    """A `SlideBook` that sends slides finishing with an H5 to stage `embed` instead of issuing their result.

    What is sent is the result as it would have been issued (without its timings), held back: the slide's slot,
    handle and lock stay held until `issue()`; failures and every other status pass straight through.
    """

    def __init__(self, results: MemoryObjectSendStream[SlideResult], max_open: int, limiter: anyio.CapacityLimiter,
                 on_systemic: Callable[[Failure], None] | None = None, *,
                 embed: MemoryObjectSendStream[SlideResult]) -> None:
        super().__init__(results, max_open, limiter, on_systemic)
        self._embed = embed

    async def finish(self, job: SlideJob, status: Status, *, h5_path: Path | None = None,
                     num_patches: int | None = None, message: str = "", features: tuple[str, ...] = (),
                     failure: Failure | None = None) -> None:
        """Hold a slide back for its embeddings when its H5 is final; else finish it as `SlideBook` does."""
        if status in EMBEDDED and h5_path is not None and self.admitted(job):
            await self._embed.send(SlideResult(job, status, h5_path, num_patches, message, features))
            return
        await super().finish(job, status, h5_path=h5_path, num_patches=num_patches, message=message,
                             features=features, failure=failure)

    async def issue(self, item: SlideResult, status: Status, message: str | None = None, **notes: object) -> None:
        """Issue the held-back result of `item` (with `status`, a new `message` if given, and `notes` for the
        report)."""
        self.note(item.job, **notes)
        await super().finish(item.job, status, h5_path=item.h5_path, num_patches=item.num_patches,
                             message=item.message if message is None else message, features=item.features)


async def run(
    receive: MemoryObjectReceiveStream[SlideResult],
    *,
    book: EmbeddingBook,
    embedder: SlideEmbedder,
    limiter: anyio.CapacityLimiter,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Finished slides -> `slide_features/<encoder>` in their H5, then their result (through `book`).

    Loads the slide encoders before reporting ready (bad weights stop the run before any slide). Each slide takes
    its lock if it does not hold it yet (purpose `slide-embedding`; held elsewhere -> `locked`), then the embeddings
    run in a worker thread under `limiter` (the feature device's). A slide whose inputs are unusable or whose write
    fails is failed alone (stage `embed`); bugs propagate. A slide skipped by the patch pipeline that gains an
    embedding is `reused`. Ends when `receive` ends (the writer has finished).
    """
    await anyio.to_thread.run_sync(embedder.warm_up, limiter=limiter)
    task_status.started()
    try:
        async with receive:
            async for item in receive:
                await _embed_one(item, book, embedder, limiter)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(embedder.close, limiter=limiter)


async def _embed_one(item: SlideResult, book: EmbeddingBook, embedder: SlideEmbedder,
                     limiter: anyio.CapacityLimiter) -> None:
    job, h5_path, started = item.job, item.h5_path, time.perf_counter()
    assert h5_path is not None  # only slides finishing with an H5 are held back
    try:
        if not book.holds_lock(job):
            lock = await anyio.to_thread.run_sync(embedder.claim, job, limiter=limiter)
            if lock is None:
                await book.issue(item, "locked", f"locked by another process while embedding ({h5_path})")
                return
            book.attach(job, lock=lock)
        written = await anyio.to_thread.run_sync(embedder.embed, h5_path, limiter=limiter)
    except Exception as exc:  # a slide's unusable inputs or failed write fail that slide only (bugs stop the run)
        await book.fail_on(job, "embed", exc)
        return
    book.time(job, "embed", time.perf_counter() - started)
    status: Status = "reused" if item.status == "skipped" and written else item.status
    await book.issue(item, status, slide_features=written)
