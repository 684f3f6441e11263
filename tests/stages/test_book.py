"""`SlideBook`: admission up to max-open, withdrawal, stopped intake, exactly one result per job, release once."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from atlaspatch_stream.items import Failure, SlideResult
from atlaspatch_stream.stages.book import SlideBook
from atlaspatch_stream.testing.fakes import FakeSlides

from .conftest import Books, CountingLock, jobs, statuses

pytestmark = pytest.mark.anyio


async def test_admission_waits_for_a_free_slot(tmp_path: Path) -> None:
    """max_open=2: a third slide is admitted only once one of the first two finishes."""
    send, receive = anyio.create_memory_object_stream[SlideResult](10)
    book = SlideBook(send, 2, anyio.CapacityLimiter(1))
    a, b, c = jobs(tmp_path, 3)
    admitted: list[str] = []
    with anyio.fail_after(5):
        assert await book.admit(a) and await book.admit(b)
        async with anyio.create_task_group() as tg:

            async def third() -> None:
                assert await book.admit(c)
                admitted.append(c.stem)

            tg.start_soon(third)
            await anyio.wait_all_tasks_blocked()
            assert admitted == [] and book.in_flight == 2
            await book.finish(a, "done")
    assert admitted == ["s2"] and book.in_flight == 2
    assert receive.receive_nowait().job == a


async def test_withdrawn_job_never_starts_and_is_reported_cancelled(books: Books, tmp_path: Path) -> None:
    """A job withdrawn before admission is refused (no slot taken) and gets one `cancelled` result."""
    [job] = jobs(tmp_path, 1)
    assert books.book.withdraw(job)
    assert not await books.book.admit(job)
    [result] = books.drained()
    assert result.status == "cancelled" and "withdrawn" in result.message and books.book.in_flight == 0


async def test_withdrawing_a_started_slide_is_refused(books: Books, tmp_path: Path) -> None:
    """Once admitted, a slide cannot be withdrawn (it goes on to a complete output or none)."""
    [job] = jobs(tmp_path, 1)
    assert await books.book.admit(job)
    assert not books.book.withdraw(job)


async def test_stopped_intake_cancels_every_job_not_yet_admitted(books: Books, tmp_path: Path) -> None:
    """After `stop_intake("output disk full")`, every later job is `cancelled` with "not started: output disk full";
    a slide already in flight is untouched."""
    first, *rest = jobs(tmp_path, 4)
    assert await books.book.admit(first)
    books.book.stop_intake("output disk full")
    assert [await books.book.admit(j) for j in rest] == [False, False, False]
    results = books.drained()
    assert statuses(results) == {"s1": "cancelled", "s2": "cancelled", "s3": "cancelled"}
    assert all(r.message == "not started: output disk full" for r in results)
    assert books.book.in_flight == 1 and books.book.tally.by_status["cancelled"] == 3


async def test_finish_releases_handle_and_lock_once_and_sends_one_result(books: Books, tmp_path: Path) -> None:
    """`finish` closes the handle and releases the lock once; a second `finish` (or `fail`) is ignored."""
    [job] = jobs(tmp_path, 1)
    lock, handle = CountingLock(), FakeSlides().open_slide(job)
    assert await books.book.admit(job)
    books.book.attach(job, handle=handle, lock=lock)
    books.book.time(job, "open", 0.5)
    await books.book.finish(job, "done", num_patches=7)
    await books.book.fail(job, Failure("write", "output_io", "transient"), "late failure")
    [result] = books.drained()
    assert result.status == "done" and result.timings["open"] == 0.5 and "total" in result.timings
    assert handle.closed and lock.released == 1
    assert books.book.tally.totals().by_status == {"done": 1} and books.book.tally.patches == 7


async def test_release_all_returns_cancelled_results_for_slides_in_flight(books: Books, tmp_path: Path) -> None:
    """On teardown every slide still in flight is released and reported `cancelled` (not sent: the run is over)."""
    a, b = jobs(tmp_path, 2)
    locks = [CountingLock(), CountingLock()]
    for job, lock in zip((a, b), locks, strict=True):
        assert await books.book.admit(job)
        books.book.attach(job, lock=lock)
    results = await books.book.release_all()
    assert [r.status for r in results] == ["cancelled", "cancelled"] and books.drained() == []
    assert [lock.released for lock in locks] == [1, 1] and books.book.in_flight == 0
