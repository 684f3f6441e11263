"""Stage `write` driven through memory streams with the real H5 store: rows placed by index whatever their order,
failures drop partial files, zero-patch slides, cancellation leaves nothing that looks complete."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import anyio
import h5py
import numpy as np
import pytest

from atlaspatch_stream.items import Failure, FeatureBatch, PatchPlan, SlideFailed, WriteItem
from atlaspatch_stream.outputs.h5outputs import H5Outputs, SettingsRecord
from atlaspatch_stream.protocols import Store
from atlaspatch_stream.stages import write
from atlaspatch_stream.testing.fakes import FakePlanner, fake_jobs
from tests.helpers import fake_config, leftovers

from .conftest import Books, Opened, statuses

pytestmark = pytest.mark.anyio


class Stores(H5Outputs):
    """The real H5 store; `nospace` cannot be created (a full disk)."""

    def open_store(self, plan: PatchPlan, feature_dims: Mapping[str, int]) -> Store:
        if plan.slide.job.stem == "nospace":
            raise OSError(28, "No space left on device")
        return super().open_store(plan, feature_dims)


def _settings() -> write.WriteSettings:
    return write.WriteSettings(encoders=("a", "b"), dims={"a": 2, "b": 1}, count_rows=False)


async def _plans(opened: Opened, out: Path, stems: list[str], n: int = 6) -> list[PatchPlan]:
    config = fake_config(out)
    planner = FakePlanner(config, SettingsRecord(config, lambda: None), n)
    return [planner.plan(await opened.slide(job), np.ones((4, 4), bool)) for job in fake_jobs(out, stems)]


def _features(plan: PatchPlan, rows: list[int]) -> FeatureBatch:
    r = np.array(rows, dtype=np.int64)
    ids = np.full(len(r), plan.slide.job.slide_id, np.int64)
    return FeatureBatch(ids, r, {"a": np.stack([r, -r], axis=1).astype(np.float32),
                                 "b": (r[:, None] * 10).astype(np.float32)})


async def _run(items: list[WriteItem], books: Books, out: Path) -> None:
    send_in, receive_in = anyio.create_memory_object_stream[WriteItem](len(items))
    for item in items:
        send_in.send_nowait(item)
    send_in.close()
    config = fake_config(out)
    with anyio.fail_after(10):
        await write.run(receive_in, book=books.book, outputs=Stores(config, SettingsRecord(config, lambda: None)),
                        settings=_settings(), limiter=anyio.CapacityLimiter(1))


async def test_rows_out_of_order_and_interleaved_land_by_index(books: Books, opened: Opened, tmp_path: Path) -> None:
    """Two slides whose rows arrive shuffled and interleaved in uneven batches: each file's row i holds row i's
    features; both finish `done` with their final names and no temporary file."""
    p, q = await _plans(opened, tmp_path, ["p", "q"])
    items: list[WriteItem] = [p, q, _features(q, [5, 0]), _features(p, [3, 1, 4]), _features(q, [2, 4, 1, 3]),
                              _features(p, [0, 5, 2])]
    await _run(items, books, tmp_path)
    assert statuses(books.drained()) == {"p": "done", "q": "done"}
    for stem in ("p", "q"):
        with h5py.File(tmp_path / "patches" / f"{stem}.h5", "r") as f:
            np.testing.assert_array_equal(f["features/a"][...], np.stack([np.arange(6), -np.arange(6)], 1))
            np.testing.assert_array_equal(f["features/b"][:, 0], np.arange(6) * 10)
    assert leftovers(tmp_path) == []


async def test_a_failure_record_drops_the_partial_file(books: Books, opened: Opened, tmp_path: Path) -> None:
    """Half of a slide's rows, then a SlideFailed from the reader: the slide fails with the reader's message, its
    temporary file is gone and no final file appears; rows arriving afterwards are ignored."""
    [p] = await _plans(opened, tmp_path, ["p"])
    items: list[WriteItem] = [p, _features(p, [0, 1, 2]), SlideFailed(p.slide.job, Failure("read", "unreadable", "slide"), "p.svs: corrupt tile 7"),
                              _features(p, [3, 4, 5])]
    await _run(items, books, tmp_path)
    [result] = books.drained()
    assert result.status == "failed" and result.failure.stage == "read" and result.message == "p.svs: corrupt tile 7"
    assert not (tmp_path / "patches" / "p.h5").exists() and leftovers(tmp_path) == []


async def test_an_output_that_cannot_be_created_fails_its_slide_only(books: Books, opened: Opened,
                                                                    tmp_path: Path) -> None:
    """The disk refuses one slide's file: that slide fails ('write', the OS cause in its line), the other one
    finishes."""
    bad, good = await _plans(opened, tmp_path, ["nospace", "good"])
    await _run([bad, good, _features(good, list(range(6))), _features(bad, list(range(6)))], books, tmp_path)
    results = {r.job.stem: r for r in books.drained()}
    assert results["good"].status == "done" and results["nospace"].status == "failed"
    assert results["nospace"].failure.stage == "write" and "No space left" in results["nospace"].message


async def test_zero_patch_slide_finishes_with_empty_sets(books: Books, opened: Opened, tmp_path: Path) -> None:
    """A plan with no patches finishes at once with (0, D) datasets of the declared widths."""
    [p] = await _plans(opened, tmp_path, ["empty"], n=0)
    await _run([p], books, tmp_path)
    assert statuses(books.drained()) == {"empty": "done"}
    with h5py.File(tmp_path / "patches" / "empty.h5", "r") as f:
        assert f["features/a"].shape == (0, 2) and f["features/b"].shape == (0, 1)


async def test_input_ending_early_fails_incomplete_slides(books: Books, opened: Opened, tmp_path: Path) -> None:
    """The stream ends while a slide still misses rows: it fails ('pipeline ended before all rows arrived') and
    leaves nothing behind."""
    [p] = await _plans(opened, tmp_path, ["p"])
    await _run([p, _features(p, [0, 1])], books, tmp_path)
    [result] = books.drained()
    assert result.status == "failed" and "before all rows arrived" in result.message
    assert leftovers(tmp_path) == [] and not (tmp_path / "patches" / "p.h5").exists()


async def test_cancellation_mid_slide_leaves_no_file_that_looks_complete(books: Books, opened: Opened,
                                                                          tmp_path: Path) -> None:
    """Cancelled with a slide half written: its temporary file is removed; no final file exists."""
    [p] = await _plans(opened, tmp_path, ["p"])
    send_in, receive_in = anyio.create_memory_object_stream[WriteItem](4)
    send_in.send_nowait(p)
    send_in.send_nowait(_features(p, [0, 1, 2]))
    config = fake_config(tmp_path)
    with anyio.fail_after(10), anyio.move_on_after(0.3):
        await write.run(receive_in, book=books.book, outputs=Stores(config, SettingsRecord(config, lambda: None)),
                        settings=_settings(), limiter=anyio.CapacityLimiter(1))
    assert leftovers(tmp_path) == [] and not (tmp_path / "patches" / "p.h5").exists()
