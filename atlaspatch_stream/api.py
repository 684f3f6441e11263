"""The async facade: `open_pipeline()`, `process_slides()`, `make_jobs()`.

A service submits one slide and awaits its own result; many requests may do so at once:

```python
async with open_pipeline(config) as pipeline:
    result = await pipeline.process("/slides/a.svs")     # waits for room; PipelineFull with process_nowait
```

A batch feeds and consumes concurrently (every queue is bounded):

```python
async def feed(pipeline):
    for job in make_jobs([folder], config):
        await pipeline.submit(job)
    await pipeline.close_input()

async with open_pipeline(config) as pipeline, anyio.create_task_group() as tg:
    tg.start_soon(feed, pipeline)
    async with pipeline.results() as results:
        async for result in results:
            print(result.job.path, result.status)
```

Errors: start-up problems (weights, extras, configuration) and a broken device come out of `open_pipeline` as the
exception itself, never wrapped in an `ExceptionGroup`; an exception raised in the body propagates unchanged;
per-slide failures are never exceptions, only results. The library installs no signal handler, configures no logging
handler, never exits the process, and runs blocking work only on limiters of its own.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from .config import PipelineConfig
from .items import SlideJob, SlideResult
from .pipeline import Mode, Pipeline, running
from .protocols import Backends
from .report import RunReport, RunStatus

Feeder = Callable[[Pipeline, Sequence[SlideJob]], Coroutine[Any, Any, None]]

def default_mode(config: PipelineConfig) -> Mode:
    """"features" when encoders are requested, else "coords"."""
    return "features" if config.encode.extractors else "coords"


@asynccontextmanager
async def open_pipeline(
    config: PipelineConfig,
    *,
    mode: Mode | None = None,
    backends: Backends | None = None,
    command: str = "library",
    stop_on_output_failure: bool = False,
    redact: Callable[[str], str] | None = None,
    run_report: bool = True,
) -> AsyncIterator[Pipeline]:
    """Start a pipeline (models loaded, stages ready) and yield it.

    Args:
        config: the run's settings.
        mode: "coords" (segment-and-get-coords), "features" (process) or "detect" (detect-tissue); by default
            "features" when `config.encode.extractors` is set, else "coords".
        backends: the blocking work of every stage; default the real `RealBackends(config)` (tests inject fakes).
        command: recorded in the run report.
        stop_on_output_failure: after a systemic output failure (full disk, read-only output...), stop starting
            slides (`stop_intake`), as `process` does; by default each slide meets the failure on its own (a service
            keeps answering, each request with the cause).
        redact: applied to slide names and messages in the run report (the daemon's path redaction).
        run_report: write `<out>/atlaspatch-report.jsonl`; False where the caller keeps the report itself (the Ray
            driver records every slide its workers return).

    Raises:
        WeightsError, MissingExtraError, ConfigError: before any slide is opened (and before the run report or any
            output folder is created).

    On normal exit the input is closed and in-flight slides drain; on error or cancellation the pipeline is
    cancelled, partial outputs are removed and locks released.
    """
    report = RunReport(config.write.output if run_report else None, command, redact)
    async with _open(config, mode, backends, report, stop_on_output_failure) as pipeline:
        yield pipeline


@asynccontextmanager
async def _open(config: PipelineConfig, mode: Mode | None, backends: Backends | None, report: RunReport,
                stop_on_output_failure: bool) -> AsyncIterator[Pipeline]:
    """`open_pipeline` with a report the caller may still write to before `report.end()`."""
    from .backends.streams import size_for_device

    # asks the CUDA device for its free memory (initialising CUDA): off the event loop, on a limiter of ours
    config = await anyio.to_thread.run_sync(size_for_device, config, limiter=anyio.CapacityLimiter(1))
    if backends is None:
        from .backends.bundle import RealBackends

        backends = RealBackends(config)
    report.begin(dataclasses.asdict(config))
    pipeline: Pipeline | None = None
    status: RunStatus = "failed"
    try:
        async with running(config, backends, mode or default_mode(config), report, stop_on_output_failure) as pipeline:
            from .backends.encoders.runtime import precision_ran

            ran = {name: how for name, how in precision_ran().items() if name in config.encode.extractors}
            report.begin({**dataclasses.asdict(config), "precision_ran": ran})  # the models are loaded now
            await anyio.to_thread.run_sync(report.open, limiter=pipeline.limiters.io)
            yield pipeline
            status = "interrupted" if pipeline.book.stop_reason else "completed"
    except anyio.get_cancelled_exc_class():
        status = "interrupted"
        raise
    finally:
        with anyio.CancelScope(shield=True):
            await _close_report(report, pipeline, status)


async def _close_report(report: RunReport, pipeline: Pipeline | None, status: RunStatus) -> None:
    """Record the slides torn down in flight, then the run's last line."""
    if pipeline is None:
        await anyio.to_thread.run_sync(report.end, {}, status, None, limiter=anyio.CapacityLimiter(1))
        return
    io = pipeline.limiters.io
    for result in pipeline.cancelled:
        await anyio.to_thread.run_sync(report.slide, result, limiter=io)
    await anyio.to_thread.run_sync(report.end, pipeline.statistics(), status, pipeline.book.stop_reason, limiter=io)


def make_jobs(paths: Iterable[Path], config: PipelineConfig, start_id: int = 0) -> list[SlideJob]:
    """Discover slides under `paths` (files or folders) and attach `--mpp-csv` overrides by stem.

    Raises:
        ConfigError: a path does not exist, or a folder holds no slide.
    """
    from .sources.discover import discover_slides, load_mpp_csv, slide_job

    mpp = load_mpp_csv(config.source.mpp_csv) if config.source.mpp_csv else {}
    jobs: list[SlideJob] = []
    for root in paths:
        for path in discover_slides(Path(root), config.source.recursive):
            jobs.append(slide_job(path, start_id + len(jobs), mpp, check=False))
    return jobs


@dataclass
class RunSummary:
    """Every slide's final result and the run's totals."""

    results: list[SlideResult] = field(default_factory=list)
    elapsed_s: float = 0.0
    statistics: dict[str, Any] = field(default_factory=dict)
    stop_reason: str | None = None  # why intake stopped early (interrupt, full disk); None for a complete run

    @property
    def failed(self) -> list[SlideResult]:
        """Results of slides that failed."""
        return [r for r in self.results if r.status == "failed"]

    @property
    def ok(self) -> bool:
        """True when no slide failed and the run was not stopped early."""
        return not self.failed and self.stop_reason is None

    def count(self, *statuses: str) -> int:
        """How many results have one of `statuses`."""
        return sum(r.status in statuses for r in self.results)


class Stop:
    """A stop hook for `process_slides`: `request()` stops intake and drains, `force()` cancels at once.

    After `request(reason)`, no new slide starts (each is reported `cancelled`, "not started: <reason>"), slides in
    flight finish within `drain_timeout_s`, then whatever is left is cancelled and its partial output removed.
    """

    def __init__(self) -> None:
        self.requested = anyio.Event()
        self.forced = anyio.Event()
        self.reason: str | None = None

    def request(self, reason: str) -> None:
        """Stop intake (the first call's reason is kept)."""
        if self.reason is None:
            self.reason = reason
        self.requested.set()

    def force(self) -> None:
        """Cancel at once (partial outputs removed)."""
        self.requested.set()
        self.forced.set()


async def process_slides(
    paths: Sequence[Path | str] | Sequence[SlideJob],
    config: PipelineConfig,
    *,
    mode: Mode | None = None,
    backends: Backends | None = None,
    on_result: Callable[[SlideResult, Pipeline], None] | None = None,
    stop: Stop | None = None,
    command: str = "library",
    feed: Feeder | None = None,
) -> RunSummary:
    """Run every slide under `paths` through the pipeline and return all results.

    Args:
        paths: slide files or folders (discovered as upstream does), or ready-made `SlideJob`s.
        config: the run's settings.
        mode: see `open_pipeline`.
        backends: see `open_pipeline`.
        on_result: called on the event loop for each final result (progress displays).
        stop: a `Stop` hook to end the run early (the CLI's Ctrl-C); drains within `config.run.drain_timeout_s`.
        command: recorded in the run report.
        feed: submits the jobs and closes the pipeline's input (default: in order, until intake stops); it reports
            listed jobs it will not submit through `pipeline.cancel_unsubmitted`, and may submit more (the SLURM
            shard runner stages each slide first and steals other shards' slides when its own are done).

    Every job gets exactly one result, also when the run is stopped: slides that never started are `cancelled`.
    After a systemic output failure (full disk, read-only output...) no later slide starts: each is `cancelled`
    ("not started: output disk full"), the slides in flight finish or fail, and `summary.stop_reason` says why.
    """
    jobs = [p for p in paths if isinstance(p, SlideJob)]
    if not jobs:  # discovery walks folders: off the event loop, on a limiter of ours
        found = [Path(p) for p in paths if not isinstance(p, SlideJob)]
        jobs = await anyio.to_thread.run_sync(make_jobs, found, config, limiter=anyio.CapacityLimiter(1))
    summary = RunSummary()
    started = time.perf_counter()
    pipeline: Pipeline | None = None
    with anyio.CancelScope() as scope:
        report = RunReport(config.write.output, command)
        async with _open(config, mode, backends, report, True) as pipeline, anyio.create_task_group() as tg:
            if stop is not None:
                tg.start_soon(_watch_stop, stop, pipeline, scope, config.run.drain_timeout_s)
            tg.start_soon(feed or _feed, pipeline, jobs)
            async with pipeline.results() as results:
                async for result in results:
                    summary.results.append(result)
                    if on_result is not None:
                        on_result(result, pipeline)
            tg.cancel_scope.cancel()
    if pipeline is not None:
        summary.results += pipeline.cancelled
        summary.statistics = pipeline.statistics()
        summary.stop_reason = pipeline.book.stop_reason
    summary.results += _never_reported(jobs, summary.results)
    summary.elapsed_s = time.perf_counter() - started
    return summary


async def _feed(pipeline: Pipeline, jobs: Sequence[SlideJob]) -> None:
    for index, job in enumerate(jobs):
        if pipeline.book.stop_reason is not None:
            await pipeline.cancel_unsubmitted(jobs[index:])
            break
        await pipeline.submit(job)
    await pipeline.close_input()


async def _watch_stop(stop: Stop, pipeline: Pipeline, scope: anyio.CancelScope, drain_timeout_s: float) -> None:
    """First request: stop intake and set the drain deadline; force: cancel at once."""
    await stop.requested.wait()
    pipeline.stop_intake(stop.reason or "interrupted")
    scope.deadline = min(scope.deadline, anyio.current_time() + drain_timeout_s)
    await stop.forced.wait()
    scope.cancel()


def _never_reported(jobs: Sequence[SlideJob], results: Sequence[SlideResult]) -> list[SlideResult]:
    """`cancelled` results for jobs the run was torn down before it could even submit."""
    seen = {r.job.slide_id for r in results}
    return [SlideResult(job, "cancelled", message="not started: the run was cancelled") for job in jobs
            if job.slide_id not in seen]


def serve_folder(input_folder: Path, config: PipelineConfig, **options: Any) -> Any:
    """Watch a folder and process each slide once it has fully arrived: see `atlaspatch_stream.folder.serve_folder`.

    `async with serve_folder(folder, config) as service:` then `async with service.results() as results:`; each
    result is a `FolderResult` (the slide, its `SlideResult`, its ledger state); `service.stop()` drains.
    """
    from .folder import serve_folder as serve

    return serve(input_folder, config, **options)
