"""`serve_folder`, the daemon's library twin, in process: results as slides finish, the library's rules kept (no
signal handlers, no default thread limiter), label and macro images never read, and the blocking twin."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import time
from pathlib import Path

import anyio
import h5py
import openslide
import pytest
import tiffslide

from atlaspatch_stream import sync
from atlaspatch_stream.api import serve_folder
from atlaspatch_stream.config import (
    EncodeConfig,
    PipelineConfig,
    PlanConfig,
    SegmentConfig,
    WatchConfig,
    WriteConfig,
)
from atlaspatch_stream.testing.synthetic import write_synthetic_slide
from tests.conftest import real_slide

pytestmark = pytest.mark.anyio


def _config(out: Path) -> PipelineConfig:
    return PipelineConfig(segment=SegmentConfig(segmenter="otsu", device="cpu"),
                          plan=PlanConfig(patch_size=256, target_mag=20),
                          encode=EncodeConfig(extractors=("color_stats",), device="cpu"),
                          write=WriteConfig(output=out),
                          watch=WatchConfig(settle_s=0.2, rescan_s=0.3, watch_mode="poll", status_interval_s=0.2))


def _quiet(path: Path) -> Path:
    """Age a freshly written slide's mtime by a minute (a `--once` run takes only slides quiet for settle_s)."""
    old = time.time() - 60
    os.utime(path, (old, old))
    return path


async def test_results_arrive_as_slides_finish_without_touching_the_host(tmp_path: Path) -> None:
    """Three slides, served once: three results (done, with complete H5s) while the host holds every token of
    anyio's default thread limiter and its signal handlers stay as they were; `results()` ends after the last."""
    folder = tmp_path / "in"
    for i in range(3):
        _quiet(write_synthetic_slide(folder / f"s{i}.svs", width=2048, height=1536, seed=i))
    default = anyio.to_thread.current_default_thread_limiter()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    saved, default.total_tokens = default.total_tokens, 1
    try:
        async with default:
            with anyio.fail_after(120):
                async with serve_folder(folder, _config(tmp_path / "out"), once=True, allow_root=True) as service:
                    async with service.results() as results:
                        outcomes = [o async for o in results]
                    assert {s: signal.getsignal(s) for s in handlers} == handlers
    finally:
        default.total_tokens = saved
    assert sorted(o.slide.slide_id for o in outcomes) == ["s0.svs", "s1.svs", "s2.svs"]
    assert all(o.state == "done" and o.result.status == "done" for o in outcomes)
    for outcome in outcomes:
        with h5py.File(outcome.result.h5_path, "r") as f:  # type: ignore[arg-type]
            assert f["features/color_stats"].shape == (f.attrs["num_patches"], 90)


async def test_label_and_macro_images_are_never_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real Aperio slide with a label and a macro image, served with tiffslide's and OpenSlide's associated-image
    accessors made to raise: the slide is done (no PHI-bearing image was ever touched)."""
    source = real_slide("aperio/CMU-1-Small-Region.svs")
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy2(source, folder / "cmu.svs")  # keeps its old mtime: quiet, so ready for a --once run

    def forbidden(self: object) -> None:
        raise AssertionError("an associated (label/macro) image was read")

    monkeypatch.setattr(tiffslide.TiffSlide, "associated_images", property(forbidden))
    monkeypatch.setattr(openslide.OpenSlide, "associated_images", property(forbidden))
    with anyio.fail_after(120):
        async with serve_folder(folder, _config(tmp_path / "out"), once=True, allow_root=True) as service, \
                service.results() as results:
            [outcome] = [o async for o in results]
    assert outcome.state == "done", outcome.result.message


async def test_root_is_refused_unless_allowed(tmp_path: Path) -> None:
    """As root, serve_folder refuses to start (one ConfigError naming the way out) unless allow_root."""
    from atlaspatch_stream.errors import ConfigError

    if os.geteuid() != 0:
        pytest.skip("needs root")
    (tmp_path / "in").mkdir()
    with pytest.raises(ConfigError, match="--allow-root"):
        async with serve_folder(tmp_path / "in", _config(tmp_path / "out")):
            pass
    assert not (tmp_path / "out").exists()


def test_blocking_twin_serves_and_stops(tmp_path: Path) -> None:
    """`sync.serve_folder`: results from a plain thread; after `stop()` the iteration ends once drained."""
    folder = tmp_path / "in"
    write_synthetic_slide(folder / "s.svs", width=2048, height=1536)
    config = dataclasses.replace(_config(tmp_path / "out"))
    with sync.serve_folder(folder, config, allow_root=True) as service:
        results = service.results()
        first = next(results)
        service.stop()
        rest = list(results)
        stats = service.statistics()
    assert first.state == "done" and rest == [] and stats.draining
