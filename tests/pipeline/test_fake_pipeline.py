"""The streaming core end to end with `FakeBackends` (real ledger, real H5 files; fake slides, reader and encoders)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import h5py
import numpy as np
import orjson
import pytest

from atlaspatch_stream import outputs
from atlaspatch_stream.api import open_pipeline, process_slides
from atlaspatch_stream.config import (
    PipelineConfig,
    QueueConfig,
    WriteConfig,
)
from atlaspatch_stream.items import SlideResult
from atlaspatch_stream.outputs import claims
from atlaspatch_stream.report import REPORT_NAME
from atlaspatch_stream.testing.fakes import FakeBackends, fake_jobs
from tests.helpers import fake_config, h5_features, leftovers

pytestmark = pytest.mark.anyio


async def _run(config: PipelineConfig, stems: list[str], backends: FakeBackends | None = None,
               deadline: float = 4.0, **kwargs: Any) -> dict[str, SlideResult]:
    backends = backends or FakeBackends(config, **kwargs)
    with anyio.fail_after(deadline):
        summary = await process_slides(fake_jobs(config.write.output, stems), config, backends=backends)
    assert len(summary.results) == len(stems)
    return {r.job.stem: r for r in summary.results}






# -- end of stream, failures, zero patches ------------------------------------------------------------------------


async def test_results_end_after_close_input(tmp_path: Path) -> None:
    """Submit three slides, close the input, iterate results: exactly three results, then the iteration ends."""
    config = fake_config(tmp_path)
    backends = FakeBackends(config, patches_per_slide=10)
    with anyio.fail_after(4):
        async with open_pipeline(config, backends=backends) as pipeline:
            for job in fake_jobs(tmp_path, ["s0", "s1", "s2"]):
                await pipeline.submit(job)
            await pipeline.close_input()
            results = [r async for r in pipeline.results()]
    assert sorted(r.job.stem for r in results) == ["s0", "s1", "s2"]
    assert all(r.status == "done" and r.num_patches == 10 and r.features == ("a",) for r in results)
    for r in results:
        assert r.h5_path == outputs.h5_path(tmp_path, r.job.stem) and r.h5_path.exists()
    assert pipeline.statistics().totals.finished == 3 and pipeline.statistics().in_flight == 0
    assert leftovers(tmp_path) == []
    assert all(h.closed for h in backends.slides.opened)


async def test_features_are_in_row_order(tmp_path: Path) -> None:
    """Each slide's feature rows match the patches read at its coords rows (placed by index, across batches)."""
    config = fake_config(tmp_path, ("a", "b"), chunk=3, batch=5)
    results = await _run(config, ["s0", "s1", "s2"], patches_per_slide=11)
    handle = FakeBackends(config).slides.open_slide(fake_jobs(tmp_path, ["x"])[0])
    for r in results.values():
        with h5py.File(r.h5_path, "r") as f:  # type: ignore[arg-type]
            coords = f["coords"][...]
            feats = {n: f["features"][n][...] for n in ("a", "b")}
        want = np.stack([handle.read_region(int(x), int(y), 0, 16, 16).reshape(-1, 3).mean(0) for x, y in coords[:, :2]])
        assert coords.shape == (11, 5)
        np.testing.assert_allclose(feats["a"], want)
        np.testing.assert_allclose(feats["b"], want)


async def test_one_failing_slide_fails_alone(tmp_path: Path) -> None:
    """A slide that cannot be opened and one whose read fails half-way become failed records naming the cause and
    stage; the other slides finish; no partial file, temp file or lock remains."""
    config = fake_config(tmp_path)
    results = await _run(config, ["ok0", "bad_open", "bad_read", "ok1"], fail_open=["bad_open"],
                         fail_read=["bad_read"], patches_per_slide=12)
    assert {s: r.status for s, r in results.items()} == {
        "ok0": "done", "ok1": "done", "bad_open": "failed", "bad_read": "failed"}
    assert results["bad_open"].failure.stage == "open" and "injected failure" in results["bad_open"].message
    assert results["bad_read"].failure.stage == "read" and "corrupt tile" in results["bad_read"].message
    assert "bad_read.svs" in results["bad_read"].message
    assert not outputs.h5_path(tmp_path, "bad_open").exists()
    assert not outputs.h5_path(tmp_path, "bad_read").exists()
    assert h5_features(outputs.h5_path(tmp_path, "ok1"))["a"].shape == (12, 3)
    assert leftovers(tmp_path) == []


