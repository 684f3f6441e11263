"""The one place that wires streams and starts stages.

```
jobs ─▶ prepare ─▶ segment ─▶ plan ─┬──────────────────────────────▶ write ─▶ book ─▶ results
                                    └─▶ read ─▶ encode ─(features)──▶ write
```
Every arrow is a bounded memory object stream sized from `QueueConfig`. Stages are started downstream first and each
reports ready after its set-up (models loaded), so bad weights fail before the first slide is opened.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .config import PipelineConfig
from .items import SlideJob, SlideResult
from .report import RunReport
from .stages import encode, plan, prepare, read, segment, write
from .stages.book import SlideBook

Mode = Literal["coords", "features", "detect"]


@dataclass
class _Stream:
    name: str
    send: MemoryObjectSendStream[Any]
    receive: MemoryObjectReceiveStream[Any]
    item_bytes: int

    def statistics(self) -> dict[str, Any]:
        stats = self.send.statistics()
        return {
            "used": stats.current_buffer_used,
            "size": stats.max_buffer_size,
            "bytes_per_item": self.item_bytes,
        }


def _stream(name: str, size: int, item_bytes: int) -> _Stream:
    send, receive = anyio.create_memory_object_stream[Any](size)
    return _Stream(name, send, receive, item_bytes)


@dataclass
class Limiters:
    """One capacity limiter per resource kind; none relies on anyio's default thread limiter."""

    open: anyio.CapacityLimiter
    segment: anyio.CapacityLimiter
    plan: anyio.CapacityLimiter
    read: anyio.CapacityLimiter
    device: anyio.CapacityLimiter
    h5: anyio.CapacityLimiter

    @classmethod
    def from_config(cls, config: PipelineConfig) -> Limiters:
        """Sizes from the config: open/plan workers, one device submitter, one H5 writer."""
        return cls(
            open=anyio.CapacityLimiter(config.open.open_workers),
            segment=anyio.CapacityLimiter(1),
            plan=anyio.CapacityLimiter(config.plan.threads),
            read=anyio.CapacityLimiter(2),
            device=anyio.CapacityLimiter(1),
            h5=anyio.CapacityLimiter(1),
        )


@dataclass
class Counts:
    """Running totals for progress displays and the summary."""

    submitted: int = 0
    finished: int = 0
    patches: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def add(self, result: SlideResult) -> None:
        """Count one final result."""
        self.finished += 1
        self.by_status[result.status] = self.by_status.get(result.status, 0) + 1
        if result.status in ("done", "reused") and result.num_patches:
            self.patches += int(result.num_patches)


