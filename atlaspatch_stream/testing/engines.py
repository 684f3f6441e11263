"""`FakeEngine`: an in-memory `run.Engine` whose slides take a set time, fail as told, or kill the engine; for
testing the run contract (`run.drive`) and job sources without slides, models or files."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from ..errors import STOP_REASONS, PipelineClosed
from ..items import EngineStatistics, Failure, SlideJob, SlideResult
from ..run import serving
from ..stages.book import Tally


class EngineDied(RuntimeError):
    """Raised by a `FakeEngine` on the slide named in `dies_on`: the engine breaks, as a lost device would."""


class FakeEngine:
    """Runs each slide for `seconds[stem]` (else `default_s`) on `workers` workers behind a queue of `capacity`.

    A slide in `failures` fails with that failure (a systemic one stops intake, as the pipeline does); the slide
    named `dies_on` raises `EngineDied` out of `open()`.
    """

    def __init__(self, *, workers: int = 2, capacity: int = 2, default_s: float = 0.01,
                 seconds: Mapping[str, float] | None = None, failures: Mapping[str, Failure] | None = None,
                 dies_on: str | None = None) -> None:
        self.workers = workers
        self.default_s = default_s
        self.seconds = dict(seconds or {})
        self.failures = dict(failures or {})
        self.dies_on = dies_on
        self.submitted: list[SlideJob] = []
        self.torn_down: list[SlideResult] = []
        self.stop_reason: str | None = None  # why intake stopped
        self._in_flight: dict[int, SlideJob] = {}
        self.tally = Tally()
        self._jobs_send, self._jobs = anyio.create_memory_object_stream[SlideJob](capacity)
        self._send, self._receive = anyio.create_memory_object_stream[SlideResult](capacity + workers)
        self._abort = anyio.CancelScope()

    @asynccontextmanager
    async def open(self) -> AsyncIterator[FakeEngine]:
        """Start the workers; on exit close the input and wait for them (or cancel them on error)."""
        async with serving(self, self._serve):
            yield self

    async def submit(self, job: SlideJob) -> None:
        """Queue one slide; waits while the queue is full."""
        try:
            await self._jobs_send.send(job)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise PipelineClosed("the fake engine takes no more slides") from None
        self.submitted.append(job)

    def results(self) -> MemoryObjectReceiveStream[SlideResult]:
        """Final results as slides finish."""
        return self._receive.clone()

    async def close_input(self) -> None:
        """No more slides."""
        await self._jobs_send.aclose()

    def stop_intake(self, reason: str) -> None:
        """Queued slides finish `cancelled`."""
        self.stop_reason = self.stop_reason or reason

    def abort(self) -> None:
        """Tear down the slides in flight now."""
        self._abort.cancel()

    def statistics(self) -> EngineStatistics:
        """Totals and slides in flight."""
        return EngineStatistics(state="running", totals=self.tally.totals(), in_flight=len(self._in_flight),
                                submitted=len(self.submitted), stopped=self.stop_reason)

    async def _serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with self._send:
            with self._abort:
                async with anyio.create_task_group() as tg, self._jobs:
                    for _ in range(self.workers):
                        tg.start_soon(self._work, self._jobs.clone())
                    task_status.started()
            self.torn_down = [self._count(SlideResult(job, "cancelled", message="interrupted before it finished"))
                              for job in self._in_flight.values()]

    async def _work(self, jobs: MemoryObjectReceiveStream[SlideJob]) -> None:
        async with jobs:
            async for job in jobs:
                await self._send.send(self._count(await self._run(job)))

    async def _run(self, job: SlideJob) -> SlideResult:
        if self.stop_reason is not None:
            return SlideResult(job, "cancelled", message=f"not started: {self.stop_reason}")
        self._in_flight[job.slide_id] = job
        await anyio.sleep(self.seconds.get(job.stem, self.default_s))
        if job.stem == self.dies_on:
            raise EngineDied(f"{job.name}: the device was lost")
        del self._in_flight[job.slide_id]
        failure = self.failures.get(job.stem)
        if failure is None:
            return SlideResult(job, "done", num_patches=1)
        if failure.systemic:
            self.stop_intake(STOP_REASONS.get(failure.kind, "output failure"))
        return SlideResult(job, "failed", message=f"{job.name}: {failure.kind}", failure=failure)

    def _count(self, result: SlideResult) -> SlideResult:
        self.tally.add(result)
        return result
