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

from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from .config import PipelineConfig
from .daemon.service import FolderResult, FolderService, serve_folder
from .items import SlideJob
from .pipeline import Mode, Pipeline, default_mode, running
from .protocols import Backends
from .report import RunReport
from .run import JobSource, OnResult, RunSummary, Stop, reporting, run_jobs
from .sources.job_list import JobList

if TYPE_CHECKING:
    from .qc.check import Expectations, Verdict

__all__ = [
    "FolderResult", "FolderService", "JobList", "JobSource", "RunSummary", "Stop", "check_outputs", "default_mode",
    "make_jobs", "open_pipeline", "process_slides", "serve_folder", "write_report",
]


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
        stop_on_output_failure: after a systemic failure (full disk, read-only output...), stop starting slides
            (`stop_intake`), as `process` does; by default each slide meets the failure on its own (a service keeps
            answering, each request with the cause).
        redact: applied to slide names and messages in the run report (the daemon's path redaction).
        run_report: write `<out>/atlaspatch-report.jsonl`; False where the caller keeps the report itself (the Ray
            driver records every slide its workers return).

    Raises:
        WeightsError, MissingExtraError, ConfigError: before any slide is opened (and before the run report or any
            output folder is created).

    On normal exit the input is closed and in-flight slides drain; on error or cancellation the pipeline is
    cancelled, partial outputs are removed and locks released.
    """
    report = RunReport(config.write.output, command, redact) if run_report else None
    opening = running(config, backends, mode or default_mode(config), report, stop_on_output_failure)
    async with reporting(report, opening) as pipeline:
        yield pipeline


def make_jobs(paths: Iterable[Path], config: PipelineConfig, start_id: int = 0) -> list[SlideJob]:
    """Discover slides under `paths` (files or folders) and attach `--mpp-csv` overrides by stem.

    Raises:
        ConfigError: a path does not exist, or a folder holds no slide.
    """
    from .sources.discover import discover_slides, load_mpp_csv, slide_job

    mpp = load_mpp_csv(config.source.mpp_csv) if config.source.mpp_csv else {}
    found = [path for root in paths for path in discover_slides(Path(root), config.source.recursive)]
    return [slide_job(path, start_id + i, mpp, check=False) for i, path in enumerate(found)]


async def process_slides(
    slides: Sequence[Path | str] | Sequence[SlideJob] | JobSource,
    config: PipelineConfig,
    *,
    mode: Mode | None = None,
    backends: Backends | None = None,
    on_result: OnResult | None = None,
    stop: Stop | None = None,
    command: str = "library",
) -> RunSummary:
    """Run every slide through the pipeline and return all results (`run.drive` on the local pipeline).

    Args:
        slides: slide files or folders (discovered as upstream does), ready-made `SlideJob`s, or a `JobSource` (the
            SLURM shard runner's, which copies each slide to local disk first and steals other shards' slides).
        config: the run's settings.
        mode: see `open_pipeline`.
        backends: see `open_pipeline`.
        on_result: called on the event loop with each final result (progress displays).
        stop: a `Stop` hook to end the run early (the CLI's Ctrl-C); drains within `config.run.drain_timeout_s`.
        command: recorded in the run report.

    Every job gets exactly one result, also when the run is stopped: slides that never started are `cancelled`.
    After a systemic output failure (full disk, read-only output...) no later slide starts: each is `cancelled`
    ("not started: output disk full"), the slides in flight finish or fail, and `summary.stop_reason` says why.
    """
    source = JobList(await _jobs(slides, config)) if isinstance(slides, Sequence) else slides
    report = RunReport(config.write.output, command)
    opening = running(config, backends, mode or default_mode(config), report, stop_on_output_failure=True)
    return await run_jobs(source, opening, report=report, stop=stop, on_result=on_result,
                          drain_timeout_s=config.run.drain_timeout_s)


async def _jobs(slides: Sequence[Path | str] | Sequence[SlideJob], config: PipelineConfig) -> list[SlideJob]:
    """The jobs given, or those discovered under the paths given (off the event loop: discovery walks folders)."""
    jobs = [p for p in slides if isinstance(p, SlideJob)]
    if jobs:
        return jobs
    found = [Path(p) for p in slides if not isinstance(p, SlideJob)]
    return await anyio.to_thread.run_sync(make_jobs, found, config, limiter=anyio.CapacityLimiter(1))


async def check_outputs(out: Path, expect: Expectations | None = None, *, threads: int | None = None) -> list[Verdict]:
    """Validate every H5 under `<out>/patches` (read only, in a worker thread): a `qc.check.Verdict` per file.

    `expect` holds what the files must match (patch size, target magnification, encoders, slide folder), if known.
    """
    from .qc.check import check_outputs as check

    return await anyio.to_thread.run_sync(lambda: check(out, expect, threads=threads),
                                          limiter=anyio.CapacityLimiter(1))


async def write_report(out: Path, *, threads: int | None = None, page_size: int = 50) -> Path:
    """Write the QC gallery `<out>/qc/index.html` (in a worker thread); returns its path. See `qc.report`."""
    from .qc.report import write_report as write

    return await anyio.to_thread.run_sync(lambda: write(out, threads=threads, page_size=page_size),
                                          limiter=anyio.CapacityLimiter(1))
