"""Running a command: discovery, progress display, two-phase Ctrl-C, summary lines and the exit status."""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import Any

import anyio
import click

from ..config import PipelineConfig
from ..errors import AtlasPatchError, ConfigError
from ..items import SlideJob, SlideResult
from ..pipeline import Mode, Pipeline

log = logging.getLogger("atlaspatch_stream")
DRAIN_DEADLINE_S = 30.0


class _TqdmHandler(logging.Handler):
    """Log lines printed above the progress bar, so `-v` and the bar coexist."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


def setup_logging(verbose: bool) -> None:
    """WARNING by default, DEBUG with -v; lines go through the progress bar."""
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)s | %(name)s | %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    for noisy in ("PIL", "matplotlib", "urllib3", "h5py", "fsspec", "asyncio", "tifffile"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def check_output(output: Path) -> None:
    """Create the output folder or fail at once with one line."""
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / f".atlaspatch-write-test-{id(output)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise click.ClickException(f"output folder {output} is not writable: {exc.strerror or exc}") from exc


def discover(paths: list[Path], config: PipelineConfig) -> list[SlideJob]:
    """Slides to process, or a one-line error."""
    from ..api import make_jobs

    try:
        return make_jobs(paths, config)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


class Progress:
    """A tqdm bar: slides done/total and patches/s."""

    def __init__(self, total: int, desc: str) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="slide", file=sys.stderr, dynamic_ncols=True,
                        disable=None)

    def update(self, result: SlideResult, pipeline: Pipeline) -> None:
        """One more slide finished."""
        stats = pipeline.statistics()
        self.bar.set_postfix(patches=stats["patches"], rate=f"{stats['patches_per_s']:.0f}/s",
                             failed=stats["by_status"].get("failed", 0), refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        """Remove the bar."""
        self.bar.close()


async def _watch_signals(pipeline: Pipeline, stop: anyio.Event, scope: anyio.CancelScope) -> None:
    """First Ctrl-C: stop feeding and drain within a deadline; second: cancel."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            if not stop.is_set():
                log.warning("interrupt: finishing slides in flight (Ctrl-C again to abort)")
                stop.set()
                await pipeline.close_input()
                scope.deadline = anyio.current_time() + DRAIN_DEADLINE_S
            else:
                scope.cancel()
                return


async def _feed(pipeline: Pipeline, jobs: list[SlideJob], stop: anyio.Event) -> None:
    for job in jobs:
        if stop.is_set():
            return
        await pipeline.submit(job)
    await pipeline.close_input()


async def run_pipeline(config: PipelineConfig, jobs: list[SlideJob], mode: Mode, command: str,
                       desc: str) -> list[SlideResult]:
    """Run `jobs` with a progress bar and signal handling; return every final result."""
    from ..api import open_pipeline

    results: list[SlideResult] = []
    progress = Progress(len(jobs), desc)
    stop = anyio.Event()
    try:
        with anyio.CancelScope() as scope:
            async with open_pipeline(config, mode=mode, command=command) as pipeline, \
                    anyio.create_task_group() as tg:
                tg.start_soon(_watch_signals, pipeline, stop, scope)
                tg.start_soon(_feed, pipeline, jobs, stop)
                async for result in pipeline.results():
                    results.append(result)
                    progress.update(result, pipeline)
                    _announce(result)
                tg.cancel_scope.cancel()
    finally:
        progress.close()
    return results


def _announce(result: SlideResult) -> None:
    if result.status == "failed":
        click.echo(f"[FAIL] {result.message}", err=True)
    elif result.status == "locked":
        click.echo(f"[SKIP] {result.job.name}: {result.message}", err=True)
    elif result.ok:
        log.debug("[OK] %s -> %s (patches=%s) features=%s", result.job.name, result.h5_path, result.num_patches,
                  ",".join(result.features))


def execute(config: PipelineConfig, wsi_path: Path, mode: Mode, command: str, verbose: bool) -> list[SlideResult]:
    """Everything a slide command does after parsing: checks, run, and translating library errors to one line."""
    from ..sync import run

    setup_logging(verbose)
    check_output(config.write.output)
    jobs = discover([wsi_path], config)
    desc = {"features": "Processing slides", "coords": "Processing slides", "detect": "Tissue detection"}[mode]
    try:
        results: list[SlideResult] = run(lambda: run_pipeline(config, jobs, mode, command, desc))
        return results
    except AtlasPatchError as exc:
        raise click.ClickException(" ".join(str(exc).split())) from exc


def summarize(results: list[SlideResult], mode: Mode) -> int:
    """Print upstream's summary lines plus our counts; return the exit status (1 when any slide failed)."""
    failed = sum(r.status == "failed" for r in results)
    done = sum(r.status in ("done", "reused") for r in results)
    if mode == "detect":
        click.echo(f"Created {done} mask overlay(s), failures: {failed}")
    else:
        if mode == "coords":
            click.echo("Segmentation and patch coordinate extraction complete.")
        click.echo(f"Completed {done} slide(s), failures: {failed}")
    skipped = sum(r.status == "skipped" for r in results)
    locked = sum(r.status == "locked" for r in results)
    if skipped or locked:
        click.echo(f"Skipped {skipped} existing, {locked} locked by another process")
    return 1 if failed else 0


def exit_with(status: int) -> Any:
    """Leave the CLI with `status` (the library itself never exits)."""
    sys.exit(status)
