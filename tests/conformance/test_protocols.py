"""One conformance test per protocol of `atlaspatch_stream.protocols`, in trio's `check_*` style.

Each section holds a `check_<protocol>` function that states what every implementation must do, run against the
real part (a synthetic tiled TIFF read by tiffslide, Otsu, the tile-once reader, the colour-statistics encoder, the
real H5 store) and against the fake of `atlaspatch_stream.testing.fakes` where one exists. Fakes pass the same checks
as the parts they stand in for, so stage tests on fakes say something about the real run. The run layer's two
protocols are here too: `run.Engine` (the local pipeline against `testing.engines.FakeEngine`; the Ray engine keeps
it in tests/distributed) and `run.JobSource` (a job list, a shard).
"""

from __future__ import annotations

import os
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from pathlib import Path

import anyio
import numpy as np
import pytest

from atlaspatch_stream.assembly import RealBackends
from atlaspatch_stream.backends.bundle import LatticePlanner, TiffSlides, TilePixels
from atlaspatch_stream.backends.decoders.cpu import CpuDecoder
from atlaspatch_stream.backends.encoders.group import EncoderGroup
from atlaspatch_stream.backends.readers import RegionReader, TileOnceReader
from atlaspatch_stream.backends.segment_otsu import OtsuSegmenter
from atlaspatch_stream.backends.tiles import describe_levels, read_raw
from atlaspatch_stream.config import PipelineConfig
from atlaspatch_stream.geometry import plan_geometry
from atlaspatch_stream.items import OpenedSlide, PatchPlan, SlideJob, SlideResult
from atlaspatch_stream.outputs import visualization_dir
from atlaspatch_stream.outputs.h5outputs import H5Outputs, SettingsRecord, slide_attrs
from atlaspatch_stream.outputs.overlays import OverlayFiles
from atlaspatch_stream.pipeline import running
from atlaspatch_stream.protocols import (
    Backends,
    Encoder,
    EncoderSet,
    OutputStore,
    PatchReader,
    PixelSource,
    Planner,
    PrecisionReporting,
    Segmenter,
    SlideHandle,
    SlideSource,
    TileDecoder,
)
from atlaspatch_stream.run import Engine, JobSource, drive
from atlaspatch_stream.sources.job_list import JobList
from atlaspatch_stream.sources.shard_source import ShardSource
from atlaspatch_stream.sources.shards import split_shard
from atlaspatch_stream.testing import write_synthetic_slide
from atlaspatch_stream.testing.engines import FakeEngine
from atlaspatch_stream.testing.fakes import (
    FakeBackends,
    FakeEncoder,
    FakePixels,
    FakePlanner,
    FakeSegmenter,
    FakeSlides,
    fake_jobs,
)
from tests.helpers import fake_config

PATCH = 32


