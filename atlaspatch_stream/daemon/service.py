"""`serve_folder`: the daemon's library twin — every slide that has fully arrived in a folder, processed once.

```
FolderWatcher (scan, settle, ledger) ─ReadySlide─▶ FolderService (a JobSource) ─▶ run.drive ─▶ Pipeline
                                                        ▲ settle(result): ledger, results()  │
                                                        └────────────────────────────────────┘
```
The watcher owns arrival (events are hints, rescans the truth, completeness checks) and the ledger's state machine;
`run.drive` owns the run contract (intake, stop and drain, every slide one result); the unchanged pipeline does
the work. `settle` reports each result back to the ledger (done, retry, quarantine, deferred, by the failure's
retry class) and to the caller. Backpressure runs end to end: while the pipeline is full, `submit` waits, the
watcher's send waits, and ready slides stay in the ledger.

Library rules: no signal handlers, no logging handlers, no `sys.exit`; blocking work only on limiters of its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream

from .. import __version__
from ..config import PipelineConfig
from ..errors import ConfigError, refused
from ..items import EngineStatistics, SlideJob, SlideResult
from ..outputs.claims import judge
from ..pipeline import Mode, Pipeline, default_mode, running
from ..protocols import Backends
from ..report import RunReport
from ..run import Stop, drive, reporting
from .ledger.facade import Ledger
from .ledger.holder import check_free
from .ledger.states import RetryPolicy, Settings
from .ledger.store import LEDGER_FILE
from .ops.logs import Pseudonymizer, RedactPaths
from .ops.notify import Notifier
from .ops.statusfile import STATUS_FILE, StatusBoard, run_status_file
from .watcher import FolderWatcher, ReadySlide, WatcherOptions, WatchStatistics

log = logging.getLogger(__name__)

FINISHED_OK = ("done", "reused", "skipped")


@dataclass(frozen=True)
class FolderResult:
    """One slide's outcome in the daemon: the pipeline's result and the ledger state it led to."""

    slide: ReadySlide
    result: SlideResult
    state: str  # the ledger state after the result: done, failed, quarantined, deferred, ready (released)


@dataclass(frozen=True)
class FolderStatistics:
    """The folder service at one moment: its pipeline, its watcher (the slides in flight too), whether it drains."""

    pipeline: EngineStatistics
    watch: WatchStatistics
    draining: bool


@dataclass
class FolderService:
    """A running folder service (from `serve_folder`): iterate `results()`, `stop()` to drain, read `statistics()`.

    It is the `run.JobSource` of the daemon: `jobs()` are the slides the watcher finds ready, `settle()` reports
    each result to the ledger.
    """

    pipeline: Pipeline
    watcher: FolderWatcher
    ledger: Ledger
    notifier: Notifier
    redactor: RedactPaths | None
    board: StatusBoard = field(init=False)
    _watch_scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    _stop: Stop = field(default_factory=Stop)
    drained: anyio.Event = field(default_factory=anyio.Event)

    def __post_init__(self) -> None:
        self.board = StatusBoard(version=__version__, config_fp=self.watcher.settings.fingerprint,
                                 started_at=time.time())
        self._ready_send, self._ready = anyio.create_memory_object_stream[ReadySlide](1)
        self._results_send, self._results = anyio.create_memory_object_stream[FolderResult](64)

    @property
    def stopping(self) -> bool:
        """Whether `stop()` was called (intake stopped, the slides in flight draining)."""
        return self._watch_scope.cancel_called

    def results(self) -> MemoryObjectReceiveStream[FolderResult]:
        """Each slide's outcome as it finishes; ends once intake stopped (or `--once` ran out) and all drained.

        Consume it: the service is bounded end to end, so unread results eventually hold intake up.
        """
        return self._results.clone()

    def stop(self, reason: str = "stopping") -> None:
        """First phase of shutdown: the watcher takes no new slide; every slide already handed to the pipeline
        finishes (`serve_folder`'s exit waits `drain_timeout_s` for them, then cancels what is left)."""
        if self.stopping:
            return
        self.board.draining = True
        in_flight = len(self.watcher.in_flight)
        self.notifier.stopping(f"{reason}: draining {in_flight} slide(s)")
        log.info("%s: intake stopped, draining %d slide(s)", reason, in_flight,
                 extra={"event": "draining", "in_flight": in_flight})
        self._watch_scope.cancel()  # the job source ends, so the run closes the pipeline's input and drains it

    def scan_now(self) -> None:
        """Rescan the folder at once (SIGHUP)."""
        self.watcher.scan_now()

    def statistics(self) -> FolderStatistics:
        """The pipeline's statistics, the watcher's, and the slides in flight."""
        return FolderStatistics(self.pipeline.statistics(), self.watcher.statistics(), self.stopping)

    # -- the job source ---------------------------------------------------------------------------------------------

    async def jobs(self) -> AsyncIterator[SlideJob]:
        """Each slide the watcher finds ready, as a job (the redactor learns its paths first); ends when the watcher
        ends (`--once`, or stopped)."""
        async for slide in self._ready:
            if self.redactor is not None and slide.pseudonym:
                self.redactor.add(slide.pseudonym, slide.path, slide.slide_id, slide.path.name)
            yield SlideJob(slide.row_id, slide.path, slide.stem, display=slide.display, pseudonym=slide.pseudonym)

    async def settle(self, job: SlideJob, result: SlideResult) -> None:
        """The slide's result back to the ledger, then to the caller."""
        slide = self.watcher.in_flight[job.slide_id]  # `drive` settles only the jobs we gave out, each once
        state = await self._record(slide, result)
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):  # nobody listens any more
            await self._results_send.send(FolderResult(slide, result, state))

    def unsent(self) -> list[SlideJob]:
        """None: slides not taken stay `ready` in the ledger."""
        return []

    # -- the loops ----------------------------------------------------------------------------------------------

    async def _watch(self, once: bool, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run the watcher until stopped (or, `once`, until every slide ready now is sent); closes its stream."""
        async with self._ready_send:
            with self._watch_scope:
                if once:
                    task_status.started()
                    await self.watcher.run_once(self._ready_send)
                else:
                    await self.watcher.run(self._ready_send, task_status=task_status)

    async def _drive(self, drain_timeout_s: float) -> None:
        """The run contract over the watched folder, until the watcher ends or a stop has drained."""
        try:
            async with self._results_send:
                await drive(self, self.pipeline, stop=self._stop, drain_timeout_s=drain_timeout_s)
        finally:
            self.drained.set()

    async def _record(self, slide: ReadySlide, result: SlideResult) -> str:
        now = self.watcher.clock.now()
        for stage, seconds in result.timings.items():
            if stage != "total":
                self.board.add_stage_busy(stage, seconds)
        if result.status in FINISHED_OK or (result.status == "locked" and await self._done_elsewhere(slide, result)):
            h5 = result.h5_path or self.pipeline.backends.outputs.h5_path(result.job)
            await self.watcher.slide_done(slide, h5)
            self.board.slide_finished("done", now, self._patches(result))
            return "done"
        if result.status == "cancelled":
            await self.watcher.slide_released(slide)
            return "ready"
        failure = result.failure or refused("prepare", "locked", "transient")  # a locked slide: uncharged
        message = self.redactor.redact(result.message) if self.redactor is not None else result.message
        await self.watcher.slide_failed(slide, failure, message)
        record = await self.ledger.get(slide.slide_id)
        state = record.state if record is not None else "failed"
        self.board.slide_finished(state, now)
        return state

    async def _done_elsewhere(self, slide: ReadySlide, result: SlideResult) -> bool:
        """`--once`, for a slide another live worker holds: wait while its lock is held (looking at most every
        second), then True when its complete H5 is there (done by that worker, not failed here)."""
        if not self.watcher.once:
            return False  # the daemon asks again later (transient, uncharged)
        outputs, job, clock = self.pipeline.backends.outputs, result.job, self.watcher.clock
        limiter = self.watcher.limiter
        log.info("%s: locked by another live worker; waiting for it", slide.display,
                 extra={"event": "waiting_for_other_worker", "slide": slide.display})
        while (await anyio.to_thread.run_sync(judge, outputs.lock_path(job), limiter=limiter)).state == "held":
            await clock.sleep_until(clock.now() + min(self.watcher.recheck_s, 1.0))
        decision = await anyio.to_thread.run_sync(outputs.reuse_decision, job, self.watcher.settings.encoders,
                                                  limiter=limiter)
        if decision.action != "skip":
            return False
        log.info("%s: done by another worker", slide.display, extra={"event": "done_elsewhere"})
        return True

    def _patches(self, result: SlideResult) -> dict[str, int]:
        count = int(result.num_patches or 0)
        return {name: count for name in result.features} or {"coords": count}

    async def _refresh(self, interval_s: float) -> None:
        """Keep the status board (status file, metrics) and systemd's STATUS line current."""
        while True:
            counts = await self.ledger.counts()
            self.board.set_states(counts)
            self.board.set_queue_fill({name: edge.fill for name, edge in self.pipeline.statistics().streams.items()})
            watch = self.watcher.statistics()
            self.board.paused_because = watch.paused_because
            self.board.last_scan_at = watch.last_scan_at  # the board's only writer of it
            self.board.events_total = watch.events
            self.notifier.status(_status_line(counts, watch.paused_because, self.stopping))
            await anyio.sleep(interval_s)


def _status_line(counts: dict[str, int], paused: str | None, draining: bool) -> str:
    text = ", ".join(f"{counts.get(s, 0)} {s}" for s in ("running", "ready", "done", "failed", "quarantined"))
    if paused:
        text += f"; intake paused: {paused}"
    return text + ("; draining" if draining else "")


def _refuse_root(allow_root: bool) -> None:
    if not allow_root and hasattr(os, "geteuid") and os.geteuid() == 0:
        raise ConfigError("refusing to watch a folder as root: run as a dedicated user (see "
                          "examples/atlaspatch-watch.service) or pass --allow-root")


def _state_dir(config: PipelineConfig) -> Path:
    """The daemon's state folder, created; refused at once when a live daemon holds it (`Ledger.open` then holds it
    for this one)."""
    state = config.watch.state_path(config.write.output)
    state.mkdir(parents=True, exist_ok=True, mode=0o750)
    check_free(state / LEDGER_FILE)
    return state


@asynccontextmanager
async def serve_folder(
    input_folder: Path,
    config: PipelineConfig,
    *,
    mode: Mode | None = None,
    backends: Backends | None = None,
    once: bool = False,
    allow_root: bool = False,
    redactor: RedactPaths | None = None,
) -> AsyncIterator[FolderService]:
    """Watch `input_folder` and process each slide once it has fully arrived; yield the running service.

    Args:
        input_folder: the folder a scanner or copy job drops slides into.
        config: the run's settings; `config.watch` holds the daemon's (settle, rescan, mode, state, retries...).
        mode: as `open_pipeline` (features when encoders are configured, else coordinates only).
        backends: as `open_pipeline` (tests inject fakes).
        once: process every slide ready now, then end (`results()` ends): `atlaspatch watch --once`.
        allow_root: run as root (refused by default).
        redactor: with `config.watch.pseudonymize`, learns each slide's paths so logs can be redacted (attach it
            to your log handler; the run report and the ledger's messages are redacted with it).

    On normal exit the service stops intake and drains the slides in flight for up to `drain_timeout_s`, then
    cancels what is left (partial outputs removed). Records left running go back to `ready`, uncharged.

    Raises:
        ConfigError: the input folder does not exist, root without `allow_root`, a refused metrics address.
        WeightsError, MissingExtraError, LedgerError: before any slide is taken.
    """
    _refuse_root(allow_root)
    watch, output = config.watch, config.write.output
    input_folder = Path(input_folder)
    if not input_folder.is_dir():
        raise ConfigError(f"Input folder does not exist: {input_folder}")
    notifier = Notifier()  # systemd notifications: from `$NOTIFY_SOCKET`, a no-op without it
    names = Pseudonymizer.from_key_file(watch.key_path(output)) if watch.pseudonymize else None
    if names is not None and redactor is None:
        redactor = RedactPaths()
    state = _state_dir(config)
    report = RunReport(output, "watch", redactor.redact if redactor is not None else None)
    opening = running(config, backends, mode or default_mode(config), report)
    async with reporting(report, opening) as pipeline, \
            Ledger.open(state / LEDGER_FILE, policy=RetryPolicy.from_config(watch)) as ledger:
        settings = Settings(pipeline.backends.outputs.settings_fingerprint(), tuple(config.encode.extractors))
        max_depth = watch.max_depth if config.source.recursive else min(1, watch.max_depth)
        options = WatcherOptions(input_folder, dataclasses.replace(watch, max_depth=max_depth), output / "patches",
                                 (output, state), pseudonym=names.pseudonym if names is not None else None)
        service = FolderService(pipeline, FolderWatcher(options, ledger, settings), ledger, notifier,
                                redactor)
        try:
            async with _serving(service, once, state):
                yield service
        finally:
            with anyio.CancelScope(shield=True):
                await ledger.release_running()
    notifier.close()


@asynccontextmanager
async def _serving(service: FolderService, once: bool, state: Path) -> AsyncIterator[None]:
    """The watcher, the run and the operations tasks of a service (its pipeline started, its ledger open)."""
    watch, options = service.pipeline.config.watch, service.watcher.options
    async with anyio.create_task_group() as tg, service._ready:
        await tg.start(service._watch, once)
        tg.start_soon(service._drive, watch.drain_timeout_s)
        await _operations(tg, service, state)
        service.notifier.ready(f"watching {options.root}" if options.pseudonym is None else "watching")
        try:
            yield
        except BaseException:
            tg.cancel_scope.cancel()
            raise
        finally:
            service._results.close()
        service.stop()
        with anyio.move_on_after(watch.drain_timeout_s):
            await service.drained.wait()
        if not service.drained.is_set():
            log.warning("drain deadline (%.0f s) reached: cancelling %d slide(s) in flight", watch.drain_timeout_s,
                        len(service.watcher.in_flight), extra={"event": "drain_deadline"})
            service._stop.force()  # the run aborts the pipeline: partial outputs removed, slides back to ready
            await service.drained.wait()
        tg.cancel_scope.cancel()


async def _operations(tg: TaskGroup, service: FolderService, state: Path) -> None:
    """Status file, status board refresh, systemd watchdog, and (only when asked) the metrics endpoint."""
    watch = service.pipeline.config.watch
    await tg.start(lambda task_status: run_status_file(state / STATUS_FILE, service.board.snapshot,
                                                       interval_s=watch.status_interval_s, task_status=task_status))
    tg.start_soon(service._refresh, watch.status_interval_s)
    tg.start_soon(service.notifier.run_watchdog)
    if watch.qc_report_s > 0:
        from ..qc.refresh import refresh_gallery

        tg.start_soon(refresh_gallery, service.pipeline.config.write.output, watch.qc_report_s)
    if watch.metrics is not None:
        from .ops.metrics import make_registry, parse_bind, serve_metrics

        where = await tg.start(serve_metrics, make_registry(service.board), parse_bind(watch.metrics))
        log.info("metrics on %s", where, extra={"event": "metrics_started"})
