"""Blocking twins of `atlaspatch_stream.api`, for scripts and notebooks without an event loop."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio

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