async def test_zero_patch_slide_gets_empty_sets(tmp_path: Path) -> None:
    """A slide without patches finishes with coords (0,5), num_patches 0 and a (0, D) set per encoder."""
    config = fake_config(tmp_path, ("a", "b"))
    results = await _run(config, ["empty_one", "full"])
    assert results["empty_one"].status == "done" and results["empty_one"].num_patches == 0
    with h5py.File(outputs.h5_path(tmp_path, "empty_one"), "r") as f:
        assert f["coords"].shape == (0, 5) and f.attrs["num_patches"] == 0
        assert f["features/a"].shape == (0, 3) and f["features/b"].shape == (0, 3)
        assert f["features/a"].dtype == np.float32
    assert results["full"].num_patches == 10


async def test_coords_mode_writes_coords_and_skips_on_rerun(tmp_path: Path) -> None:
    """Without encoders (segment-and-get-coords) the file has coords and no features; a rerun skips it."""
    config = fake_config(tmp_path, ())
    first = await _run(config, ["s0"])
    assert first["s0"].status == "done"
    with h5py.File(outputs.h5_path(tmp_path, "s0"), "r") as f:
        assert f["coords"].shape == (10, 5) and "features" not in f
    second = await _run(config, ["s0"])
    assert second["s0"].status == "skipped"


# -- backpressure ---------------------------------------------------------------------------------------------------


async def test_backpressure_bounds_open_slides_and_queues(tmp_path: Path) -> None:
    """With a slow encoder, `max_open_slides` = 2 and tiny queues: polling statistics() during the run, slides in
    flight never exceed 2 (nor do open handles), and no stream holds more than its size."""
    queues = QueueConfig(jobs=2, thumbnails=1, masks=1, plans=1, patches=1, features=1, results=2)
    config = fake_config(tmp_path, max_open=2, queues=queues, chunk=4, batch=4)
    backends = FakeBackends(config, patches_per_slide=8, encoder_delay=0.02)
    peak_flight, peak_used = 0, 0
    with anyio.fail_after(4):
        async with open_pipeline(config, backends=backends) as pipeline:
            async def feed() -> None:
                for job in fake_jobs(tmp_path, [f"s{i}" for i in range(8)]):
                    await pipeline.submit(job)
                await pipeline.close_input()

            async def poll() -> None:
                nonlocal peak_flight, peak_used
                while pipeline.statistics().totals.finished < 8:
                    stats = pipeline.statistics()
                    peak_flight = max(peak_flight, stats.in_flight)
                    for s in stats.streams.values():
                        assert s.used <= s.size
                        peak_used = max(peak_used, s.used)
                    await anyio.sleep(0.005)

            async with anyio.create_task_group() as tg:
                tg.start_soon(feed)
                tg.start_soon(poll)
                results = [r async for r in pipeline.results()]
    assert len(results) == 8 and all(r.status == "done" for r in results)
    assert peak_flight == 2  # the bound was reached (so the test means something) and never exceeded
    assert backends.slides.max_open_seen <= 2
    assert peak_used >= 1


