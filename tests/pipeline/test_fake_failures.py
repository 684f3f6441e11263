"""Per-slide failures in each stage are records that never stop the batch; a bug propagates and stops the run."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

from atlaspatch_stream import outputs
from atlaspatch_stream.api import process_slides
from atlaspatch_stream.config import (
    PipelineConfig,
)
from atlaspatch_stream.errors import SlideError
from atlaspatch_stream.items import OpenedSlide, PatchPlan, SlideJob, SlideResult
from atlaspatch_stream.outputs.h5outputs import H5Outputs
from atlaspatch_stream.testing.fakes import (
    FakeBackends,
    FakeChunks,
    FakePixels,
    FakePlanner,
    FakeSegmenter,
    FakeSlides,
    fake_jobs,
)
from tests.helpers import BrokenDeviceBackends, fake_config, leftovers

pytestmark = pytest.mark.anyio


class PickySegmenter(FakeSegmenter):
    """Fails thumbnails 31 pixels high (the `bad_seg` slide's), segments the rest."""

    def segment(self, thumbnails: Sequence[np.ndarray]) -> list[np.ndarray | Exception]:
        self.batches.append(len(thumbnails))
        return [RuntimeError("model diverged") if t.shape[0] == 31 else np.ones(t.shape[:2], bool) for t in thumbnails]


class PickySlides(FakeSlides):
    """The `bad_seg` slide's thumbnail is 31 pixels high (PickySegmenter fails it)."""

    def thumbnail(self, handle: Any) -> np.ndarray:
        high = 31 if "bad_seg" in handle.info.path else 32
        return np.full((high, 32, 3), 128, np.uint8)


class ExplodingPlanner(FakePlanner):
    def plan(self, slide: OpenedSlide, mask: np.ndarray) -> PatchPlan:
        if slide.job.stem == "bad_plan":
            raise ValueError("contour math exploded")
        return super().plan(slide, mask)


class FullDiskOutputs(H5Outputs):
    def open_store(self, plan: PatchPlan, feature_dims: Mapping[str, int]) -> Any:
        if plan.slide.job.stem == "bad_write":
            raise OSError(28, "No space left on device")
        return super().open_store(plan, feature_dims)


class FlakyBackends(FakeBackends):
    """Per-stem failures in segmentation, planning and output creation."""

    def __init__(self, config: PipelineConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.slides = PickySlides()
        self.planner = ExplodingPlanner(config, self.settings, 10)
        self.outputs = FullDiskOutputs(config, self.settings)

    def make_segmenter(self) -> FakeSegmenter:
        self.segmenter = PickySegmenter()
        return self.segmenter


async def _results(config: PipelineConfig, stems: list[str], backends: FakeBackends) -> dict[str, SlideResult]:
    with anyio.fail_after(4):
        summary = await process_slides(fake_jobs(config.write.output, stems), config, backends=backends)
    return {r.job.stem: r for r in summary.results}




async def test_failures_in_every_stage_fail_alone(tmp_path: Path) -> None:
    """Slides failing in segment, plan and output creation each get a failed record naming the stage and cause;
    the healthy slides (batched with the failing ones for segmentation) finish; nothing partial remains."""
    config = fake_config(tmp_path, seg_batch=4)
    backends = FlakyBackends(config, segment_delay=0.0)
    stems = ["ok0", "bad_seg", "bad_plan", "bad_write", "ok1"]
    results = await _results(config, stems, backends)
    assert {s: r.status for s, r in results.items()} == {
        "ok0": "done", "ok1": "done", "bad_seg": "failed", "bad_plan": "failed", "bad_write": "failed"}
    assert results["bad_seg"].failure.stage == "segment" and "model diverged" in results["bad_seg"].message
    assert results["bad_plan"].failure.stage == "plan" and "ValueError: contour math" in results["bad_plan"].message
    assert results["bad_write"].failure.stage == "write" and "No space left" in results["bad_write"].message
    assert all(s in results[s].message for s in ("bad_seg", "bad_plan", "bad_write"))
    assert sorted(p.name for p in (tmp_path / "patches").glob("*.h5")) == ["ok0.h5", "ok1.h5"]
    assert leftovers(tmp_path) == []
    assert all(h.closed for h in backends.slides.opened)


async def test_a_broken_device_propagates_as_itself_and_cleans_up(tmp_path: Path) -> None:
    """An encoder raising a foreign error stops the run with that very error (not an ExceptionGroup); no temp file,
    lock or final file remains."""
    config = fake_config(tmp_path)
    backends = BrokenDeviceBackends(config)
    with anyio.fail_after(4), pytest.raises(RuntimeError, match="device lost"):
        await process_slides(fake_jobs(tmp_path, ["s0", "s1"]), config, backends=backends)
    assert list((tmp_path / "patches").glob("*.h5")) == []
    assert leftovers(tmp_path) == []
    assert all(h.closed for h in backends.slides.opened)


async def test_same_stem_twice_in_one_run_is_a_collision_not_a_skip(tmp_path: Path) -> None:
    """Two slides of one run (a/s.svs, b/s.tif) would both write `<stem>.h5`: the first keeps the name and is
    processed; the second fails with a line naming both paths and suggesting separate --output folders."""
    config = fake_config(tmp_path)
    first = SlideJob(0, tmp_path / "a" / "s.svs", "s", None, display="a/s.svs")
    second = SlideJob(1, tmp_path / "b" / "s.tif", "s", None, display="b/s.tif")
    with anyio.fail_after(4):
        summary = await process_slides([first, second], config, backends=FakeBackends(config, read_delay=0.01))
    results = {r.job.slide_id: r for r in summary.results}
    assert results[0].status == "done" and results[1].status == "failed"
    message = results[1].message
    assert "b/s.tif" in message and str(first.path) in message and "--output" in message
    assert outputs.h5_path(tmp_path, "s").exists() and leftovers(tmp_path) == []


async def test_slide_error_message_names_slide_once(tmp_path: Path) -> None:
    """A SlideError that already names its slide is not prefixed a second time."""
    config = fake_config(tmp_path)
    results = await _results(config, ["x"], FakeBackends(config, fail_open=["x"]))
    message = results["x"].message
    assert message.count("x.svs") == 1 and SlideError.__name__ not in message


class ShortPixels(FakePixels):
    """The `short` slide's reader stops one chunk early (a backend bug that must not hold the slide open)."""

    def iter_patches(self, plan: PatchPlan, patch_size: int, chunk: int, threads: int) -> FakeChunks:
        chunks = list(super().iter_patches(plan, patch_size, chunk, threads))
        return FakeChunks(iter(chunks[:-1] if plan.slide.job.stem == "short" else chunks))


async def test_short_reader_fails_slide_and_frees_its_slot(tmp_path: Path) -> None:
    """With one slot (max_open_slides=1), a slide whose reader yields too few rows fails at once ('read', counts in
    the message) and the following slides still run."""
    base = fake_config(tmp_path)
    config = base.replace(open=type(base.open)(max_open_slides=1))
    backends = FakeBackends(config, patches_per_slide=10)
    backends.pixels = ShortPixels()
    results = await _results(config, ["short", "s1", "s2"], backends)
    assert results["short"].status == "failed" and results["short"].failure.stage == "read"
    assert "returned 8 of 10" in results["short"].message
    assert results["s1"].status == "done" and results["s2"].status == "done"
    assert leftovers(tmp_path) == []