@pytest.fixture(scope="module")
def slide_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real tiled pyramidal TIFF (1024×768 at 40×) with drawn tissue."""
    path = tmp_path_factory.mktemp("slide") / "conf.svs"
    return write_synthetic_slide(path, width=1024, height=768, levels=(1, 4), seed=3)


def _config(out: Path) -> PipelineConfig:
    config = fake_config(out, extractors=(), patch_size=PATCH)
    return config.replace(read=replace(config.read, decoder="cpu"))


def _job(slide: Path) -> SlideJob:
    return SlideJob(0, slide, slide.stem, None, display=slide.name)


def _settings(config: PipelineConfig) -> SettingsRecord:
    return SettingsRecord(config, lambda: None)


# -- SlideHandle and SlideSource ------------------------------------------------------------------------------------


def check_slide_source(slides: SlideSource, job: SlideJob) -> SlideHandle:
    """Opens a handle that is a `SlideHandle`, whose regions, thumbnails and info agree; returns it (open)."""
    handle = slides.open_slide(job)
    assert isinstance(handle, SlideHandle)
    info = handle.info
    assert info.width > 0 and info.height > 0 and info.level_dimensions[0] == (info.width, info.height)
    assert len(info.level_dimensions) == len(info.level_downsamples) and info.level_downsamples[0] == 1.0
    region = handle.read_region(0, 0, 0, 48, 40)
    assert region.shape == (40, 48, 3) and region.dtype == np.uint8
    thumb = slides.thumbnail(handle)
    assert thumb.ndim == 3 and thumb.shape[2] == 3 and thumb.dtype == np.uint8
    overlay = handle.overlay_thumbnail(256)
    assert max(overlay.shape[:2]) <= 256 and overlay.dtype == np.uint8
    return handle


@pytest.mark.parametrize("kind", ["real", "fake"])
def test_slide_source(kind: str, slide_file: Path, tmp_path: Path) -> None:
    """tiffslide slides and `FakeSlides` open handles that honour `SlideHandle`."""
    slides: SlideSource = TiffSlides(_config(tmp_path)) if kind == "real" else FakeSlides()
    check_slide_source(slides, _job(slide_file)).close()


# -- Segmenter ------------------------------------------------------------------------------------------------------


def check_segmenter(segmenter: Segmenter) -> None:
    """One bool mask of each thumbnail's size per thumbnail, in order; warm_up and close are callable."""
    segmenter.warm_up()
    rng = np.random.default_rng(0)
    thumbs = [rng.integers(0, 255, (40, 56, 3), dtype=np.uint8), np.full((24, 32, 3), 230, np.uint8)]
    masks = segmenter.segment(thumbs)
    assert len(masks) == len(thumbs)
    for thumb, mask in zip(thumbs, masks, strict=True):
        assert isinstance(mask, np.ndarray) and mask.dtype == bool and mask.shape == thumb.shape[:2]
    assert isinstance(segmenter.name, str) and segmenter.name
    segmenter.close()


@pytest.mark.parametrize("segmenter", [OtsuSegmenter(), FakeSegmenter()], ids=["otsu", "fake"])
def test_segmenter(segmenter: Segmenter) -> None:
    """Otsu and `FakeSegmenter` segment batches alike."""
    check_segmenter(segmenter)


# -- Encoder --------------------------------------------------------------------------------------------------------


def check_encoder(encoder: Encoder) -> None:
    """uint8 (B, P, P, 3) -> float32 (B, dim), row i from patch i alone."""
    encoder.warm_up()
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 255, (3, PATCH, PATCH, 3), dtype=np.uint8)
    features = encoder.encode(pixels)
    assert features.shape == (3, encoder.dim) and features.dtype == np.float32
    assert isinstance(encoder, PrecisionReporting) and encoder.precision_ran  # ours all say what they ran in
    np.testing.assert_allclose(encoder.encode(pixels[1:2])[0], features[1], rtol=1e-5, atol=1e-5)
    encoder.close()


def test_encoder_real(tmp_path: Path) -> None:
    """The weight-free `color_stats` encoder, built through the real registry (torch, CPU)."""
    config = _config(tmp_path)
    config = config.replace(encode=replace(config.encode, extractors=("color_stats",)))
    check_encoder(RealBackends(config).make_registry().create("color_stats"))


def test_encoder_fake() -> None:
    """`FakeEncoder` honours the same contract."""
    check_encoder(FakeEncoder())


# -- Planner and PixelSource ----------------------------------------------------------------------------------------


def check_planner(planner: Planner, slide: OpenedSlide, mask: np.ndarray) -> PatchPlan:
    """A plan of int32 (N, 5) coordinates with the new file's attributes; overlays that exist on disk."""
    plan = planner.plan(slide, mask)
    assert plan.slide is slide and plan.attrs is not None and plan.geometry is not None
    assert plan.coords.dtype == np.int32 and plan.coords.ndim == 2 and plan.coords.shape[1] == 5
    assert plan.num_patches > 0
    assert all(p.is_file() for p in planner.detect_overlays(slide, mask))
    return plan


