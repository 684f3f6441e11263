"""The run contract, written once: `drive(source, engine, ...)` takes jobs from a `JobSource`, runs them on an
`Engine` and returns a `RunSummary`.

```
JobSource ──jobs()──▶ drive ──submit──▶ Engine (local Pipeline | Ray pool)
    ▲                   │ ◀──results()──┘
    └──settle(result)───┴──▶ report, on_result, RunSummary
```

What `drive` guarantees, whatever the source and the engine:
- every job the source gave out, or listed and never gave out, gets exactly one result (slides that never started
  are `cancelled`, "not started: <reason>");
- a `Stop` request stops intake (no new slide starts) and the slides in flight drain within `drain_timeout_s`; then,
  or at `Stop.force()`, the engine is aborted (partial outputs removed, locks released);
- a systemic failure (full output disk...) stops intake: the engine decides that and says why in `stop_reason`;
- the run report (`reporting`, held by whoever opens the engine) is opened once the engine is up and ended with the
  engine's statistics and the run's status (completed, interrupted or failed), also when the run fails; the
  engine writes a line for each slide it answers, `drive` for each job it answers itself (never started);
- intake is driven by events (results settling, the engine taking jobs), never by timers polling statistics.

This module and `pipeline.py` are the only places above the stages that create task groups.
"""

from __future__ import annotations

import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from .errors import PipelineClosed, single_error
from .items import EngineStatistics, SlideJob, SlideResult
from .report import RunReport, RunStatus

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup  # anyio depends on it there


class Engine(Protocol):
    """What runs slides: the local `Pipeline`, or the Ray pool. Opened (models loaded) before `drive` starts."""

    async def submit(self, job: SlideJob) -> None:
        """Queue one slide; waits while the engine is full. Raises `PipelineClosed` once it takes no more."""
        ...

    def results(self) -> MemoryObjectReceiveStream[SlideResult]:
        """Final results as they come; ends once the input is closed (or the engine aborted) and all drained."""
        ...

    async def close_input(self) -> None:
        """No more jobs: the slides in flight drain, then `results()` ends."""
        ...

    def stop_intake(self, reason: str) -> None:
        """No slide starts any more: queued jobs finish `cancelled` ("not started: <reason>")."""
        ...

    def abort(self) -> None:
        """Cancel every slide in flight now (partial outputs removed); `results()` then ends."""
        ...

    @property
    def stop_reason(self) -> str | None:
        """Why intake stopped (a request, a systemic failure), or None."""
        ...

    @property
    def torn_down(self) -> Sequence[SlideResult]:
        """`cancelled` results of slides that an abort or a cancellation tore down (never sent on `results()`)."""
        ...

    def statistics(self) -> EngineStatistics:
        """Totals, slides in flight, queue fill, state."""
        ...


E = TypeVar("E", bound=Engine)


class JobSource(Protocol):
    """Where jobs come from: a path list, a shard with stealing and node-local copies, a watched folder."""

    def jobs(self) -> AsyncIterator[SlideJob]:
        """The jobs to run, in order; each is taken only when the engine can queue it. Ends when the source is done."""
        ...

    async def settle(self, job: SlideJob, result: SlideResult) -> None:
        """`job` (as the source gave it out) has its final result: release what it held (a local copy, a ledger
        record)."""
        ...

    def unsent(self) -> Sequence[SlideJob]:
        """Jobs the source listed but never gave out (a finite source stopped early); each gets a `cancelled`
        result."""
        ...


class Stop:
    """A stop hook for a run: `request()` stops intake and drains, `force()` cancels at once.

    After `request(reason)`, no new slide starts (each is reported `cancelled`, "not started: <reason>"), slides in
    flight finish within the drain deadline, then whatever is left is cancelled and its partial output removed.
    """

    def __init__(self) -> None:
        self.requested = anyio.Event()
        self.forced = anyio.Event()
        self.reason: str | None = None

    def request(self, reason: str) -> None:
        """Stop intake (the first call's reason is kept)."""
        if self.reason is None:
            self.reason = reason
        self.requested.set()

    def force(self) -> None:
        """Cancel at once (partial outputs removed)."""
        self.requested.set()
        self.forced.set()


@dataclass
class RunSummary:
    """Every slide's final result and the run's totals."""

    results: list[SlideResult] = field(default_factory=list)
    elapsed_s: float = 0.0
    statistics: EngineStatistics | None = None
    stop_reason: str | None = None  # why intake stopped early (interrupt, full disk); None for a complete run

    @property
    def failed(self) -> list[SlideResult]:
        """Results of slides that failed."""
        return [r for r in self.results if r.status == "failed"]

    @property
    def ok(self) -> bool:
        """True when no slide failed and the run was not stopped early."""
        return not self.failed and self.stop_reason is None

    def count(self, *statuses: str) -> int:
        """How many results have one of `statuses`."""
        return sum(r.status in statuses for r in self.results)


OnResult = Callable[[SlideResult], None]


