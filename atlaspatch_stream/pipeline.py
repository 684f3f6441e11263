"""The one place that wires streams and starts stages.

```
jobs ─▶ prepare ─▶ segment ─▶ plan ─┬──────────────────────────────▶ write ─▶ book ─▶ dispatch ─▶ results()
                                    └─▶ read ─▶ encode ─(features)──▶ write                    └──▶ process() callers
```
Every arrow is a bounded memory object stream sized from `QueueConfig`. Stages are started downstream first and each
reports ready after its set-up (models loaded), so bad weights fail before the first slide is opened. Which stages a
mode runs is decided by `StageSet.for_mode` alone; every stage is started the same way (`_start`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, Literal, Protocol, TypeVar, cast

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .config import PipelineConfig
from .errors import STOP_REASONS, PipelineClosed, PipelineFull, refused
from .items import (
    EdgeStatistics,
    EngineStatistics,
    Failure,
    PatchBatch,
    PatchPlan,
    SlideJob,
    SlideResult,
    Thumbnail,
    TissueMask,
    WriteItem,
)
from .outputs.claims import DEFAULT_LEASE
from .protocols import Backends
from .report import RunReport
from .run import serving
from .stages import embed, encode, plan, prepare, read, segment, write
from .stages.book import SlideBook

Mode = Literal["coords", "features", "detect"]
HEARTBEAT_S = DEFAULT_LEASE / 3
State = Literal["starting", "running", "draining", "closed", "failed"]
T = TypeVar("T")


def default_mode(config: PipelineConfig) -> Mode:
    """"features" when encoders are requested, else "coords"."""
    return "features" if config.encode.extractors else "coords"


class Edge(Generic[T]):
    """One bounded stream between two stages: `size` items of up to `item_bytes` bytes each."""

    def __init__(self, name: str, size: int, item_bytes: int) -> None:
        self.name = name
        self.item_bytes = item_bytes
        self.send, self.receive = anyio.create_memory_object_stream[T](size)

    def statistics(self) -> EdgeStatistics:
        """Items buffered, capacity, and bytes per item."""
        stats = self.send.statistics()
        return EdgeStatistics(stats.current_buffer_used, int(stats.max_buffer_size), self.item_bytes)

    def close(self) -> None:
        """Close both original ends (idempotent; clones held by stages are theirs to close)."""
        self.send.close()
        self.receive.close()


class AnyEdge(Protocol):
    """What every edge answers, whatever flows on it."""

    name: str

    def statistics(self) -> EdgeStatistics:
        """Items buffered, capacity, and bytes per item."""
        ...

    def close(self) -> None:
        """Close both original ends."""
        ...


class Streams:
    """Every edge of the pipeline, typed by what flows on it; sizes from `QueueConfig`, the bytes per item from the
    patch, thumbnail and batch sizes (the `patches` stream also bounded by bytes: `PipelineConfig.patch_queue`)."""

    def __init__(self, config: PipelineConfig) -> None:
        q, thumb = config.queues, config.segment.thumbnail_max
        self.jobs: Edge[SlideJob] = Edge("jobs", q.jobs, 1_000)
        self.thumbnails: Edge[Thumbnail] = Edge("thumbnails", q.thumbnails, 3 * thumb**2)
        self.masks: Edge[TissueMask] = Edge("masks", q.masks, thumb**2)
        self.plans: Edge[PatchPlan] = Edge("plans", q.plans, 20 * 100_000)
        self.patches: Edge[PatchBatch] = Edge("patches", config.patch_queue, config.chunk_bytes)
        self.to_write: Edge[WriteItem] = Edge("to_write", q.features, 4 * 2048 * config.encode.batch_size)
        self.finished: Edge[SlideResult] = Edge("finished", q.results, 1_000)  # book -> dispatcher
        self.results: Edge[SlideResult] = Edge("results", q.results, 1_000)  # dispatcher -> results()

    def edges(self) -> list[AnyEdge]:
        """All edges, upstream first."""
        return list(vars(self).values())


@dataclass(frozen=True)
class StageSet:
    """Which stages run: the one place a command's mode decides it."""

    write: bool  # every mode but detect-tissue writes an H5
    read: bool  # pixels are read: encoders run, or --save-images
    encode: bool

    @classmethod
    def for_mode(cls, mode: Mode, config: PipelineConfig) -> StageSet:
        """`features` reads and encodes; `coords` reads only with --save-images; `detect` writes overlays only."""
        features = mode == "features"
        return cls(write=mode != "detect", read=features or (mode == "coords" and config.write.save_images),
                   encode=features)


