"""Stage `prepare` driven through memory streams: locks, skip/reuse decisions, opening, thumbnails, failures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from atlaspatch_stream import outputs
from atlaspatch_stream.errors import single_error
from atlaspatch_stream.items import SlideJob, Thumbnail
from atlaspatch_stream.outputs import claims
from atlaspatch_stream.outputs.h5outputs import H5Outputs, SettingsRecord
from atlaspatch_stream.protocols import SlideHandle
from atlaspatch_stream.stages import prepare
from atlaspatch_stream.testing.fakes import FakeBackends, FakeSlides
from tests.helpers import fake_config

from .conftest import Books, jobs, statuses

pytestmark = pytest.mark.anyio


async def _run(books: Books, items: list[SlideJob], slides: FakeSlides, out_store: H5Outputs | None,
               encoders: tuple[str, ...] = ("a",), workers: int = 2) -> list[Thumbnail]:
    send_jobs, receive_jobs = anyio.create_memory_object_stream[SlideJob](len(items) + 1)
    send, receive = anyio.create_memory_object_stream[Thumbnail](len(items) + 1)
    for job in items:
        send_jobs.send_nowait(job)
    send_jobs.close()
    settings = prepare.PrepareSettings(workers=workers, encoders=encoders, skip_existing=True)
    with anyio.fail_after(10):
        await prepare.run(receive_jobs, send, book=books.book, slides=slides, outputs=out_store, settings=settings,
                          limiter=anyio.CapacityLimiter(2))
        return [t async for t in receive]  # the stage closed `send`: iteration ends


def _outputs(out: Path, encoders: tuple[str, ...] = ("a",)) -> H5Outputs:
    config = fake_config(out, encoders)
    return H5Outputs(config, SettingsRecord(config, lambda: None))


async def test_new_slides_are_locked_opened_and_thumbnailed(books: Books, tmp_path: Path) -> None:
    """Three new slides: each comes out with its thumbnail, its lock file held (released when it finishes), and the
    stream ends after the last one."""
    slides = FakeSlides()
    items = await _run(books, jobs(tmp_path, 3), slides, _outputs(tmp_path))
    assert sorted(t.slide.job.stem for t in items) == ["s0", "s1", "s2"]
    assert all(t.image is not None and t.image.shape == (32, 32, 3) and t.slide.reuse is None for t in items)
    assert sorted(p.name for p in (tmp_path / "patches").glob("*.lock")) == ["s0.lock", "s1.lock", "s2.lock"]
    await books.book.finish(items[0].slide.job, "done")
    assert not outputs.lock_path(tmp_path, items[0].slide.job.stem).exists()


async def test_detect_mode_takes_no_lock(books: Books, tmp_path: Path) -> None:
    """Without an output store (detect-tissue) no lock is taken and nothing is reused."""
    items = await _run(books, jobs(tmp_path, 2), FakeSlides(), None)
    assert len(items) == 2 and not (tmp_path / "patches").exists()


async def _complete_output(out: Path, stem: str, encoders: tuple[str, ...]) -> None:
    config = fake_config(out, encoders)
    from atlaspatch_stream.api import process_slides
    from atlaspatch_stream.testing.fakes import fake_jobs

    summary = await process_slides(fake_jobs(out, [stem]), config, backends=FakeBackends(config))
    assert [r.status for r in summary.results] == ["done"]


async def test_existing_outputs_are_skipped_or_reused(books: Books, tmp_path: Path) -> None:
    """A complete output with every encoder: `skipped` (handle closed, nothing sent); one missing an encoder: sent
    on as a reuse of the existing file with only the missing encoder."""
    await _complete_output(tmp_path, "s0", ("a",))
    slides = FakeSlides()
    items = await _run(books, jobs(tmp_path, 1), slides, _outputs(tmp_path), encoders=("a",))
    assert items == [] and statuses(books.drained()) == {"s0": "skipped"} and slides.opened[0].closed
    items = await _run(books, jobs(tmp_path, 1), FakeSlides(), _outputs(tmp_path, ("a", "b")), encoders=("a", "b"))
    [item] = items
    assert item.image is None and item.slide.reuse is not None and item.slide.reuse.missing == ("b",)


class BiggerSlides(FakeSlides):
    """Every slide is 8192 pixels wide (the existing outputs were made from 4096-wide ones)."""

    def open_slide(self, job: SlideJob) -> SlideHandle:
        handle = super().open_slide(job)
        handle.info = type(handle.info)(**{**handle.info.__dict__, "width": 8192})
        return handle


async def test_output_made_from_another_slide_fails(books: Books, tmp_path: Path) -> None:
    """An existing output whose level-0 size differs from this slide's: the slide fails ('reuse'), nothing sent."""
    await _complete_output(tmp_path, "s0", ("a",))
    items = await _run(books, jobs(tmp_path, 1), BiggerSlides(), _outputs(tmp_path))
    [result] = books.drained()
    assert items == [] and result.status == "failed" and result.failure.stage == "reuse"
    assert "4096x4096" in result.message and "8192x4096" in result.message


async def test_live_lock_reports_locked(books: Books, tmp_path: Path) -> None:
    """A lock held by a live process on this host: the slide is `locked`, its lock untouched, never opened."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        lock = outputs.lock_path(tmp_path, "s0")
        lock.parent.mkdir(parents=True)
        lock.write_text(f"pid={child.pid},time=1,slide=x,host={claims.HOST}")
        slides = FakeSlides()
        items = await _run(books, jobs(tmp_path, 1), slides, _outputs(tmp_path))
        assert items == [] and statuses(books.drained()) == {"s0": "locked"} and slides.opened == []
        assert lock.read_text().startswith(f"pid={child.pid},")
    finally:
        child.kill()
        child.wait()


async def test_open_failure_fails_alone(books: Books, tmp_path: Path) -> None:
    """A slide that cannot be opened fails ('open', its cause in one line naming it); the others go on; its lock
    is released."""
    items = await _run(books, jobs(tmp_path, 3), FakeSlides(fail_open=["s1"]), _outputs(tmp_path))
    [result] = books.drained()
    assert sorted(t.slide.job.stem for t in items) == ["s0", "s2"]
    assert result.job.stem == "s1" and result.failure.stage == "open" and result.message.startswith("s1.svs: ")
    assert not os.path.exists(outputs.lock_path(tmp_path, "s1"))


class BuggySlides(FakeSlides):
    def thumbnail(self, handle: SlideHandle) -> object:  # type: ignore[override]
        raise TypeError("thumbnail() got an unexpected keyword argument")


async def test_a_bug_propagates(books: Books, tmp_path: Path) -> None:
    """A TypeError in a backend is a bug, not a bad slide: it stops the stage (out of its worker group)."""
    with pytest.raises(BaseException) as info:
        await _run(books, jobs(tmp_path, 1), BuggySlides(), _outputs(tmp_path), workers=1)
    assert isinstance(single_error(info.value), TypeError) and books.drained() == []