@dataclass
class _Run:
    """One `drive` call's bookkeeping: the jobs given out and not yet settled, and what to tell about each result."""

    source: JobSource
    engine: Engine
    report: RunReport | None
    on_result: OnResult | None
    summary: RunSummary = field(default_factory=RunSummary)
    given: dict[int, SlideJob] = field(default_factory=dict)  # by slide_id: the source's job, until it settles
    io: anyio.CapacityLimiter = field(default_factory=lambda: anyio.CapacityLimiter(1))

    async def record(self, result: SlideResult, *, ours: bool = False) -> None:
        """Settle one final result with its source, keep it, tell the caller; a result `ours` (made here, not by the
        engine) also gets its report line."""
        job = self.given.pop(result.job.slide_id, result.job)
        await self.source.settle(job, result)  # may wait (the daemon's --once waits for another worker's slide)
        if ours and self.report is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.report.slide, result, limiter=self.io)
        self.summary.results.append(result)
        if self.on_result is not None:
            self.on_result(result)

    async def feed(self, scope: anyio.CancelScope) -> None:
        """Jobs from the source into the engine until the source ends or intake stops (a stop request cancels
        `scope`); then close the engine's input. A job taken but never queued is answered by `settle_the_rest`."""
        with scope:
            async for job in self.source.jobs():
                self.given[job.slide_id] = job
                if self.engine.stop_reason is not None:
                    break
                try:
                    await self.engine.submit(job)
                except PipelineClosed:  # aborted while waiting for room
                    break
        with anyio.CancelScope(shield=True):
            await self.engine.close_input()

    async def watch(self, stop: Stop, intake: anyio.CancelScope, drain_timeout_s: float) -> None:
        """First request: stop intake; abort at the drain deadline, or at once when forced."""
        await stop.requested.wait()
        self.engine.stop_intake(stop.reason or "interrupted")
        intake.cancel()
        with anyio.move_on_after(drain_timeout_s):
            await stop.forced.wait()
        self.engine.abort()

    async def settle_the_rest(self, reason: str) -> None:
        """Results for slides the engine tore down, jobs given out but never answered, and jobs never given out."""
        for result in self.engine.torn_down:
            await self.record(result)
        for job in [*self.given.values(), *self.source.unsent()]:
            await self.record(SlideResult(job, "cancelled", message=f"not started: {reason}"), ours=True)


async def drive(source: JobSource, engine: Engine, *, report: RunReport | None = None, stop: Stop | None = None,
                on_result: OnResult | None = None, drain_timeout_s: float = 30.0) -> RunSummary:
    """Run every job of `source` on `engine` (already open) and return all results; see the module docstring.

    Args:
        source: where the jobs come from; told each job's result.
        engine: what runs them.
        report: the run's report, for the lines of jobs `drive` answers itself (the engine writes the others).
        stop: ends the run early (the CLI's Ctrl-C, a daemon's shutdown).
        on_result: called on the event loop with each final result (progress displays, a service's results).
        drain_timeout_s: how long slides in flight may take to finish after a stop request.

    Raises:
        Whatever the engine raises (a bug, a broken device).
    """
    started = time.perf_counter()
    run = _Run(source, engine, report, on_result)
    intake = anyio.CancelScope()
    try:  # feed, watch for a stop, and record every result until the engine's results end
        async with anyio.create_task_group() as tg:
            tg.start_soon(run.feed, intake)
            if stop is not None:
                tg.start_soon(run.watch, stop, intake, drain_timeout_s)
            async with engine.results() as results:
                async for result in results:
                    await run.record(result)
            tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:  # a source's or engine's error comes out as itself
        raise single_error(group) from None
    await run.settle_the_rest(engine.stop_reason or "the run was cancelled")
    run.summary.statistics = engine.statistics()
    run.summary.stop_reason = engine.stop_reason
    run.summary.elapsed_s = time.perf_counter() - started
    return run.summary


async def run_jobs(source: JobSource, opening: AbstractAsyncContextManager[Engine], *, report: RunReport | None,
                   stop: Stop | None = None, on_result: OnResult | None = None,
                   drain_timeout_s: float = 30.0) -> RunSummary:
    """Open the engine (the report's life around it, `reporting`) and `drive` every job of `source` through it."""
    async with reporting(report, opening) as engine:
        return await drive(source, engine, report=report, stop=stop, on_result=on_result,
                           drain_timeout_s=drain_timeout_s)


@asynccontextmanager
async def reporting(report: RunReport | None, opening: AbstractAsyncContextManager[E]) -> AsyncIterator[E]:
    """Open an engine and hold the run report's life around it: the first line once the engine is up, the last (its
    statistics and the run's status: completed, interrupted, or failed when the engine or the block raises) when
    it has closed."""
    io = anyio.CapacityLimiter(1)
    status: RunStatus = "failed"
    engine: E | None = None
    try:
        async with opening as engine:
            if report is not None:
                await anyio.to_thread.run_sync(report.open, limiter=io)
            yield engine
        status = "interrupted" if engine.stop_reason else "completed"  # the engine closed without an error
    except anyio.get_cancelled_exc_class():
        status = "interrupted"
        raise
    finally:
        if report is not None and engine is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(report.end, engine.statistics(), status, engine.stop_reason,
                                               limiter=io)


@asynccontextmanager
async def serving(engine: E, serve: Callable[..., Coroutine[object, object, None]]) -> AsyncIterator[E]:
    """An engine's workers (`serve`, started and ready) beside the block: on an error in the block the engine is
    aborted; on normal exit its input is closed and its workers finish. Errors come out as themselves."""
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(serve)
            try:
                yield engine
            except BaseException:
                engine.abort()
                raise
            await engine.close_input()
    except BaseExceptionGroup as group:
        raise single_error(group) from None