class Limiters:
    """One capacity limiter per resource kind (none is anyio's default thread limiter): open/plan workers as
    configured, one device submitter, one H5 writer."""

    def __init__(self, config: PipelineConfig) -> None:
        self.open = anyio.CapacityLimiter(config.open.open_workers)
        self.segment = anyio.CapacityLimiter(1)
        self.plan = anyio.CapacityLimiter(config.plan.threads)
        self.read = anyio.CapacityLimiter(2)
        self.device = anyio.CapacityLimiter(1)
        self.h5 = anyio.CapacityLimiter(1)
        self.io = anyio.CapacityLimiter(2)  # small filesystem work: run report lines, closing handles, releasing locks


@dataclass
class _Waiter:
    """A `process()` caller waiting for its slide's result."""

    job: SlideJob
    done: anyio.Event = field(default_factory=anyio.Event)
    result: SlideResult | None = None
    error: BaseException | None = None


class Pipeline:
    """A running pipeline.

    Two ways to use it (do not mix them for one job): `await process(job_or_path)` returns that slide's result
    (results are routed by job, so many tasks may call it at once); or `submit()` jobs from one task and iterate
    `results()` from another. `submit`/`process` wait while the pipeline is full; the `_nowait` variants raise
    `PipelineFull` instead. `statistics()` reports queue fill, slides in flight, totals and the state.
    """

    def __init__(self, config: PipelineConfig, backends: Backends, mode: Mode, report: RunReport | None = None,
                 stop_on_output_failure: bool = False) -> None:
        self.config = config
        self.backends = backends
        self.report = report
        self.stages = StageSet.for_mode(mode, config)
        self.streams = Streams(config)
        self.limiters = Limiters(config)
        on_systemic = self._stop_for if stop_on_output_failure else None
        book_args = (self.streams.finished.send, config.open.max_open_slides, self.limiters.io, on_systemic)
        # --slide-encoders: slides with a final H5 pass through stage `embed` before their result is issued
        self.to_embed: Edge[SlideResult] | None = None
        if self.stages.encode and config.encode.slide_encoders:
            self.to_embed = Edge("to_embed", config.queues.results, 1_000)
        self.book = (embed.EmbeddingBook(*book_args, embed=self.to_embed.send) if self.to_embed is not None
                     else SlideBook(*book_args))
        self.state: State = "starting"
        self.submitted = 0
        self.torn_down: list[SlideResult] = []  # slides torn down in flight (aborted or cancelled)
        self.precision_ran: Mapping[str, str] = {}  # per encoder, what its forward runs in (once they are warm)
        self._abort = anyio.CancelScope()
        self._ids = itertools.count()
        self._waiters: dict[int, _Waiter] = {}
        self._routed: set[int] = set()  # jobs of process() callers: their results never go to results()
        self._live: set[int] = set()  # ids submitted and not yet finished
        self._stems: dict[str, Path] = {}
        self._mpp: dict[str, float] | None = None
        self._closed_cause: BaseException | None = None

    # -- intake ---------------------------------------------------------------------------------------------------

    async def submit(self, job: SlideJob) -> None:
        """Queue one slide; waits while the pipeline is full.

        Consume `results()` in a sibling task: when nobody reads results, every buffer fills and `submit` waits for
        ever (the pipeline is bounded end to end). Raises `PipelineClosed` after `close_input()` or a failure.
        """
        collision = self._accept(job)
        if collision is not None:
            await self.book.reject(job, "failed", collision, refused("discover", "collision"))
        else:
            await self._send(job)

    def submit_nowait(self, job: SlideJob) -> None:
        """Queue one slide at once, or raise `PipelineFull` (a service answers 503)."""
        if self.streams.jobs.send.statistics().current_buffer_used >= self.config.queues.jobs:
            raise PipelineFull(_full(self.config))
        collision = self._accept(job)
        if collision is not None:
            self.book.reject_nowait(job, "failed", collision, refused("discover", "collision"))
        else:
            self._send_now(job)

    async def process(self, job_or_path: SlideJob | str | Path) -> SlideResult:
        """Submit one slide and wait for its own result (waits for room while the pipeline is full).

        If the caller is cancelled before the slide starts, the slide is withdrawn; once started, it keeps going to
        a complete output (or none). Raises `PipelineClosed` if the pipeline stops on an error first.
        """
        return await self._await_result(self.job_for(job_or_path), wait=True)

    async def process_nowait(self, job_or_path: SlideJob | str | Path) -> SlideResult:
        """`process()`, but raise `PipelineFull` at once instead of waiting for room."""
        return await self._await_result(self.job_for(job_or_path), wait=False)

    async def close_input(self) -> None:
        """No more slides: in-flight slides drain, then `results()` ends."""
        if self.state in ("starting", "running"):
            self.state = "draining"
        await self.streams.jobs.send.aclose()

    def stop_intake(self, reason: str) -> None:
        """No slide starts any more: jobs not yet started finish `cancelled` ("not started: <reason>").

        Slides in flight go on. Used for the first Ctrl-C, a full output disk, and shutting a service down.
        """
        self.book.stop_intake(reason)

    def abort(self) -> None:
        """Cancel every stage now: slides in flight are torn down (`torn_down`), partial outputs removed, locks
        released; `results()` then ends."""
        self._abort.cancel()

    @property
    def stop_reason(self) -> str | None:
        """Why intake stopped (a request, a systemic output failure), or None."""
        return self.book.stop_reason

    def _stop_for(self, failure: Failure) -> None:
        """A systemic failure (full disk, read-only output, a failed device): no later slide starts."""
        self.stop_intake(STOP_REASONS.get(failure.kind, "output failure"))

    def results(self) -> MemoryObjectReceiveStream[SlideResult]:
        """Final results of `submit()`ted slides as they finish; ends when the input is closed and all drained."""
        return self.streams.results.receive.clone()

    def job_for(self, job_or_path: SlideJob | str | Path) -> SlideJob:
        """A job with a fresh id for a slide path (its `--mpp-csv` entry attached), or `job` itself.

        Raises:
            NotASlideError: the path does not exist or is not a slide format we read.
        """
        if isinstance(job_or_path, SlideJob):
            return job_or_path
        from .sources.discover import load_mpp_csv, slide_job

        if self._mpp is None:
            csv = self.config.source.mpp_csv
            self._mpp = load_mpp_csv(csv) if csv else {}
        return slide_job(Path(job_or_path), next(i for i in self._ids if i not in self._live), self._mpp)

    def statistics(self) -> EngineStatistics:
        """Queue fill per stream, slides in flight, totals and the state."""
        return EngineStatistics(state=self.state, totals=self.book.tally.totals(), in_flight=self.book.in_flight,
                                submitted=self.submitted, stopped=self.book.stop_reason,
                                streams={e.name: e.statistics() for e in self.streams.edges()})

    # -- intake internals -------------------------------------------------------------------------------------------

    def _accept(self, job: SlideJob) -> str | None:
        """Register a submission; the reason it fails at once (an output-name collision), else None.

        Raises:
            PipelineClosed: the input is closed or the pipeline stopped.
            ValueError: a job with the same `slide_id` is already in this pipeline.
        """
        if self.state not in ("starting", "running"):
            raise PipelineClosed("the pipeline takes no more slides") from self._closed_cause
        if job.slide_id in self._live:
            raise ValueError(f"{job.name}: slide_id {job.slide_id} is already in the pipeline")
        self._live.add(job.slide_id)
        self.submitted += 1
        first = self._stems.setdefault(job.stem, job.path)
        if first == job.path:
            return None
        return (f"{job.name}: output name {job.stem!r} is already taken by {first} (both would write "
                f"patches/{job.stem}.h5); process them into separate --output folders")

    async def _send(self, job: SlideJob) -> None:
        try:
            await self.streams.jobs.send.send(job)
        except BaseException as exc:
            self._live.discard(job.slide_id)
            if isinstance(exc, anyio.ClosedResourceError | anyio.BrokenResourceError):
                raise PipelineClosed("the pipeline takes no more slides") from self._closed_cause or exc
            raise

    def _send_now(self, job: SlideJob) -> None:
        try:
            self.streams.jobs.send.send_nowait(job)
        except anyio.WouldBlock:
            self._live.discard(job.slide_id)
            raise PipelineFull(_full(self.config)) from None
        except (anyio.ClosedResourceError, anyio.BrokenResourceError) as exc:
            self._live.discard(job.slide_id)
            raise PipelineClosed("the pipeline takes no more slides") from self._closed_cause or exc

    async def _await_result(self, job: SlideJob, *, wait: bool) -> SlideResult:
        collision = self._accept(job)
        waiter = self._waiters[job.slide_id] = _Waiter(job)
        self._routed.add(job.slide_id)
        try:
            if collision is not None:
                await self.book.reject(job, "failed", collision, refused("discover", "collision"))
            elif wait:
                await self._send(job)
            else:
                self._send_now(job)
            await waiter.done.wait()
        except BaseException:
            if waiter.result is None:
                self.book.withdraw(job)
            raise
        finally:
            self._waiters.pop(job.slide_id, None)
        if waiter.error is not None:
            raise PipelineClosed(f"{job.name}: the pipeline stopped") from waiter.error
        assert waiter.result is not None
        return waiter.result

    # -- wiring -----------------------------------------------------------------------------------------------------

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Start every stage (downstream first), report ready, and run until the input is closed and drained."""
        beat = anyio.CancelScope()
        with self._abort:
            async with anyio.create_task_group() as outer:
                await outer.start(self._dispatch)
                outer.start_soon(self._heartbeat, beat)
                try:
                    async with anyio.create_task_group() as tg:
                        if self.stages.write:
                            await anyio.to_thread.run_sync(self.backends.outputs.sweep_orphans,
                                                           limiter=self.limiters.io)
                        await self._start_stages(tg)
                        self.state = "running"
                        task_status.started()
                finally:
                    beat.cancel()
                    await self._close()

    async def _close(self) -> None:
        """The stages have ended: tear down (and report) the slides still in flight, release what the readers share
        and close every stream but the results'."""
        self.torn_down = await self.book.release_all()
        with anyio.CancelScope(shield=True):
            if self.report is not None:
                for result in self.torn_down:
                    await anyio.to_thread.run_sync(self.report.slide, result, limiter=self.limiters.io)
            await anyio.to_thread.run_sync(self.backends.pixels.close, limiter=self.limiters.io)
        await self.book.aclose()
        for edge in self.streams.edges():
            if edge is not self.streams.results and edge is not self.streams.finished:
                edge.close()
        if self.to_embed is not None:
            self.to_embed.close()

    async def _heartbeat(self, scope: anyio.CancelScope) -> None:
        """Refresh the locks of the slides in flight every third of the lock lease (other hosts judge them by age),
        until the stages have ended (`scope` is cancelled then)."""
        with scope:
            while True:
                await anyio.sleep(HEARTBEAT_S)
                await self.book.heartbeat()

    async def _dispatch(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Route each final result: to its `process()` caller, or to `results()`; record it in the run report."""
        task_status.started()
        async with self.streams.finished.receive as finished, self.streams.results.send as out:
            async for result in finished:
                if self.report is not None:
                    queues = {e.name: e.statistics().used for e in self.streams.edges()}  # occupancy over time
                    await anyio.to_thread.run_sync(self.report.slide, result, queues, limiter=self.limiters.io)
                slide_id = result.job.slide_id
                self._live.discard(slide_id)
                if slide_id in self._routed:
                    self._routed.discard(slide_id)
                    waiter = self._waiters.get(slide_id)
                    if waiter is not None:
                        waiter.result = result
                        waiter.done.set()
                else:
                    await out.send(result)

    def fail_waiters(self, cause: BaseException) -> None:
        """The pipeline stopped on an error: every waiting `process()` caller gets `PipelineClosed`."""
        self.state = "failed"
        self._closed_cause = cause
        for waiter in self._waiters.values():
            waiter.error = cause
            waiter.done.set()

    async def _start_stages(self, tg: TaskGroup) -> None:
        s, cfg, lim, b, on = self.streams, self.config, self.limiters, self.backends, self.stages
        outputs = b.outputs if on.write else None
        if self.to_embed is not None:
            from .assembly import make_slide_embedder

            assert isinstance(self.book, embed.EmbeddingBook)
            embedder = await anyio.to_thread.run_sync(make_slide_embedder, cfg, limiter=lim.device)
            await _start(tg, embed.run, self.to_embed.receive, book=self.book, embedder=embedder, limiter=lim.device)
        if on.write:
            encoders = await anyio.to_thread.run_sync(b.make_encoders, limiter=lim.device) if on.encode else None
            settings = write.WriteSettings(encoders=encoders.names if encoders else (),
                                           dims=dict(encoders.dims) if encoders else {},
                                           count_rows=on.read and not on.encode, allow_nonfinite=cfg.encode.allow_nonfinite)
            await _start(tg, self._write, settings)
            if encoders is not None:
                await _start(tg, encode.run, s.patches.receive, s.to_write.send.clone(), encoders=encoders,
                             batch_size=cfg.encode.batch_size, limiter=lim.device)
                self.precision_ran = encoders.precision_ran  # warmed up now
            if on.read:
                settings_r = read.ReadSettings(slides_in_parallel=cfg.read.slides_in_parallel,
                                               reader_threads=cfg.read.reader_threads, chunk=cfg.read.chunk_patches,
                                               patch_size=cfg.plan.patch_size, save_images=cfg.write.save_images,
                                               keep_pixels=on.encode)
                # Without encoders, the row labels go straight to the writer (it counts them to know a slide is done).
                out = s.patches.send if on.encode else cast(MemoryObjectSendStream[PatchBatch], s.to_write.send.clone())
                await _start(tg, read.run, s.plans.receive, out, s.to_write.send.clone(), book=self.book,
                             pixels=b.pixels, outputs=b.outputs, settings=settings_r, limiter=lim.read)
        await _start(tg, plan.run, s.masks.receive, s.to_write.send if on.write else None,
                     s.plans.send if on.read else None, book=self.book, planner=b.planner, outputs=outputs,
                     settings=plan.PlanSettings(detect=not on.write, workers=cfg.plan.threads), limiter=lim.plan,
                     h5_limiter=lim.h5)
        segmenter = await anyio.to_thread.run_sync(b.make_segmenter, limiter=lim.segment)
        await _start(tg, segment.run, s.thumbnails.receive, s.masks.send, book=self.book, segmenter=segmenter,
                     batch_size=cfg.segment.seg_batch_size, limiter=lim.segment, keep_thumbnails=cfg.write.qc)
        settings_p = prepare.PrepareSettings(workers=cfg.open.open_workers, encoders=cfg.encode.extractors
                                             if on.encode else (), skip_existing=cfg.write.skip_existing)
        await _start(tg, prepare.run, s.jobs.receive, s.thumbnails.send, book=self.book, slides=b.slides,
                     outputs=outputs, settings=settings_p, limiter=lim.open)

    async def _write(self, settings: write.WriteSettings, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Stage `write`; no slide finishes after it, so the input of stage `embed` (if any) ends with it."""
        try:
            await write.run(self.streams.to_write.receive, book=self.book, outputs=self.backends.outputs,
                            settings=settings, limiter=self.limiters.h5, task_status=task_status)
        finally:
            if self.to_embed is not None:
                self.to_embed.send.close()


async def _start(tg: TaskGroup, stage: Callable[..., Coroutine[object, object, None]], *args: object,
                 **kwargs: object) -> None:
    """Start one stage and wait until it reports ready (its set-up done)."""
    await tg.start(functools.partial(stage, *args, **kwargs))


def _full(config: PipelineConfig) -> str:
    return f"the pipeline is full ({config.queues.jobs} slides waiting)"


@asynccontextmanager
async def running(config: PipelineConfig, backends: Backends | None, mode: Mode, report: RunReport | None = None,
                  stop_on_output_failure: bool = False) -> AsyncIterator[Pipeline]:
    """Start a pipeline (sized for its device; the real backends unless `backends` are given; `report` begun); on
    normal exit close the input and drain; on error or cancellation cancel it.

    Results not consumed by the caller are drained (they are still counted) when the block exits.
    """
    from .backends.cuda_streams import size_for_device

    # asks the CUDA device for its free memory (initialising CUDA): off the event loop, on a limiter of ours
    config = await anyio.to_thread.run_sync(size_for_device, config, limiter=anyio.CapacityLimiter(1))
    if backends is None:
        from .assembly import RealBackends

        backends = RealBackends(config)
    pipeline = Pipeline(config, backends, mode, report, stop_on_output_failure)
    try:
        async with serving(pipeline, pipeline.run):
            if report is not None:  # the models are loaded now: say which precision each encoder's forward runs in
                report.begin({**dataclasses.asdict(config), "precision_ran": dict(pipeline.precision_ran)})
            yield pipeline
            await pipeline.close_input()
            async with pipeline.results() as rest:
                async for _ in rest:
                    pass
    except BaseException as exc:
        pipeline.fail_waiters(exc)
        raise
    finally:
        if pipeline.state != "failed":
            pipeline.state = "closed"
        pipeline.streams.results.receive.close()