async def test_the_patches_stream_holds_no_more_bytes_than_its_budget(tmp_path: Path) -> None:
    """`queues.patches_mb` of two and a half chunks, eight allowed by count, a slow encoder: the patches stream's
    capacity is two chunks, it fills to two and never holds more bytes than the budget."""
    chunk_bytes = 4 * 16 * 16 * 3
    queues = QueueConfig(patches=8, patches_mb=2.5 * chunk_bytes / 2**20)
    config = fake_config(tmp_path, queues=queues, chunk=4, batch=4)
    backends = FakeBackends(config, patches_per_slide=32, encoder_delay=0.02)
    peak = 0
    with anyio.fail_after(6):
        async with open_pipeline(config, backends=backends) as pipeline:
            patches = pipeline.statistics().streams["patches"]
            assert (patches.size, patches.bytes_per_item) == (2, chunk_bytes) == (config.patch_queue,
                                                                                 config.chunk_bytes)

            async def feed() -> None:
                for job in fake_jobs(tmp_path, ["s0", "s1"]):
                    await pipeline.submit(job)
                await pipeline.close_input()

            async def poll() -> None:
                nonlocal peak
                while pipeline.statistics().totals.finished < 2:
                    peak = max(peak, pipeline.statistics().streams["patches"].used)
                    await anyio.sleep(0.002)

            async with anyio.create_task_group() as tg:
                tg.start_soon(feed)
                tg.start_soon(poll)
                results = [r async for r in pipeline.results()]
    assert [r.status for r in results] == ["done", "done"]
    assert peak == 2 and peak * chunk_bytes <= queues.patches_mb * 2**20


# -- cancellation ---------------------------------------------------------------------------------------------------


async def test_cancellation_within_deadline_leaves_no_partial_output(tmp_path: Path) -> None:
    """Cancel the caller's scope mid-run while a slow reader is busy: the pipeline returns within 2 s, no `<stem>.h5`
    exists for unfinished slides, no temp file or lock remains and every opened handle is closed."""
    config = fake_config(tmp_path, max_open=4, chunk=2)
    backends = FakeBackends(config, patches_per_slide=40, read_delay=0.1)
    stems = [f"s{i}" for i in range(4)]
    finished: list[SlideResult] = []
    with anyio.fail_after(4):
        with anyio.move_on_after(0.6) as scope:
            async with open_pipeline(config, backends=backends) as pipeline:
                for job in fake_jobs(tmp_path, stems):
                    await pipeline.submit(job)
                await pipeline.close_input()
                async for result in pipeline.results():
                    finished.append(result)
        cancelled_at = time.perf_counter()
    assert scope.cancelled_caught
    assert time.perf_counter() - cancelled_at < 2.0
    assert finished == []  # 20 reads x 0.1 s per slide: none could finish
    assert [s for s in stems if outputs.h5_path(tmp_path, s).exists()] == []
    assert leftovers(tmp_path) == []
    assert backends.slides.opened and all(h.closed for h in backends.slides.opened)


async def test_cancel_then_rerun_completes(tmp_path: Path) -> None:
    """After a cancelled run, a second run of the same slides is not blocked by locks and finishes them all."""
    config = fake_config(tmp_path, chunk=2)
    with anyio.move_on_after(0.3):
        await process_slides(fake_jobs(tmp_path, ["s0", "s1"]), config,
                             backends=FakeBackends(config, patches_per_slide=40, read_delay=0.1))
    results = await _run(config, ["s0", "s1"])
    assert {r.status for r in results.values()} == {"done"}


# -- reuse, force, locks ----------------------------------------------------------------------------------------------


def _poison(path: Path, name: str) -> None:
    """Overwrite a feature set with a sentinel, to see whether a later run rewrites it."""
    with h5py.File(path, "a") as f:
        f["features"][name][...] = 42.0


async def test_reuse_adds_only_missing_encoders(tmp_path: Path) -> None:
    """Run with encoder a, then with a and b: the second result is 'reused', the file gains b and keeps a untouched
    (a sentinel written into a survives) and its coords."""
    first = await _run(fake_config(tmp_path, ("a",)), ["s0"])
    path = first["s0"].h5_path
    assert path is not None
    _poison(path, "a")
    coords_before = h5py.File(path, "r")["coords"][...]
    second = await _run(fake_config(tmp_path, ("a", "b")), ["s0"])
    assert second["s0"].status == "reused" and second["s0"].features == ("b",)
    feats = h5_features(path)
    assert sorted(feats) == ["a", "b"]
    assert np.all(feats["a"] == 42.0)
    assert feats["b"].shape == (10, 3) and not np.all(feats["b"] == 42.0)
    np.testing.assert_array_equal(h5py.File(path, "r")["coords"][...], coords_before)
    assert leftovers(tmp_path) == []
    third = await _run(fake_config(tmp_path, ("a", "b")), ["s0"])
    assert third["s0"].status == "skipped"