def check_pixel_source(pixels: PixelSource, plan: PatchPlan, chunk: int) -> None:
    """Chunks cover every planned row exactly once, at most `chunk` rows, uint8 (b, P, P, 3); `routes` is text; a
    second reader closed part-way stops."""
    chunks = pixels.iter_patches(plan, PATCH, chunk, 1)
    seen: list[np.ndarray] = []
    for rows, px in chunks:
        assert 0 < len(rows) <= chunk and isinstance(px, np.ndarray)
        assert px.shape == (len(rows), PATCH, PATCH, 3) and px.dtype == np.uint8
        seen.append(rows)
    assert isinstance(chunks.routes, str)
    chunks.close()
    assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(plan.num_patches))
    partial = pixels.iter_patches(plan, PATCH, chunk, 1)
    next(partial)
    partial.close()
    assert next(partial, None) is None
    pixels.close()


def _parts(kind: str, config: PipelineConfig) -> tuple[SlideSource, Planner, PixelSource]:
    settings = _settings(config)
    if kind == "fake":
        return FakeSlides(), FakePlanner(config, settings, 7), FakePixels()
    pixels = TilePixels(config)
    attrs = lambda slide, geometry: slide_attrs(slide, geometry, settings)  # noqa: E731 - bound builder
    return TiffSlides(config), LatticePlanner(config, attrs, OverlayFiles(visualization_dir(config.write.output)), pixels), pixels


@pytest.mark.parametrize("kind", ["real", "fake"])
def test_planner_and_pixel_source(kind: str, slide_file: Path, tmp_path: Path) -> None:
    """The lattice planner and the tile-once reader, and their fakes, plan and read a slide alike."""
    config = _config(tmp_path)
    slides, planner, pixels = _parts(kind, config)
    handle = slides.open_slide(_job(slide_file))
    try:
        slide = OpenedSlide(_job(slide_file), handle)
        mask = OtsuSegmenter().segment([slides.thumbnail(handle)])[0]
        assert isinstance(mask, np.ndarray)
        check_pixel_source(pixels, check_planner(planner, slide, mask), chunk=3)
    finally:
        handle.close()


# -- TileDecoder and PatchReader (no fakes: the fakes' pixels come from `FakePixels`) -------------------------------


def check_tile_decoder(decoder: TileDecoder, slide: Path) -> None:
    """Decodes a batch of the level's stored tiles into one uint8 (tile_h, tile_w, 3) array each, in order."""
    levels = describe_levels(slide)
    assert levels is not None and levels[1][0] is not None
    meta = levels[1][0]
    decoder.warm_up()
    assert decoder.unsupported(meta) is None and decoder.batch_size >= 1
    fd = os.open(slide, os.O_RDONLY)
    try:
        raws = [raw for raw in (read_raw(fd, meta, i) for i in range(3)) if raw is not None]
    finally:
        os.close(fd)
    decoded = decoder.decode_batch(raws, meta)
    assert len(decoded.pixels) == len(raws) == 3
    for tile in decoded.pixels:
        assert isinstance(tile, np.ndarray) and tile.dtype == np.uint8
        assert tile.shape == (meta.grid.tile_h, meta.grid.tile_w, 3)
    assert (decoded.ready is None) == (decoder.device == "cpu")
    assert "decoder" in decoder.statistics()
    decoder.close()


def test_tile_decoder_cpu(slide_file: Path) -> None:
    """The CPU decoder (imagecodecs) honours `TileDecoder`."""
    check_tile_decoder(CpuDecoder(), slide_file)


def check_patch_reader(reader: PatchReader, handle: SlideHandle, coords: np.ndarray) -> np.ndarray:
    """Every row once, in chunks of at most `chunk`, uint8 (b, P, P, 3); returns the pixels in row order."""
    out = np.zeros((len(coords), PATCH, PATCH, 3), np.uint8)
    seen = np.zeros(len(coords), np.int64)
    for rows, pixels in reader.iter_patches(handle, coords, PATCH, 4):
        assert 0 < len(rows) <= 4 and isinstance(pixels, np.ndarray) and pixels.dtype == np.uint8
        out[rows] = pixels
        seen[rows] += 1
    assert (seen == 1).all()
    return out


