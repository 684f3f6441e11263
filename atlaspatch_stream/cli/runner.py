"""Running a slide command: checks, progress, two-phase interrupt, summary lines and the exit status.

Exit statuses: 0 all slides done (or skipped); 1 a slide failed, collided or the run stopped early for another
reason (a full output disk); 130 after SIGINT and 143 after SIGTERM (drained or not); 2 a usage error.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Protocol, TextIO

import anyio
import click

from ..api import RunSummary, Stop, make_jobs, process_slides
from ..config import PipelineConfig
from ..errors import AtlasPatchError, describe, is_bug, single_error
from ..items import SlideJob, SlideResult
from ..pipeline import Mode
from .allocator import release_free_memory

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup  # anyio depends on it there

log = logging.getLogger("atlaspatch_stream")
SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}
PLAIN_PROGRESS_EVERY_S = 10.0
Engine = Callable[..., Awaitable[RunSummary]]  # `api.process_slides`'s signature: the local pipeline, or Ray


class Statistics(Protocol):
    """What progress reads totals from: a `Pipeline`, or the Ray driver."""

    def statistics(self) -> dict[str, Any]:
        """Totals: `by_status`, `patches`, `patches_per_s`."""
        ...


class Scaling(Protocol):
    """How `--shard`, `--steal`, `--stage-dir` and `--engine` change a run (`cli.scale.Scaled`)."""

    def select(self, jobs: list[SlideJob]) -> list[SlideJob]:
        """The slides this process takes, in order."""
        ...

    def engine(self, progress: Progress) -> Engine:
        """What runs them."""
        ...

    def session(self) -> AbstractContextManager[None]:
        """Held around the run (a Ray connection, a staging folder)."""
        ...


def write_line(text: str, stream: TextIO | None = None) -> None:
    """Print one line; a closed or broken stdout/stderr (`… | head`) never fails a slide or the run."""
    stream = stream or sys.stdout
    try:
        stream.write(text + "\n")
        stream.flush()
    except (BrokenPipeError, ValueError, OSError):
        _silence(stream)


def _silence(stream: TextIO) -> None:
    """Point a broken standard stream at /dev/null, so later writes (and the interpreter's exit flush) are quiet."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)


class _LineHandler(logging.Handler):
    """Log lines printed above the progress bar on a terminal, plainly otherwise; never raises on a broken stderr."""

    def __init__(self, progress: Progress) -> None:
        super().__init__()
        self.progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        self.progress.message(self.format(record))


def setup_logging(verbose: bool, progress: Progress) -> None:
    """Our warnings (debug lines with -v); third-party libraries' errors only (their warnings with -v).

    A broken slide already gets its one [FAIL] line: tifffile's or openslide's own warnings about it are noise
    unless asked for. Lines go through the progress display.
    """
    handler = _LineHandler(progress)
    handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)s | %(name)s | %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if verbose else logging.ERROR)
    log.setLevel(logging.DEBUG if verbose else logging.WARNING)