async def test_reuse_of_zero_patch_file_adds_empty_set(tmp_path: Path) -> None:
    """A zero-patch file gains a (0, D) set for a new encoder without re-segmenting."""
    await _run(fake_config(tmp_path, ("a",)), ["empty_s"])
    second = await _run(fake_config(tmp_path, ("a", "b")), ["empty_s"])
    assert second["empty_s"].status == "reused"
    assert {n: v.shape for n, v in h5_features(outputs.h5_path(tmp_path, "empty_s")).items()} == {
        "a": (0, 3), "b": (0, 3)}


async def test_force_overwrites_whole_file(tmp_path: Path) -> None:
    """skip_existing=False (--force) reprocesses: the file is replaced, so a sentinel and an unrequested set vanish."""
    await _run(fake_config(tmp_path, ("a", "b")), ["s0"])
    path = outputs.h5_path(tmp_path, "s0")
    _poison(path, "a")
    forced = await _run(fake_config(tmp_path, ("a",), skip_existing=False), ["s0"])
    assert forced["s0"].status == "done"
    feats = h5_features(path)
    assert sorted(feats) == ["a"] and not np.all(feats["a"] == 42.0)


async def test_geometry_mismatch_fails_slide_suggesting_force(tmp_path: Path) -> None:
    """Reusing a file made with another patch size fails that slide (message names the setting and --force);
    the file is left as it was and the other slide is processed."""
    await _run(fake_config(tmp_path, ("a",), patch_size=16), ["s0"])
    path = outputs.h5_path(tmp_path, "s0")
    before = path.stat().st_mtime_ns
    results = await _run(fake_config(tmp_path, ("a", "b"), patch_size=32), ["s0", "s1"])
    assert results["s0"].status == "failed" and results["s1"].status == "done"
    assert "patch_size=16 (requested 32)" in results["s0"].message and "--force" in results["s0"].message
    assert path.stat().st_mtime_ns == before
    forced = await _run(fake_config(tmp_path, ("a", "b"), patch_size=32, skip_existing=False), ["s0"])
    assert forced["s0"].status == "done"


