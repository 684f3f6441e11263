"""The run contract, once, for every engine and source: `run.drive` with an in-memory engine (`FakeEngine`) and job
sources that record what they were told. No slides, models or files (but a real run report where it is checked)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import orjson
import pytest

from atlaspatch_stream.items import Failure, SlideJob, SlideResult
from atlaspatch_stream.report import RunReport
from atlaspatch_stream.run import RunSummary, Stop, drive, run_jobs
from atlaspatch_stream.sources.job_list import JobList
from atlaspatch_stream.testing.engines import EngineDied, FakeEngine


def _jobs(count: int) -> list[SlideJob]:
    return [SlideJob(i, Path(f"s{i}.svs"), f"s{i}") for i in range(count)]


class RecordingSource:
    """A finite source (a `run.JobSource`) that records each job it gives out and each settlement."""

    def __init__(self, jobs: list[SlideJob]) -> None:
        self.listed = JobList(jobs)
        self.given: list[int] = []
        self.settled: dict[int, str] = {}

    async def jobs(self) -> AsyncIterator[SlideJob]:
        async for job in self.listed.jobs():
            self.given.append(job.slide_id)
            yield job

    async def settle(self, job: SlideJob, result: SlideResult) -> None:
        assert job.slide_id not in self.settled, "a job settled twice"
        self.settled[job.slide_id] = result.status

    def unsent(self) -> list[SlideJob]:
        return self.listed.unsent()


def _one_result_each(summary: RunSummary, count: int) -> None:
    ids = sorted(r.job.slide_id for r in summary.results)
    assert ids == list(range(count)), "every job has exactly one result"


async def test_every_job_done_once_and_settled() -> None:
    """Ten jobs on two workers: ten `done` results, each settled once with its source, the run complete."""
    source, engine = RecordingSource(_jobs(10)), FakeEngine()
    with anyio.fail_after(5):
        async with engine.open():
            summary = await drive(source, engine)
    _one_result_each(summary, 10)
    assert summary.ok and summary.count("done") == 10 and source.settled == dict.fromkeys(range(10), "done")


async def test_a_stop_drains_the_slides_in_flight_and_cancels_the_rest() -> None:
    """A stop requested at the first result: no new job is taken, slides in flight finish `done`, queued and never
    given jobs are `cancelled` ("not started: <reason>"), and every listed job has one result and one settlement."""
    stop = Stop()
    source, engine = RecordingSource(_jobs(12)), FakeEngine(default_s=0.05)
    with anyio.fail_after(5):
        async with engine.open():
            summary = await drive(source, engine, stop=stop, on_result=lambda _r: stop.request("interrupted"))
    _one_result_each(summary, 12)
    assert summary.stop_reason == "interrupted" and not summary.ok
    done, cancelled = summary.count("done"), summary.count("cancelled")
    assert done >= 1 and done + cancelled == 12 and cancelled >= 12 - len(source.given)
    assert all(r.message == "not started: interrupted" for r in summary.results if r.status == "cancelled")
    assert len(source.settled) == 12


async def test_the_drain_deadline_aborts_slow_slides() -> None:
    """Slides of 30 s and a drain deadline of 0.2 s: after the stop the engine is aborted, its slides in flight are
    torn down `cancelled` ("interrupted before it finished"), and the run returns at once."""
    stop = Stop()
    source, engine = RecordingSource(_jobs(4)), FakeEngine(default_s=30)
    started = time.monotonic()
    with anyio.fail_after(5):
        async with engine.open(), anyio.create_task_group() as tg:
            tg.start_soon(_request_later, stop)
            summary = await drive(source, engine, stop=stop, drain_timeout_s=0.2)
    assert time.monotonic() - started < 3
    _one_result_each(summary, 4)
    torn = [r for r in summary.results if r.message == "interrupted before it finished"]
    assert len(torn) == 2 and summary.count("cancelled") == 4 and len(source.settled) == 4


async def _request_later(stop: Stop) -> None:
    await anyio.sleep(0.1)
    stop.request("interrupted")


async def test_a_forced_stop_aborts_at_once() -> None:
    """A second request (`force`) does not wait for the drain deadline."""
    stop = Stop()
    source, engine = RecordingSource(_jobs(3)), FakeEngine(default_s=30)

    async def twice() -> None:
        await anyio.sleep(0.05)
        stop.request("interrupted")
        await anyio.sleep(0.05)
        stop.force()

    with anyio.fail_after(5):
        async with engine.open(), anyio.create_task_group() as tg:
            tg.start_soon(twice)
            summary = await drive(source, engine, stop=stop, drain_timeout_s=60)
    _one_result_each(summary, 3)
    assert summary.count("cancelled") == 3


async def test_a_systemic_failure_stops_intake() -> None:
    """The second slide meets a full disk: the engine stops intake, later jobs are `cancelled` ("not started:
    output disk full"), and the summary says why."""
    full = Failure("write", "disk_full", "system")
    source, engine = RecordingSource(_jobs(10)), FakeEngine(workers=1, capacity=1, failures={"s1": full})
    with anyio.fail_after(5):
        async with engine.open():
            summary = await drive(source, engine)
    _one_result_each(summary, 10)
    assert summary.stop_reason == "output disk full" and summary.count("failed") == 1
    assert summary.count("done") >= 1 and summary.count("cancelled") >= 6


async def test_a_source_that_ends_ends_the_run() -> None:
    """An open-ended source (the daemon's `--once`) that ends after 3 jobs: the run drains and returns."""

    class ThreeThenDone(RecordingSource):
        def unsent(self) -> list[SlideJob]:
            return []  # slides not taken stay with their source (a ledger)

    source, engine = ThreeThenDone(_jobs(3)), FakeEngine()
    with anyio.fail_after(5):
        async with engine.open():
            summary = await drive(source, engine)
    assert summary.count("done") == 3 and summary.ok


async def test_an_engine_that_dies_raises_its_error_and_the_report_ends_failed(tmp_path: Path) -> None:
    """The engine breaks on the third slide: its own error comes out (not wrapped in a group), and the run report
    ends with status `failed`."""
    report = RunReport(tmp_path, "test")
    report.begin({})
    engine = FakeEngine(dies_on="s2")
    with anyio.fail_after(5), pytest.raises(EngineDied, match="device was lost"):
        await run_jobs(RecordingSource(_jobs(6)), engine.open(), report=report)
    lines = [orjson.loads(line) for line in (tmp_path / "atlaspatch-report.jsonl").read_bytes().splitlines()]
    assert lines[0]["event"] == "run_start" and lines[-1]["event"] == "run_end" and lines[-1]["status"] == "failed"


async def test_the_report_records_the_jobs_drive_answers_and_the_status(tmp_path: Path) -> None:
    """A run stopped before it starts: every job `cancelled`, a report line for each job `drive` answered itself
    (the fake engine writes none for those it answered), and run_end `interrupted` with the reason."""
    stop = Stop()
    stop.request("interrupted by SIGINT")
    report = RunReport(tmp_path, "test")
    report.begin({})
    engine = FakeEngine()
    summary = await run_jobs(RecordingSource(_jobs(5)), engine.open(), report=report, stop=stop)
    lines = [orjson.loads(line) for line in (tmp_path / "atlaspatch-report.jsonl").read_bytes().splitlines()]
    slides = [e for e in lines if e["event"] == "slide"]
    assert summary.count("cancelled") == 5 and len(slides) == 5 - len(engine.submitted)
    assert lines[-1]["status"] == "interrupted" and lines[-1]["reason"] == "interrupted by SIGINT"
