"""`serve_folder`: the daemon's library twin — every slide that has fully arrived in a folder, processed once.

```
FolderWatcher (scan, settle, ledger) ─ReadySlide─▶ feed ─SlideJob─▶ Pipeline ─SlideResult─▶ collect ─▶ ledger
                                                                                                    └─▶ results()
```
The watcher owns arrival (events are hints, rescans the truth, completeness checks) and the ledger's state machine;
the unchanged pipeline does the work; `collect` reports each result back to the ledger (done, retry, quarantine,
deferred) and to the caller. Backpressure runs end to end: while the pipeline is full, `submit` waits, the watcher's
send waits, and ready slides stay in the ledger.

Library rules: no signal handlers, no logging handlers, no `sys.exit`; blocking work only on limiters of its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from . import __version__
from .api import default_mode, open_pipeline
from .config import PipelineConfig
from .errors import ConfigError
from .items import SlideJob, SlideResult
from .ops.logs import Pseudonymizer, RedactPaths
from .ops.notify import Notifier
from .ops.statusfile import STATUS_FILE, StatusBoard, run_status_file
from .pipeline import Mode, Pipeline
from .protocols import Backends
from .sources.clock import Clock, SystemClock
from .sources.ledger import LEDGER_FILE, ErrorKind, Ledger, RetryPolicy, Settings, classify_error
from .sources.watch import EventSource, FolderWatcher, ReadySlide

log = logging.getLogger(__name__)

FINISHED_OK = ("done", "reused", "skipped")


@dataclass(frozen=True)
class FolderResult:
    """One slide's outcome in the daemon: the pipeline's result and the ledger state it led to."""

    slide: ReadySlide
    result: SlideResult
    state: str  # the ledger state after the result: done, failed, quarantined, deferred, ready (released)


@dataclass
class FolderService:
    """A running folder service (from `serve_folder`): iterate `results()`, `stop()` to drain, read `statistics()`."""

    pipeline: Pipeline
    watcher: FolderWatcher
    ledger: Ledger
    board: StatusBoard
    settings: Settings
    output: Path
    clock: Clock
    notifier: Notifier
    redactor: RedactPaths | None
    _results_send: MemoryObjectSendStream[FolderResult]
    _results: MemoryObjectReceiveStream[FolderResult]
    _watch_scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    _in_flight: dict[int, ReadySlide] = field(default_factory=dict)
    drained: anyio.Event = field(default_factory=anyio.Event)
    stopping: bool = False

    def results(self) -> MemoryObjectReceiveStream[FolderResult]:
        """Each slide's outcome as it finishes; ends once intake stopped (or `--once` ran out) and all drained.

        Consume it: the service is bounded end to end, so unread results eventually hold intake up.
        """
        return self._results.clone()

    def stop(self, reason: str = "stopping") -> None:
        """First phase of shutdown: no new slide is taken; the slides in flight finish (`serve_folder`'s exit waits
        for them up to `drain_timeout_s`)."""
        if self.stopping:
            return
        self.stopping = True
        self.board.draining = True
        self.notifier.stopping(f"{reason}: draining {len(self._in_flight)} slide(s)")
        log.info("%s: intake stopped, draining %d slide(s)", reason, len(self._in_flight),
                 extra={"event": "draining", "in_flight": len(self._in_flight)})
        self._watch_scope.cancel()

    def scan_now(self) -> None:
        """Rescan the folder at once (SIGHUP)."""
        self.watcher.scan_now()

    def statistics(self) -> dict[str, Any]:
        """The pipeline's statistics, the watcher's, and the slides in flight."""
        return {"pipeline": self.pipeline.statistics(), "watch": self.watcher.statistics().__dict__,
                "in_flight": len(self._in_flight), "draining": self.stopping}

    # -- the loops ----------------------------------------------------------------------------------------------

    async def _watch(self, send: MemoryObjectSendStream[ReadySlide], once: bool, *,
                     task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run the watcher until stopped (or, `once`, until every slide ready now is sent); closes `send`."""
        async with send:
            with self._watch_scope:
                if once:
                    task_status.started()
                    await self.watcher.run_once(send)
                else:
                    await self.watcher.run(send, task_status=task_status)

    async def _feed(self, receive: MemoryObjectReceiveStream[ReadySlide]) -> None:
        """Ready slides into the pipeline (waits while it is full); closes its input when intake ends."""
        async with receive:
            async for slide in receive:
                job = self._job(slide)
                self._in_flight[job.slide_id] = slide
                try:
                    await self.pipeline.submit(job)
                except BaseException:
                    self._in_flight.pop(job.slide_id, None)
                    with anyio.CancelScope(shield=True):
                        await self.watcher.slide_released(slide)
                    raise
        await self.pipeline.close_input()

    def _job(self, slide: ReadySlide) -> SlideJob:
        if self.redactor is not None and slide.pseudonym:
            self.redactor.add(slide.pseudonym, slide.path, slide.slide_id, slide.path.name)
        return SlideJob(slide.row_id, slide.path, slide.stem, display=slide.display, pseudonym=slide.pseudonym)

    async def _collect(self) -> None:
        """Every pipeline result back to the ledger (and the caller); the end of results means all drained."""
        try:
            async with self.pipeline.results() as results, self._results_send:
                async for result in results:
                    slide = self._in_flight.pop(result.job.slide_id, None)
                    if slide is None:  # pragma: no cover - every result belongs to a slide we submitted
                        continue
                    state = await self._record(slide, result)
                    with contextlib.suppress(anyio.BrokenResourceError):  # nobody listens any more: drop it
                        await self._results_send.send(FolderResult(slide, result, state))
        finally:
            self.drained.set()

    async def _record(self, slide: ReadySlide, result: SlideResult) -> str:
        now = self.clock.now()
        for stage, seconds in result.timings.items():
            if stage != "total":
                self.board.add_stage_busy(stage, seconds)
        if result.status in FINISHED_OK:
            await self.watcher.slide_done(slide, result.h5_path or "", self.settings)
            self.board.slide_finished("done", now, self._patches(result))
            return "done"
        if result.status == "cancelled":
            await self.watcher.slide_released(slide)
            return "ready"
        kind, message = self._classify(result)
        await self.watcher.slide_failed(slide, kind, message)
        record = await self.ledger.get(slide.slide_id)
        state = record.state if record is not None else "failed"
        self.board.slide_finished(state, now)
        return state

    def _classify(self, result: SlideResult) -> tuple[ErrorKind, str]:
        message = self.redactor.redact(result.message) if self.redactor is not None else result.message
        if result.status == "locked":  # another daemon works on it: ask again later, uncharged
            return "transient", f"locked by another process ({message})"
        if result.extra.get("systemic"):
            return "system", message
        return classify_error(None, message, output_root=self.output), message

    def _patches(self, result: SlideResult) -> dict[str, int]:
        count = int(result.num_patches or 0)
        return {name: count for name in result.features} or {"coords": count}

    async def _refresh(self, interval_s: float) -> None:
        """Keep the status board (status file, metrics) and systemd's STATUS line current."""
        while True:
            counts = await self.ledger.counts()
            self.board.set_states(counts)
            stats = self.pipeline.statistics()
            self.board.set_queue_fill({name: e["used"] / max(1, e["size"]) for name, e in stats["streams"].items()})
            watch = self.watcher.statistics()
            self.board.paused_because = watch.paused_because
            if watch.last_scan_at is not None:
                self.board.last_scan_at = watch.last_scan_at
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
    state = config.watch.state_path(config.write.output)
    state.mkdir(parents=True, exist_ok=True, mode=0o750)
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
    clock: Clock | None = None,
    events: EventSource | None = None,
    notifier: Notifier | None = None,
    redactor: RedactPaths | None = None,
    mounts_text: str | None = None,
    metrics_started: Callable[[str], None] | None = None,
) -> AsyncIterator[FolderService]:
    """Watch `input_folder` and process each slide once it has fully arrived; yield the running service.

    Args:
        input_folder: the folder a scanner or copy job drops slides into.
        config: the run's settings; `config.watch` holds the daemon's (settle, rescan, mode, state, retries...).
        mode: as `open_pipeline` (features when encoders are configured, else coordinates only).
        backends: as `open_pipeline` (tests inject fakes).
        once: process every slide ready now, then end (`results()` ends): `atlaspatch watch --once`.
        allow_root: run as root (refused by default).
        clock, events, mounts_text: injectable time, filesystem events and `/proc/mounts` (tests).
        notifier: systemd notifications (default: from `$NOTIFY_SOCKET`; a no-op without it).
        redactor: with `config.watch.pseudonymize`, learns each slide's paths so logs can be redacted (attach it
            to your log handler; the run report and the ledger's messages are redacted with it).
        metrics_started: called with the bound address when `config.watch.metrics` is set.

    On normal exit the service stops intake and drains the slides in flight for up to `drain_timeout_s`, then
    cancels what is left (partial outputs removed). Records left running go back to `ready`, uncharged.

    Raises:
        ConfigError: the input folder does not exist, root without `allow_root`, a refused metrics address.
        WeightsError, MissingExtraError, LedgerError: before any slide is taken.
    """
    _refuse_root(allow_root)
    watch = config.watch
    input_folder = Path(input_folder)
    if not input_folder.is_dir():
        raise ConfigError(f"Input folder does not exist: {input_folder}")
    clock = clock or SystemClock()
    notifier = notifier or Notifier()
    state = _state_dir(config)
    names = Pseudonymizer.from_key_file(watch.key_path(config.write.output)) if watch.pseudonymize else None
    if names is not None and redactor is None:
        redactor = RedactPaths()
    outer = anyio.CancelScope()
    with outer:
        async with open_pipeline(config, mode=mode or default_mode(config), backends=backends, command="watch",
                                 redact=redactor.redact if redactor is not None else None) as pipeline:
            settings = Settings(pipeline.backends.outputs.settings_fingerprint(), tuple(config.encode.extractors))
            async with Ledger.open(state / LEDGER_FILE, clock=clock, policy=RetryPolicy.from_config(watch)) as ledger:
                try:
                    async with _running(input_folder, config, pipeline, ledger, settings, state, clock, notifier,
                                        redactor, names, events, mounts_text, once, metrics_started,
                                        outer) as service:
                        yield service
                finally:
                    with anyio.CancelScope(shield=True):
                        await ledger.release_running()
    notifier.close()