async def test_locked_slide_reported_and_stale_lock_taken_over(tmp_path: Path) -> None:
    """A slide locked by a live process is reported 'locked' (its lock untouched); one locked by a dead process on
    this host is taken over and processed; the summary counts both."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        live_lock = outputs.lock_path(tmp_path, "held")
        live_lock.parent.mkdir(parents=True)
        live_lock.write_text(f"pid={child.pid},time=1,slide=x,host={claims.HOST}")
        outputs.lock_path(tmp_path, "stale").write_text(f"pid={dead.pid},time=1,slide=x,host={claims.HOST}")
        config = fake_config(tmp_path)
        with anyio.fail_after(4):
            summary = await process_slides(fake_jobs(tmp_path, ["held", "stale", "free"]), config,
                                           backends=FakeBackends(config))
        results = {r.job.stem: r for r in summary.results}
        assert results["held"].status == "locked" and "held.lock" in results["held"].message
        assert results["stale"].status == "done" and results["free"].status == "done"
        assert summary.count("locked") == 1 and summary.statistics.totals.by_status == {"locked": 1, "done": 2}
        assert live_lock.read_text().startswith(f"pid={child.pid},")
        assert not outputs.h5_path(tmp_path, "held").exists()
        assert not outputs.lock_path(tmp_path, "stale").exists()
    finally:
        child.kill()
        child.wait()


# -- run report -----------------------------------------------------------------------------------------------------


async def test_run_report_lines(tmp_path: Path) -> None:
    """The report holds run_start first, stage events with seconds and a slide event per slide, run_end last,
    all with one run id."""
    config = fake_config(tmp_path)
    await _run(config, ["s0", "bad"], fail_open=["bad"])
    events = [orjson.loads(line) for line in (tmp_path / REPORT_NAME).read_bytes().splitlines()]
    assert events[0]["event"] == "run_start" and events[-1]["event"] == "run_end"
    assert events[0]["pid"] == os.getpid() and events[0]["settings"]["plan"]["patch_size"] == 16
    assert len({e["run"] for e in events}) == 1
    slides = {Path(e["slide"]).stem: e for e in events if e["event"] == "slide"}
    assert slides["s0"]["status"] == "done" and slides["s0"]["num_patches"] == 10 and slides["s0"]["seconds"] > 0
    assert slides["bad"]["status"] == "failed" and slides["bad"]["stage"] == "open"
    stages = {e["stage"] for e in events if e["event"] == "stage" and Path(e["slide"]).stem == "s0"}
    assert {"open", "segment", "plan", "read", "encode"} <= stages
    assert all(e["seconds"] >= 0 for e in events if e["event"] == "stage")
    assert events[-1]["finished"] == 2 and events[-1]["by_status"] == {"done": 1, "failed": 1}


# -- other modes ----------------------------------------------------------------------------------------------------


async def test_coords_mode_with_save_images_finishes_when_all_rows_read(tmp_path: Path) -> None:
    """segment-and-get-coords --save-images: rows travel without pixels to the writer, which finishes the slide once
    every row was read; one PNG per patch exists; a read failure fails that slide alone."""
    base = fake_config(tmp_path, (), chunk=3)
    config = base.replace(write=WriteConfig(output=tmp_path, write_batch=8, save_images=True))
    results = await _run(config, ["s0", "bad"], patches_per_slide=7, fail_read=["bad"])
    assert results["s0"].status == "done" and results["s0"].num_patches == 7
    assert results["bad"].status == "failed" and results["bad"].failure.stage == "read"
    assert len(list((tmp_path / "images" / "s0").glob("s0_x*_y*.png"))) == 7
    with h5py.File(outputs.h5_path(tmp_path, "s0"), "r") as f:
        assert f["coords"].shape == (7, 5) and "features" not in f
    assert not outputs.h5_path(tmp_path, "bad").exists() and leftovers(tmp_path) == []


async def test_detect_mode_writes_masks_only(tmp_path: Path) -> None:
    """detect-tissue: mask overlays per slide, no H5, no lock, every slide 'done'."""
    config = fake_config(tmp_path, ())
    with anyio.fail_after(4):
        summary = await process_slides(fake_jobs(tmp_path, ["s0", "s1"]), config, mode="detect",
                                       backends=FakeBackends(config))
    assert sorted(r.status for r in summary.results) == ["done", "done"]
    names = sorted(p.name for p in (tmp_path / "visualization").iterdir())
    assert names == ["s0_mask.png", "s0_mask_bw.png", "s1_mask.png", "s1_mask_bw.png"]
    assert not (tmp_path / "patches").exists() or list((tmp_path / "patches").iterdir()) == []


async def test_locks_of_slides_in_flight_are_heartbeaten(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow slide's lock, aged by hand as if no one had touched it for 10 minutes, is refreshed by the pipeline's
    heartbeat while the slide is in flight (another host judges a lock by its age); it is removed at the end."""
    import atlaspatch_stream.pipeline as pipeline_module

    monkeypatch.setattr(pipeline_module, "HEARTBEAT_S", 0.05)
    config = fake_config(tmp_path)
    backends = FakeBackends(config, patches_per_slide=40, read_delay=0.05)
    lock = outputs.lock_path(tmp_path, "slow")
    with anyio.fail_after(20):
        async with open_pipeline(config, backends=backends) as pipeline:
            await pipeline.submit(fake_jobs(tmp_path, ["slow"])[0])
            while not lock.exists():
                await anyio.sleep(0.01)
            aged = time.time() - 600
            os.utime(lock, (aged, aged))
            await anyio.sleep(0.3)
            assert lock.stat().st_mtime > aged + 500
    assert not lock.exists()