class Pipeline:
    """A running pipeline: `submit()` slides, iterate `results()`, read `statistics()`."""

    def __init__(self, config: PipelineConfig, backends: Any, mode: Mode, report: RunReport | None = None) -> None:
        self.config = config
        self.report = report
        self.backends = backends
        self.mode = mode
        q = config.queues
        patch = config.plan.patch_size
        self._streams = {
            "jobs": _stream("jobs", q.jobs, 1_000),
            "thumbnails": _stream("thumbnails", q.thumbnails, 3 * config.segment.thumbnail_max**2),
            "masks": _stream("masks", q.masks, config.segment.thumbnail_max**2),
            "plans": _stream("plans", q.plans, 20 * 100_000),
            "patches": _stream("patches", q.patches, config.read.chunk_patches * patch * patch * 3),
            "to_write": _stream("to_write", q.features, 4 * 2048 * config.encode.batch_size),
            "results": _stream("results", q.results, 1_000),
        }
        self._book_send, self._book_receive = anyio.create_memory_object_stream[SlideResult](q.results)
        self.book = SlideBook(self._book_send, config.open.max_open_slides)
        self.limiters = Limiters.from_config(config)
        self.counts = Counts()
        self._next_id = 0
        self._jobs_send = self._streams["jobs"].send
        self._input_closed = False

    # -- public -----------------------------------------------------------------------------------------------------

    async def submit(self, job: SlideJob) -> None:
        """Queue one slide (waits while the job queue is full).

        Feed from a task of its own while another reads `results()`: when nobody reads results, every buffer fills
        and `submit` waits for ever (the pipeline is bounded end to end, results included).
        """
        self.counts.submitted += 1
        await self._jobs_send.send(job)

    async def close_input(self) -> None:
        """No more slides: in-flight slides drain, then `results()` ends."""
        if not self._input_closed:
            self._input_closed = True
            await self._jobs_send.aclose()

    async def results(self) -> AsyncIterator[SlideResult]:
        """Final results as slides finish, until the input is closed and everything has drained."""
        async with self._streams["results"].receive.clone() as receive:
            async for result in receive:
                yield result

    def statistics(self) -> dict[str, Any]:
        """Queue fill per stream, slides in flight and totals."""
        elapsed = time.perf_counter() - self.counts.started
        return {
            "streams": {name: s.statistics() for name, s in self._streams.items()},
            "in_flight": self.book.in_flight,
            "submitted": self.counts.submitted,
            "finished": self.counts.finished,
            "by_status": dict(self.counts.by_status),
            "patches": self.counts.patches,
            "patches_per_s": self.counts.patches / elapsed if elapsed > 0 else 0.0,
            "elapsed_s": elapsed,
        }

    # -- wiring -----------------------------------------------------------------------------------------------------

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Start every stage (downstream first), report ready, and run until the input is closed and drained."""
        async with anyio.create_task_group() as outer:
            await outer.start(self._forward_results)
            try:
                async with anyio.create_task_group() as tg:
                    await self._start_stages(tg)
                    task_status.started()
            finally:
                await self.book.release_all()
                await self.book.aclose()
                self._close_stage_streams()

    def _close_stage_streams(self) -> None:
        """Close the original ends left open (unused streams, ends a cancelled stage never took); idempotent.

        The results stream stays open: `results()` may still be draining it (closed by `running()`).
        """
        for name, stream in self._streams.items():
            if name != "results":
                stream.send.close()
                stream.receive.close()

    async def _forward_results(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        out = self._streams["results"].send
        task_status.started()
        async with self._book_receive, out:
            async for result in self._book_receive:
                self.counts.add(result)
                if self.report is not None:
                    await anyio.to_thread.run_sync(self.report.slide, result)
                await out.send(result)

    async def _start_stages(self, tg: anyio.abc.TaskGroup) -> None:
        s, cfg, lim = self._streams, self.config, self.limiters
        needs_pixels = self.mode == "features" or (self.mode == "coords" and cfg.write.save_images)
        if self.mode != "detect":
            encoders = await anyio.to_thread.run_sync(self.backends.make_encoders) if self.mode == "features" else []
            await tg.start(self._write_stage, encoders, needs_pixels)
            if self.mode == "features":
                await tg.start(self._encode_stage, encoders)
            if needs_pixels:
                await tg.start(self._read_stage, bool(encoders))
        else:
            s["to_write"].send.close()
            s["to_write"].receive.close()
        await tg.start(self._plan_stage, needs_pixels)
        segmenter = await anyio.to_thread.run_sync(self.backends.make_segmenter)
        await tg.start(self._segment_stage, segmenter)
        settings = prepare.PrepareSettings(
            workers=cfg.open.open_workers,
            needs_thumbnail=True,
            encoders=cfg.encode.extractors if self.mode == "features" else (),
            use_ledger=self.mode != "detect",
            skip_existing=cfg.write.skip_existing,
        )
        await tg.start(_stage(prepare.run, s["jobs"].receive, s["thumbnails"].send, book=self.book,
                              backends=self.backends, settings=settings, limiter=lim.open))

    async def _write_stage(self, encoders: list[Any], needs_pixels: bool, *,
                           task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        settings = write.WriteSettings(
            encoders=tuple(e.name for e in encoders),
            dims=write.feature_dims(encoders),
            count_rows=needs_pixels and not encoders,
        )
        await write.run(self._streams["to_write"].receive, book=self.book, backends=self.backends,
                        settings=settings, limiter=self.limiters.h5, task_status=task_status)

    async def _encode_stage(self, encoders: list[Any], *,
                            task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        s = self._streams
        await encode.run(s["patches"].receive, s["to_write"].send.clone(), encoders=encoders,
                         batch_size=self.config.encode.batch_size, limiter=self.limiters.device,
                         task_status=task_status)

    async def _read_stage(self, has_encoders: bool, *,
                          task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        s, cfg = self._streams, self.config
        settings = read.ReadSettings(
            slides_in_parallel=2,
            reader_threads=cfg.read.reader_threads,
            chunk=cfg.read.chunk_patches,
            patch_size=cfg.plan.patch_size,
            save_images=cfg.write.save_images,
            keep_pixels=has_encoders,
        )
        out = s["patches"].send if has_encoders else s["to_write"].send.clone()
        if not has_encoders:
            s["patches"].send.close()
            s["patches"].receive.close()
        await read.run(s["plans"].receive, out, s["to_write"].send.clone(),
                       backends=self.backends, settings=settings, limiter=self.limiters.read, task_status=task_status)

    async def _plan_stage(self, needs_pixels: bool, *,
                          task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        s = self._streams
        settings = plan.PlanSettings(mode=self.mode, needs_pixels=needs_pixels, workers=self.config.plan.threads)
        to_write: Any = s["to_write"].send
        send_read = s["plans"].send if needs_pixels else None
        if not needs_pixels:
            s["plans"].send.close()
            s["plans"].receive.close()
        if self.mode == "detect":
            to_write = _Discard()
        await plan.run(s["masks"].receive, to_write, send_read, book=self.book, backends=self.backends,
                       settings=settings, limiter=self.limiters.plan, task_status=task_status)

    async def _segment_stage(self, segmenter: Any, *,
                             task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        s = self._streams
        await segment.run(s["thumbnails"].receive, s["masks"].send, book=self.book, segmenter=segmenter,
                          batch_size=self.config.segment.seg_batch_size, limiter=self.limiters.segment,
                          task_status=task_status)


class _Discard:
    """A send end that drops items (detect mode has no writer)."""

    def clone(self) -> _Discard:
        return self

    async def send(self, item: Any) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def __aenter__(self) -> _Discard:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


def _stage(func: Any, *args: Any, **kwargs: Any) -> Any:
    async def start(*, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        await func(*args, task_status=task_status, **kwargs)

    return start


@asynccontextmanager
async def running(
    config: PipelineConfig, backends: Any, mode: Mode, report: RunReport | None = None
) -> AsyncIterator[Pipeline]:
    """Start a pipeline; on normal exit close the input and drain; on error or cancellation cancel it.

    Results not consumed by the caller are drained (they are still counted) when the block exits.
    """
    pipeline = Pipeline(config, backends, mode, report)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(pipeline.run)
            try:
                yield pipeline
            except BaseException:
                tg.cancel_scope.cancel()
                raise
            await pipeline.close_input()
            async for _ in pipeline.results():
                pass
    finally:
        pipeline._streams["results"].receive.close()
