"""The async facade: `open_pipeline()`, `process_slides()`, `make_jobs()`.

```python
async def feed(pipeline):
    for job in make_jobs([folder], config):
        await pipeline.submit(job)      # waits while the pipeline is full
    await pipeline.close_input()

async with open_pipeline(config) as pipeline, anyio.create_task_group() as tg:
    tg.start_soon(feed, pipeline)       # feed and consume concurrently: every queue is bounded
    async for result in pipeline.results():
        print(result.job.path, result.status)
```
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from .config import PipelineConfig
from .items import SlideJob, SlideResult
from .pipeline import Mode, Pipeline, running
from .report import RunReport

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup  # anyio depends on it there


def default_mode(config: PipelineConfig) -> Mode:
    """"features" when encoders are requested, else "coords"."""
    return "features" if config.encode.extractors else "coords"


@asynccontextmanager
async def open_pipeline(
    config: PipelineConfig,
    *,
    mode: Mode | None = None,
    backends: Any = None,
    command: str = "library",
) -> AsyncIterator[Pipeline]:
    """Start a pipeline (models loaded, stages ready) and yield it.

    Args:
        config: the run's settings.
        mode: "coords" (segment-and-get-coords), "features" (process) or "detect" (detect-tissue); by default
            "features" when `config.encode.extractors` is set, else "coords".
        backends: the blocking work of every stage; default the real `Backends(config)` (tests inject fakes).
        command: recorded in the run report.

    Raises:
        WeightsError, MissingExtraError, ConfigError: before any slide is opened.

    On normal exit the input is closed and in-flight slides drain; on error or cancellation the pipeline is
    cancelled, partial outputs are removed and locks released.
    """
    if backends is None:
        from .backends.bundle import Backends

        backends = Backends(config)
    report = RunReport(config.write.output, command)
    await anyio.to_thread.run_sync(report.start, _settings_for_report(config))
    pipeline: Pipeline | None = None
    try:
        async with running(config, backends, mode or default_mode(config), report) as pipeline:
            yield pipeline
    except BaseExceptionGroup as group:
        raise _single(group) from group
    finally:
        stats = pipeline.statistics() if pipeline is not None else {}
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(report.end, stats)


def _single(group: BaseExceptionGroup) -> BaseException:
    """The one real error inside nested task-group wrappers (e.g. WeightsError at start-up), else the group."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    return leaves[0] if len(leaves) == 1 else group


def _settings_for_report(config: PipelineConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def make_jobs(paths: Iterable[Path], config: PipelineConfig, start_id: int = 0) -> list[SlideJob]:
    """Discover slides under `paths` (files or folders) and attach `--mpp-csv` overrides by stem."""
    from .sources.discover import discover_slides, load_mpp_csv, stem_for

    mpp = load_mpp_csv(config.source.mpp_csv) if config.source.mpp_csv else {}
    jobs: list[SlideJob] = []
    for root in paths:
        for path in discover_slides(Path(root), config.source.recursive):
            stem = stem_for(path)
            jobs.append(SlideJob(start_id + len(jobs), path, stem, mpp.get(stem), display=str(path)))
    return jobs


@dataclass
class RunSummary:
    """Every slide's final result and the run's totals."""

    results: list[SlideResult] = field(default_factory=list)
    elapsed_s: float = 0.0
    statistics: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> list[SlideResult]:
        """Results of slides that failed."""
        return [r for r in self.results if r.status == "failed"]

    @property
    def ok(self) -> bool:
        """True when no slide failed."""
        return not self.failed

    def count(self, *statuses: str) -> int:
        """How many results have one of `statuses`."""
        return sum(r.status in statuses for r in self.results)


async def process_slides(
    paths: Sequence[Path | str] | Sequence[SlideJob],
    config: PipelineConfig,
    *,
    mode: Mode | None = None,
    backends: Any = None,
    on_result: Callable[[SlideResult, Pipeline], None] | None = None,
    command: str = "library",
) -> RunSummary:
    """Run every slide under `paths` through the pipeline and return all results.

    Args:
        paths: slide files or folders (discovered as upstream does), or ready-made `SlideJob`s.
        config: the run's settings.
        mode: see `open_pipeline`.
        backends: see `open_pipeline`.
        on_result: called on the event loop for each final result (progress displays).
        command: recorded in the run report.
    """
    jobs = [p for p in paths if isinstance(p, SlideJob)]
    if not jobs:  # discovery walks folders: off the event loop
        jobs = await anyio.to_thread.run_sync(make_jobs, [Path(p) for p in paths], config)  # type: ignore[arg-type]
    summary = RunSummary()
    started = time.perf_counter()
    async with open_pipeline(config, mode=mode, backends=backends, command=command) as pipeline:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_feed, pipeline, jobs)
            async for result in pipeline.results():
                summary.results.append(result)
                if on_result is not None:
                    on_result(result, pipeline)
        summary.statistics = pipeline.statistics()
    summary.elapsed_s = time.perf_counter() - started
    return summary


async def _feed(pipeline: Pipeline, jobs: Sequence[SlideJob]) -> None:
    for job in jobs:
        await pipeline.submit(job)
    await pipeline.close_input()
