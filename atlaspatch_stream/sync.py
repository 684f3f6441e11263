"""Blocking twins of `atlaspatch_stream.api`, for scripts and notebooks without an event loop."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread

from . import api
from .config import PipelineConfig
from .items import SlideJob, SlideResult
from .pipeline import Mode, Pipeline


def process_slides(
    paths: Sequence[Path | str] | Sequence[SlideJob],
    config: PipelineConfig,
    *,
    mode: Mode | None = None,
    backends: Any = None,
    on_result: Callable[[SlideResult, Pipeline], None] | None = None,
    command: str = "library",
) -> api.RunSummary:
    """Blocking `api.process_slides` (runs its own event loop, with uvloop when installed)."""

    async def main() -> api.RunSummary:
        return await api.process_slides(paths, config, mode=mode, backends=backends, on_result=on_result,
                                        command=command)

    return run(main)


class BlockingPipeline:
    """Blocking view of a running `Pipeline` (from `open_pipeline`): call it from the thread that opened it."""

    def __init__(self, pipeline: Pipeline, portal: Any) -> None:
        self._pipeline = pipeline
        self._portal = portal

    def submit(self, job: SlideJob) -> None:
        """Queue one slide (blocks while the pipeline is full: consume `results()` from another thread)."""
        self._portal.call(self._pipeline.submit, job)

    def close_input(self) -> None:
        """No more slides."""
        self._portal.call(self._pipeline.close_input)

    def results(self) -> Iterator[SlideResult]:
        """Final results as slides finish, until the input is closed and everything has drained."""
        stream = self._pipeline.results()
        while True:
            try:
                yield self._portal.call(stream.__anext__)
            except StopAsyncIteration:
                return

    def statistics(self) -> dict[str, Any]:
        """Queue fill per stream, slides in flight and totals."""
        return self._pipeline.statistics()


@contextmanager
def open_pipeline(config: PipelineConfig, *, mode: Mode | None = None, backends: Any = None,
                  command: str = "library") -> Iterator[BlockingPipeline]:
    """Blocking `api.open_pipeline`: the pipeline runs on an event loop in a background thread."""
    with anyio.from_thread.start_blocking_portal() as portal, portal.wrap_async_context_manager(
        api.open_pipeline(config, mode=mode, backends=backends, command=command)
    ) as pipeline:
        yield BlockingPipeline(pipeline, portal)


def make_jobs(paths: Sequence[Path], config: PipelineConfig) -> list[SlideJob]:
    """Same as `api.make_jobs` (already blocking)."""
    return api.make_jobs(paths, config)


def run(main: Callable[[], Any]) -> Any:
    """Run an async function on a fresh event loop, with uvloop when it is installed."""
    try:
        import uvloop  # noqa: F401

        options = {"use_uvloop": True}
    except ImportError:
        options = {}
    return anyio.run(main, backend="asyncio", backend_options=options)
