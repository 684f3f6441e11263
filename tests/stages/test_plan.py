"""Stage `plan` driven through memory streams: writer first, readers next; detect mode; reuse; failures."""

from __future__ import annotations

from pathlib import Path

import anyio
import numpy as np
import pytest

from atlaspatch_stream.api import process_slides
from atlaspatch_stream.errors import single_error
from atlaspatch_stream.items import OpenedSlide, PatchPlan, Reuse, TissueMask, WriteItem
from atlaspatch_stream.outputs.h5outputs import H5Outputs, SettingsRecord
from atlaspatch_stream.stages import plan
from atlaspatch_stream.testing.fakes import FakeBackends, FakePlanner, fake_jobs
from tests.helpers import fake_config

from .conftest import Books, Opened, jobs, statuses

pytestmark = pytest.mark.anyio


class Planner(FakePlanner):
    """Fails `bad`; raises a bug for `buggy`; records overlay calls."""

    overlays: list[str]

    def plan(self, slide: OpenedSlide, mask: np.ndarray) -> PatchPlan:
        if slide.job.stem == "bad":
            raise ValueError("contour math exploded")
        if slide.job.stem == "buggy":
            raise AttributeError("'NoneType' object has no attribute 'shape'")
        return super().plan(slide, mask)

    def detect_overlays(self, slide: OpenedSlide, mask: np.ndarray) -> list[Path]:
        self.overlays.append(slide.job.stem)
        return []


def _parts(out: Path, n: int = 5) -> tuple[Planner, H5Outputs]:
    config = fake_config(out)
    settings = SettingsRecord(config, lambda: None)
    planner = Planner(config, settings, n)
    planner.overlays = []
    return planner, H5Outputs(config, settings)


async def _run(masks: list[TissueMask], books: Books, planner: Planner, outputs: H5Outputs | None, *, detect: bool,
               read: bool = True) -> tuple[list[WriteItem], list[PatchPlan]]:
    send_in, receive_in = anyio.create_memory_object_stream[TissueMask](len(masks))
    send_w, receive_w = anyio.create_memory_object_stream[WriteItem](len(masks))
    send_r, receive_r = anyio.create_memory_object_stream[PatchPlan](len(masks))
    for item in masks:
        send_in.send_nowait(item)
    send_in.close()
    with anyio.fail_after(10):
        await plan.run(receive_in, None if detect else send_w, send_r if read else None, book=books.book,
                       planner=planner, outputs=outputs, settings=plan.PlanSettings(detect=detect, workers=2),
                       limiter=anyio.CapacityLimiter(2), h5_limiter=anyio.CapacityLimiter(1))
        to_write = [] if detect else [i async for i in receive_w]
        to_read = [p async for p in receive_r] if read else []
    return to_write, to_read


async def _masks(opened: Opened, folder: Path, stems: list[str]) -> list[TissueMask]:
    return [TissueMask(await opened.slide(job), np.ones((32, 32), bool)) for job in fake_jobs(folder, stems)]


async def test_plans_go_to_the_writer_and_only_nonempty_ones_to_the_readers(books: Books, opened: Opened,
                                                                              tmp_path: Path) -> None:
    """Every plan reaches the writer (it creates the file, also for 0 patches); only plans with patches reach the
    readers; both streams end when the input ends."""
    planner, outputs = _parts(tmp_path)
    to_write, to_read = await _run(await _masks(opened, tmp_path, ["s0", "empty", "s1"]), books, planner, outputs,
                                   detect=False)
    assert sorted(p.slide.job.stem for p in to_write) == ["empty", "s0", "s1"]  # type: ignore[union-attr]
    assert sorted(p.slide.job.stem for p in to_read) == ["s0", "s1"]
    assert all(p.num_patches == 5 and p.attrs is not None for p in to_read)


async def test_detect_mode_draws_overlays_and_finishes_the_slides(books: Books, opened: Opened,
                                                                  tmp_path: Path) -> None:
    """detect-tissue: overlays per slide, each slide finishes `done` here, nothing goes downstream."""
    planner, _ = _parts(tmp_path)
    to_write, to_read = await _run(await _masks(opened, tmp_path, ["s0", "s1"]), books, planner, None, detect=True,
                                   read=False)
    assert to_write == [] and to_read == [] and sorted(planner.overlays) == ["s0", "s1"]
    assert statuses(books.drained()) == {"s0": "done", "s1": "done"}


async def test_reused_slides_take_their_coordinates_from_the_existing_file(books: Books, opened: Opened,
                                                                           tmp_path: Path) -> None:
    """A reused slide's plan is the existing file's coords (no planning), without new-file attributes."""
    config = fake_config(tmp_path)
    summary = await process_slides(fake_jobs(tmp_path, ["s0"]), config, backends=FakeBackends(config,
                                                                                              patches_per_slide=7))
    h5 = summary.results[0].h5_path
    assert h5 is not None
    planner, outputs = _parts(tmp_path, n=99)
    [job] = jobs(tmp_path, 1)
    item = TissueMask(await opened.slide(job, Reuse(h5, 7, ("b",))), None)
    to_write, to_read = await _run([item], books, planner, outputs, detect=False)
    [reused] = to_read
    assert reused.num_patches == 7 and reused.attrs is None and reused.coords.dtype == np.int32


async def test_a_failing_plan_fails_alone_and_a_bug_propagates(books: Books, opened: Opened, tmp_path: Path) -> None:
    """A ValueError while planning fails that slide ('plan'); an AttributeError is a bug and stops the stage."""
    planner, outputs = _parts(tmp_path)
    to_write, _ = await _run(await _masks(opened, tmp_path, ["bad", "ok"]), books, planner, outputs, detect=False)
    [failed] = books.drained()
    assert failed.job.stem == "bad" and failed.failure.stage == "plan" and "contour math" in failed.message
    assert [p.slide.job.stem for p in to_write] == ["ok"]  # type: ignore[union-attr]
    with pytest.raises(BaseException) as info:
        await _run(await _masks(opened, tmp_path / "b", ["buggy"]), books, planner, outputs, detect=False)
    assert isinstance(single_error(info.value), AttributeError)
