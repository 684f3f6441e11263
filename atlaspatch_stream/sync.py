"""Blocking twins of `atlaspatch_stream.api`, for scripts and notebooks without an event loop."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.from_thread
from anyio.from_thread import BlockingPortal

from . import api
from .api import make_jobs as make_jobs  # already blocking: the same function
from .config import PipelineConfig
from .daemon.service import FolderResult, FolderService, FolderStatistics
from .items import EngineStatistics, SlideJob, SlideResult
from .pipeline import Mode, Pipeline
from .protocols import Backends

if TYPE_CHECKING:
    from .qc.check import Expectations, Verdict


def process_slides(
    paths: Sequence[Path | str] | Sequence[SlideJob],
    config: PipelineConfig,
    *,
    mode: Mode | None = None,
    backends: Backends | None = None,
    on_result: Callable[[SlideResult], None] | None = None,
    stop: api.Stop | None = None,
    command: str = "library",
) -> api.RunSummary:
    """Blocking `api.process_slides` (runs its own event loop, with uvloop when installed).

    `stop` (an `api.Stop`) must be requested on that loop, e.g. from the `on_result` callback.
    """

    return run(lambda: api.process_slides(paths, config, mode=mode, backends=backends, on_result=on_result,
                                          stop=stop, command=command))


class BlockingPipeline:
    """Blocking view of a running `Pipeline` (from `open_pipeline`): call it from the thread that opened it."""

    def __init__(self, pipeline: Pipeline, portal: BlockingPortal) -> None:
        self._pipeline = pipeline
        self._portal = portal

    def submit(self, job: SlideJob) -> None:
        """Queue one slide (blocks while the pipeline is full: consume `results()` from another thread)."""
        self._portal.call(self._pipeline.submit, job)

    def submit_nowait(self, job: SlideJob) -> None:
        """Queue one slide at once, or raise `PipelineFull`."""
        self._portal.call(self._pipeline.submit_nowait, job)

    def process(self, job_or_path: SlideJob | str | Path) -> SlideResult:
        """Submit one slide and block until its own result (safe from many threads at once)."""
        return self._portal.call(self._pipeline.process, job_or_path)

    def process_nowait(self, job_or_path: SlideJob | str | Path) -> SlideResult:
        """`process()`, raising `PipelineFull` at once instead of waiting for room."""
        return self._portal.call(self._pipeline.process_nowait, job_or_path)

    def close_input(self) -> None:
        """No more slides."""
        self._portal.call(self._pipeline.close_input)

    def stop_intake(self, reason: str) -> None:
        """No slide starts any more (see `Pipeline.stop_intake`)."""
        self._portal.call(self._pipeline.stop_intake, reason)

    def results(self) -> Iterator[SlideResult]:
        """Final results of submitted slides as they finish, until the input is closed and everything has drained."""
        return _items(self._portal, self._pipeline.results())

    def statistics(self) -> EngineStatistics:
        """Queue fill per stream, slides in flight, totals and the state."""
        return self._portal.call(self._pipeline.statistics)


@contextmanager
def open_pipeline(config: PipelineConfig, *, mode: Mode | None = None, backends: Backends | None = None,
                  command: str = "library", run_report: bool = True) -> Iterator[BlockingPipeline]:
    """Blocking `api.open_pipeline`: the pipeline runs on an event loop in a background thread."""
    with anyio.from_thread.start_blocking_portal() as portal, portal.wrap_async_context_manager(
        api.open_pipeline(config, mode=mode, backends=backends, command=command, run_report=run_report)
    ) as pipeline:
        yield BlockingPipeline(pipeline, portal)


class BlockingFolderService:
    """Blocking view of a running folder service (from `serve_folder`)."""

    def __init__(self, service: FolderService, portal: BlockingPortal) -> None:
        self._service = service
        self._portal = portal

    def results(self) -> Iterator[FolderResult]:
        """Each slide's `FolderResult` as it finishes, until intake stopped (or `once` ran out) and all drained."""
        return _items(self._portal, self._service.results())

    def stop(self, reason: str = "stopping") -> None:
        """Stop intake; the slides in flight drain when the `with` block ends."""
        self._portal.call(self._service.stop, reason)

    def statistics(self) -> FolderStatistics:
        """Pipeline and watcher statistics."""
        return self._portal.call(self._service.statistics)


@contextmanager
def serve_folder(input_folder: Path, config: PipelineConfig, **options: Any) -> Iterator[BlockingFolderService]:
    """Blocking `api.serve_folder`: the service runs on an event loop in a background thread."""
    with anyio.from_thread.start_blocking_portal() as portal, portal.wrap_async_context_manager(
        api.serve_folder(input_folder, config, **options)
    ) as service:
        yield BlockingFolderService(service, portal)


def check_outputs(out: Path, expect: Expectations | None = None, *, threads: int | None = None) -> list[Verdict]:
    """Blocking `api.check_outputs`: a `qc.check.Verdict` per file under `<out>/patches`."""
    from .qc.check import check_outputs as check

    return check(out, expect, threads=threads)


def write_report(out: Path, *, threads: int | None = None, page_size: int = 50) -> Path:
    """Blocking `api.write_report`: the QC gallery `<out>/qc/index.html`."""
    from .qc.report import write_report as write

    return write(out, threads=threads, page_size=page_size)


def _items(portal: Any, stream: Any) -> Iterator[Any]:
    """The items of a receive stream of the portal's loop, from this thread, until it ends; then close it."""
    try:
        while True:
            try:
                yield portal.call(stream.receive)
            except anyio.EndOfStream:
                return
    finally:
        portal.call(stream.aclose)


def run(main: Callable[[], Any]) -> Any:
    """Run an async function on a fresh event loop, with uvloop when it is installed."""
    try:
        import uvloop  # noqa: F401

        options = {"use_uvloop": True}
    except ImportError:
        options = {}
    return anyio.run(main, backend="asyncio", backend_options=options)