@asynccontextmanager
async def _running(input_folder: Path, config: PipelineConfig, pipeline: Pipeline, ledger: Ledger,
                   settings: Settings, state: Path, clock: Clock, notifier: Notifier, redactor: RedactPaths | None,
                   names: Pseudonymizer | None, events: EventSource | None, mounts_text: str | None, once: bool,
                   metrics_started: Callable[[str], None] | None,
                   outer: anyio.CancelScope) -> AsyncIterator[FolderService]:
    """The watcher, feed, collect and operations tasks around a started pipeline and an open ledger."""
    watch, output = config.watch, config.write.output
    board = StatusBoard(version=__version__, config_fp=settings.fingerprint, started_at=time.time())
    max_depth = watch.max_depth if config.source.recursive else min(1, watch.max_depth)
    watcher = FolderWatcher(
        input_folder, ledger, settings, dataclasses.replace(watch, max_depth=max_depth), probe_dir=output / "patches",
        exclude=[output, state], clock=clock, events=events, mounts_text=mounts_text,
        pseudonym=names.pseudonym if names is not None else None,
    )
    results_send, results_receive = anyio.create_memory_object_stream[FolderResult](64)
    service = FolderService(pipeline, watcher, ledger, board, settings, output, clock, notifier, redactor,
                            results_send, results_receive)
    ready_send, ready_receive = anyio.create_memory_object_stream[ReadySlide](1)
    async with anyio.create_task_group() as tg:
        await tg.start(service._watch, ready_send, once)
        tg.start_soon(service._feed, ready_receive)
        tg.start_soon(service._collect)
        await _operations(tg, service, state, metrics_started)
        notifier.ready(f"watching {input_folder}" if names is None else "watching")
        try:
            yield service
        except BaseException:
            tg.cancel_scope.cancel()
            raise
        finally:
            results_receive.close()
        await _drain(service, watch.drain_timeout_s, outer)
        tg.cancel_scope.cancel()


