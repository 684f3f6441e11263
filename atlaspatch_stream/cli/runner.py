"""Running a slide command: checks, progress, two-phase interrupt, summary lines and the exit status.

Exit statuses: 0 all slides done (or skipped); 1 a slide failed, collided or the run stopped early for another
reason (a full output disk); 130 after SIGINT and 143 after SIGTERM (drained or not); 2 a usage error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Protocol, TextIO

import click

from ..api import make_jobs
from ..config import PipelineConfig
from ..errors import AtlasPatchError, describe, is_bug
from ..items import SlideJob, SlideResult
from ..pipeline import Mode, running
from ..report import RunReport
from ..run import Engine, JobSource, RunSummary, Stop, run_jobs
from ..sources.job_list import JobList
from .allocator import release_free_memory

log = logging.getLogger("atlaspatch_stream")
SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}
PLAIN_PROGRESS_EVERY_S = 10.0


class Scaling(Protocol):
    """How `--shard`, `--steal`, `--stage-dir` and `--engine` change a run (`cli.scale.Scaled`)."""

    def select(self, jobs: list[SlideJob]) -> list[SlideJob]:
        """The slides this process takes, in order."""
        ...

    def source(self, jobs: list[SlideJob], progress: Progress) -> JobSource:
        """Where the run takes them from (a shard that steals and copies slides to local disk)."""
        ...

    def opening(self, config: PipelineConfig, mode: Mode, report: RunReport) -> AbstractAsyncContextManager[Engine]:
        """What runs them (the local pipeline, or the Ray pool), not yet opened."""
        ...

    def finished(self) -> None:
        """Print what the scaling did (slides stolen), after the run."""
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
    quiet_slide_libraries(verbose)


# Libraries whose own log lines about a broken slide repeat what its [FAIL] line says (e.g. tifffile's
# "ERROR | tifffile | <tifffile.TiffPages @8> invalid page offset ..." for a truncated file).
SLIDE_LIBRARIES = ("tifffile", "tiffslide", "openslide", "imagecodecs", "zarr", "numcodecs")


def quiet_slide_libraries(verbose: bool) -> None:
    """Slide libraries say nothing without -v (the slide's [FAIL] line carries the cause); warnings with -v."""
    for name in SLIDE_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING if verbose else logging.CRITICAL)


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
        self.failed = 0
        self.patches = 0
        self._started = self._last = time.monotonic()
        self.bar: Any = None
        tty = False
        with contextlib.suppress(ValueError, OSError):  # a closed or broken stream is no terminal
            tty = self.stream.isatty()
        if tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="slide", file=self.stream, dynamic_ncols=True)

    def extend(self, count: int) -> None:
        """`count` more slides to do (slides stolen from other shards)."""
        self.total += count
        if self.bar is not None:
            self.bar.total = self.total
            with contextlib.suppress(BrokenPipeError, OSError, ValueError):
                self.bar.refresh()

    def update(self, result: SlideResult) -> None:
        """One more slide finished: announce a failure, move the bar or print the periodic line."""
        self.done += 1
        self.failed += result.status == "failed"
        if result.status in ("done", "reused"):
            self.patches += result.num_patches or 0
        if result.status == "failed":
            self.message(f"[FAIL] {result.message}")
        elif result.status == "locked":
            self.message(f"[SKIP] {result.job.name}: {result.message}")
        rate = self.patches / max(1e-9, time.monotonic() - self._started)
        if self.bar is not None:
            try:
                self.bar.set_postfix(patches=self.patches, rate=f"{rate:.0f}/s", failed=self.failed, refresh=False)
                self.bar.update(1)
            except (BrokenPipeError, OSError, ValueError):
                self.bar.disable = True
        elif time.monotonic() - self._last >= PLAIN_PROGRESS_EVERY_S:
            self._last = time.monotonic()
            write_line(f"{self.desc}: {self.done}/{self.total} slides, {rate:.0f} patches/s, "
                       f"{self.failed} failed", self.stream)

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