def test_patch_readers_agree(slide_file: Path, tmp_path: Path) -> None:
    """The tile-once reader and the `read_region` reader both honour `PatchReader`, with the same pixels."""
    handle = TiffSlides(_config(tmp_path)).open_slide(_job(slide_file))
    try:
        coords = np.array([[x, y, 64, 64, 0] for x, y in ((0, 0), (200, 130), (700, 500), (960, 704))], np.int32)
        tile_once = check_patch_reader(TileOnceReader(threads=2), handle, coords)
        region = check_patch_reader(RegionReader(threads=2), handle, coords)
        np.testing.assert_array_equal(tile_once, region)
    finally:
        handle.close()


# -- EncoderSet -----------------------------------------------------------------------------------------------------


def check_encoder_set(encoders: EncoderSet) -> None:
    """Batches submitted in order come back in order, float32 (B, D) per requested encoder, D as declared, and
    (random pixels through these encoders) no row is marked non-finite."""
    encoders.warm_up()
    assert set(encoders.dims) == set(encoders.names) == set(encoders.precision_ran) and encoders.depth >= 1
    assert all(encoders.precision_ran.values())
    rng = np.random.default_rng(2)
    batches = [rng.integers(0, 255, (n, PATCH, PATCH, 3), dtype=np.uint8) for n in (3, 5)]
    tickets = [encoders.submit(b, None) for b in batches[: encoders.depth]]
    encoded = [encoders.collect(t) for t in tickets]
    for batch in batches[encoders.depth:]:
        encoded.append(encoders.collect(encoders.submit(batch, None)))
    assert all(not e.nonfinite for e in encoded)
    for batch, features in zip(batches, [e.features for e in encoded], strict=True):
        assert set(features) == set(encoders.names)
        for name, values in features.items():
            assert values.shape == (len(batch), encoders.dims[name]) and values.dtype == np.float32
    first = encoders.names[:1]
    only = encoders.collect(encoders.submit(batches[0], frozenset(first)))
    assert set(only.features) == set(first)
    encoders.close()


@pytest.mark.parametrize("kind", ["real", "fake"])
def test_encoder_set(kind: str, tmp_path: Path) -> None:
    """The encoder group over `color_stats` (real, torch on the CPU) and over two `FakeEncoder`s."""
    if kind == "fake":
        check_encoder_set(EncoderGroup([FakeEncoder("a"), FakeEncoder("b", dim=5)]))
        return
    config = _config(tmp_path)
    check_encoder_set(RealBackends(config.replace(encode=replace(config.encode, extractors=("color_stats",))))
                      .make_encoders())


# -- OutputStore (no fake: the fakes write through the real H5 store) -----------------------------------------------


def check_output_store(outputs: OutputStore, plan: PatchPlan) -> None:
    """Lock (exclusive, released once), reuse decision, a store aborted without a trace, one that becomes complete
    and final, then the decision to skip it."""
    job = plan.slide.job
    assert outputs.reuse_decision(job, ("a",)).action == "new"
    lock = outputs.acquire_lock(job)
    assert lock is not None and outputs.lock_path(job).exists()
    assert outputs.acquire_lock(job) is None  # held by a live process
    dropped = outputs.open_store(plan, {"a": 2})
    dropped.begin_feature("a", 2)
    dropped.abort()
    assert not outputs.h5_path(job).exists() and list(outputs.h5_path(job).parent.iterdir()) == [outputs.lock_path(job)]
    store = outputs.open_store(plan, {"a": 2})
    store.begin_feature("a", 2)
    assert store.has_feature("a") and not store.complete()
    store.write_rows("a", np.arange(plan.num_patches)[::-1].copy(), np.ones((plan.num_patches, 2), np.float32))
    assert store.complete() and store.finalize() == outputs.h5_path(job)
    assert lock.heartbeat()
    lock.release()
    lock.release()
    assert not outputs.lock_path(job).exists()
    np.testing.assert_array_equal(outputs.read_coords(outputs.h5_path(job)), plan.coords)
    assert outputs.reuse_decision(job, ("a",)).action == "skip"
    assert outputs.settings_fingerprint()
    outputs.sweep_orphans()