def check_output(output: Path) -> None:
    """Fail at once (one line) when the output folder cannot be created or written; create nothing yet."""
    existing = output
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise click.ClickException(f"output folder {output} is not writable: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise click.ClickException(f"output folder {output} is not writable: permission denied on {existing}")


def discover(paths: list[Path], config: PipelineConfig) -> list[SlideJob]:
    """Slides to process, or a one-line error."""
    try:
        return make_jobs(paths, config)
    except AtlasPatchError as exc:
        raise click.ClickException(" ".join(str(exc).split())) from exc


class Progress:
    """Slides done/total, patches/s and failures: a tqdm bar on a terminal, a plain line every 10 s otherwise."""

    def __init__(self, total: int, desc: str, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.total = total
        self.desc = desc
        self.done = 0
        self._last = time.monotonic()
        self.bar: Any = None
        if _isatty(self.stream):
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="slide", file=self.stream, dynamic_ncols=True)

    def extend(self, count: int) -> None:
        """`count` more slides to do (slides stolen from other shards)."""
        self.total += count
        if self.bar is not None:
            self.bar.total = self.total
            with contextlib.suppress(BrokenPipeError, OSError, ValueError):
                self.bar.refresh()

    def update(self, result: SlideResult, pipeline: Statistics) -> None:
        """One more slide finished: announce a failure, move the bar or print the periodic line."""
        self.done += 1
        stats = pipeline.statistics()
        failed = stats["by_status"].get("failed", 0)
        if result.status == "failed":
            self.message(f"[FAIL] {result.message}")
        elif result.status == "locked":
            self.message(f"[SKIP] {result.job.name}: {result.message}")
        if self.bar is not None:
            self._bar_update(stats, failed)
        elif time.monotonic() - self._last >= PLAIN_PROGRESS_EVERY_S:
            self._last = time.monotonic()
            write_line(f"{self.desc}: {self.done}/{self.total} slides, {stats['patches_per_s']:.0f} patches/s, "
                       f"{failed} failed", self.stream)

    def _bar_update(self, stats: dict[str, Any], failed: int) -> None:
        try:
            self.bar.set_postfix(patches=stats["patches"], rate=f"{stats['patches_per_s']:.0f}/s", failed=failed,
                                 refresh=False)
            self.bar.update(1)
        except (BrokenPipeError, OSError, ValueError):
            self.bar.disable = True

    def message(self, text: str) -> None:
        """A line of its own, above the bar on a terminal (never glued to it)."""
        if self.bar is not None and not self.bar.disable:
            try:
                self.bar.write(text, file=self.stream)
                return
            except (BrokenPipeError, OSError, ValueError):
                self.bar.disable = True
        write_line(text, self.stream)

    def close(self) -> None:
        """Remove the bar."""
        if self.bar is not None:
            with contextlib.suppress(BrokenPipeError, OSError, ValueError):
                self.bar.close()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (ValueError, OSError):
        return False


async def run_with_signals(config: PipelineConfig, jobs: list[SlideJob], mode: Mode, command: str,
                           progress: Progress, engine: Engine = process_slides) -> tuple[RunSummary, int | None]:
    """Run `jobs`; first SIGINT/SIGTERM stops intake and drains, a second cancels. Returns the signal's exit code."""
    stop = Stop()
    received: list[int] = []

    async def watch() -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                if not received:
                    received.append(signum)
                    name = signal.Signals(signum).name
                    progress.message(f"{name}: no new slides start; finishing the slides in flight "
                                     f"(at most {config.run.drain_timeout_s:g} s; again to abort)")
                    stop.request(f"interrupted by {name}")
                else:
                    stop.force()

    def on_result(result: SlideResult, pipeline: Statistics) -> None:
        progress.update(result, pipeline)
        release_free_memory()  # what the slide's buffers left free in glibc's arenas goes back to the system

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            summary = await engine(jobs, config, mode=mode, stop=stop, command=command, on_result=on_result)
            tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:  # the engine's error, not our signal watcher's task group around it
        raise single_error(group) from None
    return summary, SIGNAL_EXIT.get(signal.Signals(received[0])) if received else None


@contextmanager
def one_line_errors(what: str) -> Iterator[None]:
    """Library errors become one `Error:` line (exit 1); a foreign one is prefixed with `what`; bugs keep their
    traceback."""
    try:
        yield
    except AtlasPatchError as exc:
        raise click.ClickException(" ".join(str(exc).split())) from exc
    except Exception as exc:
        if is_bug(exc):
            raise
        raise click.ClickException(f"{what}: {describe(exc)}") from exc


def execute(config: PipelineConfig, wsi_path: Path, mode: Mode, command: str, verbose: bool,
            scale: Scaling | None = None) -> int:
    """Everything a slide command does after parsing; returns the exit status."""
    from ..sync import run

    desc = {"features": "Processing slides", "coords": "Processing slides", "detect": "Tissue detection"}[mode]
    check_output(config.write.output)
    jobs = discover([wsi_path], config)
    jobs = scale.select(jobs) if scale is not None else jobs
    progress = Progress(len(jobs), desc)
    setup_logging(verbose, progress)
    engine = scale.engine(progress) if scale is not None else process_slides
    try:
        with one_line_errors("the run stopped"), \
                scale.session() if scale is not None else contextlib.nullcontext():
            summary, signalled = run(lambda: run_with_signals(config, jobs, mode, command, progress, engine))
    finally:
        progress.close()
    status = summarize(summary, mode)
    return signalled if signalled is not None else status


def summarize(summary: RunSummary, mode: Mode) -> int:
    """Print upstream's summary lines plus our counts; return the exit status (1 when a slide failed)."""
    count = summary.count
    failed, done = count("failed"), count("done", "reused")
    if mode == "detect":
        write_line(f"Created {done} mask overlay(s), failures: {failed}")
    else:
        if mode == "coords":
            write_line("Segmentation and patch coordinate extraction complete.")
        write_line(f"Completed {done} slide(s), failures: {failed}")
    skipped, locked, cancelled = count("skipped"), count("locked"), count("cancelled")
    if skipped or locked:
        write_line(f"Skipped {skipped} existing, {locked} locked by another process")
    if summary.stop_reason is not None:
        tail = f": {cancelled} slide(s) cancelled (not started or interrupted)" if cancelled else ""
        write_line(f"Stopped early ({summary.stop_reason}){tail}")
    return 1 if failed or summary.stop_reason is not None else 0


def exit_with(status: int) -> Any:
    """Leave the CLI with `status` (the library itself never exits)."""
    sys.exit(status)