async def _operations(tg: TaskGroup, service: FolderService, state: Path,
                      metrics_started: Callable[[str], None] | None) -> None:
    """Status file, status board refresh, systemd watchdog, and (only when asked) the metrics endpoint."""
    watch = service.pipeline.config.watch
    await tg.start(lambda task_status: run_status_file(state / STATUS_FILE, service.board.snapshot,
                                                       interval_s=watch.status_interval_s, task_status=task_status))
    tg.start_soon(service._refresh, watch.status_interval_s)
    tg.start_soon(service.notifier.run_watchdog)
    if watch.qc_report_s > 0:
        from .qc.refresh import refresh_gallery

        tg.start_soon(refresh_gallery, service.output, watch.qc_report_s)
    if watch.metrics is not None:
        from .ops.metrics import make_registry, parse_bind, serve_metrics

        where = await tg.start(serve_metrics, make_registry(service.board), parse_bind(watch.metrics))
        log.info("metrics on %s", where, extra={"event": "metrics_started"})
        if metrics_started is not None:
            metrics_started(where)


async def _drain(service: FolderService, timeout_s: float, outer: anyio.CancelScope) -> None:
    """Stop intake; give the slides in flight `timeout_s` to finish, then cancel the rest (partials removed)."""
    service.stop()
    with anyio.move_on_after(timeout_s):
        await service.drained.wait()
    if not service.drained.is_set():
        log.warning("drain deadline (%.0f s) reached: cancelling %d slide(s) in flight", timeout_s,
                    len(service._in_flight), extra={"event": "drain_deadline"})
        outer.cancel()