def test_output_store_real(tmp_path: Path) -> None:
    """`H5Outputs` (real lock files and HDF5) honours `OutputStore`."""
    config = _config(tmp_path)
    settings = _settings(config)
    slides = FakeSlides()
    [job] = fake_jobs(tmp_path, ["s0"])
    slide = OpenedSlide(job, slides.open_slide(job))
    geometry = plan_geometry(40, 20, PATCH, PATCH, (1.0,))
    coords = np.array([[i * 64, 0, 64, 64, 0] for i in range(5)], np.int32)
    check_output_store(H5Outputs(config, settings), PatchPlan(slide, geometry, coords,
                                                              slide_attrs(slide, geometry, settings)))


# -- Backends -------------------------------------------------------------------------------------------------------


def check_backends(backends: Backends) -> None:
    """Each part is there, a segmenter can be made, and with no encoder requested the encoder set is empty."""
    assert backends.slides is not None and backends.planner is not None
    assert backends.pixels is not None and backends.outputs is not None
    check_segmenter(backends.make_segmenter())
    encoders = backends.make_encoders()
    assert encoders.names == () and dict(encoders.dims) == {} and encoders.depth >= 1
    encoders.close()


@pytest.mark.parametrize("kind", ["real", "fake"])
def test_backends(kind: str, tmp_path: Path) -> None:
    """`RealBackends` (Otsu, no encoders) and `FakeBackends` compose their parts alike."""
    config = _config(tmp_path)
    check_backends(RealBackends(config) if kind == "real" else FakeBackends(config))


# -- Engine and JobSource (the run layer) ----------------------------------------------------------------------------


def _run_jobs(count: int) -> list[SlideJob]:
    return [SlideJob(i, Path(f"/slides/s{i}.svs"), f"s{i}") for i in range(count)]


async def check_engine(opening: AbstractAsyncContextManager[Engine], count: int) -> None:
    """`drive` over a job list: every job one `done` result, nothing torn down, no stop, totals that match."""
    async with opening as engine:
        summary = await drive(JobList(_run_jobs(count)), engine)
        assert sorted(r.job.slide_id for r in summary.results) == list(range(count))
        assert summary.count("done") == count and summary.ok and not engine.torn_down
        stats = engine.statistics()
        assert stats.totals.by_status.get("done") == count and stats.stopped is None


@pytest.mark.parametrize("kind", ["real", "fake"])
async def test_engine(kind: str, tmp_path: Path) -> None:
    """The local `Pipeline` (with fake backends, so no slides are needed) and `FakeEngine` keep the same contract."""
    with anyio.fail_after(60):
        if kind == "fake":
            await check_engine(FakeEngine().open(), 5)
            return
        config = fake_config(tmp_path / "out")
        await check_engine(running(config, FakeBackends(config), "features"), 5)


async def check_job_source(source: JobSource, listed: list[SlideJob], take: int) -> None:
    """Jobs come out in order, each once; those not taken are `unsent()`; settling a taken job is accepted."""
    taken: list[SlideJob] = []
    async for job in source.jobs():
        taken.append(job)
        await source.settle(job, SlideResult(job, "done"))
        if len(taken) == take:
            break
    assert [j.slide_id for j in taken] == [j.slide_id for j in listed[:take]]
    assert [j.slide_id for j in source.unsent()] == [j.slide_id for j in listed[take:]]


@pytest.mark.parametrize("kind", ["job_list", "shard"])
async def test_job_source(kind: str, tmp_path: Path) -> None:
    """`JobList` and a `ShardSource` without stealing or copies give out a list the same way."""
    listed = _run_jobs(6)
    source: JobSource = (JobList(listed) if kind == "job_list"
                         else ShardSource(split_shard(listed, None, {}), tmp_path, True))
    expected = listed if kind == "job_list" else list(split_shard(listed, None, {}).own)
    with anyio.fail_after(10):
        await check_job_source(source, expected, 4)