class Signals:
    """SIGINT and SIGTERM (and `also`, e.g. the daemon's SIGHUP) for the rest of the process: each is recorded and,
    while a run is on, handed to it on its event loop.

    Python-level handlers, installed once and never removed: a signal that lands after the run has drained (while
    the summary is printed, or the event loop closes) is recorded and changes nothing, instead of killing the process
    by the signal with no summary. The event loop is told through `call_soon_threadsafe`, as asyncio's own signal
    handling does.
    """

    def __init__(self, also: tuple[signal.Signals, ...] = ()) -> None:
        self.received: list[signal.Signals] = []  # SIGINT and SIGTERM, in order
        self._relay: Callable[[signal.Signals], None] | None = None
        for sig in (signal.SIGINT, signal.SIGTERM, *also):
            signal.signal(sig, self._handle)

    @property
    def exit_status(self) -> int | None:
        """130 after SIGINT, 143 after SIGTERM (the first signal decides), None without one."""
        return SIGNAL_EXIT[self.received[0]] if self.received else None

    def _handle(self, signum: int, _frame: object) -> None:
        sig = signal.Signals(signum)
        if sig in SIGNAL_EXIT:
            self.received.append(sig)
        if self._relay is not None:
            self._relay(sig)

    @contextmanager
    def relayed(self, act: Callable[[signal.Signals], None]) -> Iterator[None]:
        """While the block runs on this event loop, each signal calls `act(signal)` there (`received` says how many
        came before)."""
        loop = asyncio.get_running_loop()

        def relay(sig: signal.Signals) -> None:
            loop.call_soon_threadsafe(act, sig)

        self._relay = relay
        for sig in self.received:  # a signal that came before the loop ran
            loop.call_soon(act, sig)
        try:
            yield
        finally:
            self._relay = None

    @contextmanager
    def stopping(self, stop: Stop, announce: Callable[[str], None], drain_timeout_s: float) -> Iterator[None]:
        """While the block runs, the first SIGINT/SIGTERM requests `stop` (announced), a second forces it."""
        def act(sig: signal.Signals) -> None:
            if stop.requested.is_set():
                stop.force()
                return
            announce(f"{sig.name}: no new slides start; finishing the slides in flight (at most "
                     f"{drain_timeout_s:g} s; again to abort)")
            stop.request(f"interrupted by {sig.name}")

        with self.relayed(act):
            yield


def ignore_late_signals() -> None:
    """The command is over and its exit status decided: from now on SIGINT and SIGTERM are ignored.

    While the interpreter shuts down, Python puts its own handlers back to the default, so a signal landing in that
    last stretch (a second Ctrl-C just after the drain) would still kill the process by the signal; an ignored
    signal stays ignored through the shutdown.
    """
    for sig in SIGNAL_EXIT:
        signal.signal(sig, signal.SIG_IGN)


async def run_with_signals(config: PipelineConfig, source: JobSource, opening: AbstractAsyncContextManager[Engine],
                           report: RunReport, progress: Progress, signals: Signals) -> RunSummary:
    """Run every job of `source` on the engine `opening` opens, stopped by `signals`."""
    stop = Stop()
    trimmer = ThreadPoolExecutor(1, thread_name_prefix="malloc-trim")  # malloc_trim walks every arena: off the loop

    def on_result(result: SlideResult) -> None:
        progress.update(result)
        trimmer.submit(release_free_memory)  # what the slide's buffers left free in glibc's arenas goes back

    try:
        with signals.stopping(stop, progress.message, config.run.drain_timeout_s):
            return await run_jobs(source, opening, report=report, stop=stop, on_result=on_result,
                                  drain_timeout_s=config.run.drain_timeout_s)
    finally:
        trimmer.shutdown(wait=False, cancel_futures=True)


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
    check_output(config.write.output)
    jobs = discover([wsi_path], config)
    status = run_command(config, jobs, mode, command, verbose, scale)[1]
    ignore_late_signals()
    return status


def run_command(config: PipelineConfig, jobs: list[SlideJob], mode: Mode, command: str, verbose: bool,
                scale: Scaling | None = None) -> tuple[RunSummary, int]:
    """Run `jobs` with progress, signals and the summary lines; returns the summary and the exit status.

    The signal handlers stay until the process exits (`Signals`): every interrupted run exits 130 (143 for SIGTERM),
    however late the signal lands.
    """
    from ..sync import run

    desc = {"features": "Processing slides", "coords": "Processing slides", "detect": "Tissue detection"}[mode]
    jobs = scale.select(jobs) if scale is not None else jobs
    progress = Progress(len(jobs), desc)
    setup_logging(verbose, progress)
    report = RunReport(config.write.output, command)
    source = scale.source(jobs, progress) if scale is not None else JobList(jobs)
    opening = (scale.opening(config, mode, report) if scale is not None
               else running(config, None, mode, report, stop_on_output_failure=True))
    signals = Signals()
    try:
        with one_line_errors("the run stopped"), scale.session() if scale is not None else contextlib.nullcontext():
            summary = run(lambda: run_with_signals(config, source, opening, report, progress, signals))
    finally:
        progress.close()
    if scale is not None:
        scale.finished()
    status = summarize(summary, mode)
    return summary, signals.exit_status if signals.exit_status is not None else status


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
