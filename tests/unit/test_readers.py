"""Patch readers: pixels bit-identical to tiffslide / openslide read_region (+ upstream's resize), tiles decoded once."""

from __future__ import annotations

import gc
import os
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import tiffslide

from atlaspatch_stream.backends.readers import (
    RegionReader,
    TileOnceReader,
    make_patch_reader,
    supports_tile_once,
    tile_metas,
)
from atlaspatch_stream.errors import SlideError
from atlaspatch_stream.items import SlideInfo
from atlaspatch_stream.tileplan import level_origins, tile_spans
from tests.conftest import real_slide
from tests.unit.test_tiles import OPENSLIDE_READS, VARIANTS, write_pyramid

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class LibHandle:
    """A minimal SlideHandle over tiffslide or openslide: `read_region(...).convert("RGB")`, as upstream reads."""

    def __init__(self, path: Path, backend: str) -> None:
        self.path = Path(path)
        self.name = self.path.name
        self.backend = backend
        self.tiff_path = self.path if backend == "tiffslide" else None
        self._lock = threading.Lock()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if backend == "tiffslide":
                self._slide = tiffslide.TiffSlide(self.path)
            else:
                import openslide

                self._slide = openslide.OpenSlide(self.path)
        dims = tuple((int(w), int(h)) for w, h in self._slide.level_dimensions)
        self.info = SlideInfo(
            path=str(self.path),
            backend=backend,
            width=dims[0][0],
            height=dims[0][1],
            level_dimensions=dims,
            level_downsamples=tuple(float(d) for d in self._slide.level_downsamples),
            mpp=None,
            magnification=None,
        )

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        with self._lock:  # one tiffslide handle is not meant for concurrent reads
            region = self._slide.read_region((x, y), level, (width, height))
        return np.asarray(region.convert("RGB"))

    def close(self) -> None:
        self._slide.close()


def random_coords(
    info: SlideInfo, n: int, seed: int, sizes: tuple[int, ...] = (64, 224, 256, 300, 512)
) -> np.ndarray:
    """Patches at every level, many crossing tile and slide edges (some wholly outside), of several read sizes."""
    rng = np.random.default_rng(seed)
    levels = rng.integers(0, len(info.level_dimensions), n)
    size = rng.choice(sizes, n)
    x = rng.integers(-400, info.width + 100, n)
    y = rng.integers(-400, info.height + 100, n)
    return np.stack([x, y, size, size, levels], 1).astype(np.int32)


def grid_coords(info: SlideInfo, level: int, read: int, stride: int) -> np.ndarray:
    """A regular lattice at `level` (level-0 top-lefts), patches overlapping when stride < read, edges included."""
    ds = info.level_downsamples[level]
    step = max(1, round(stride * ds))
    xs, ys = np.meshgrid(np.arange(0, info.width, step), np.arange(0, info.height, step))
    n = xs.size
    return np.stack(
        [xs.ravel(), ys.ravel(), np.full(n, read), np.full(n, read), np.full(n, level)], 1
    ).astype(np.int32)


def collect(
    batches: Iterator[tuple[np.ndarray, np.ndarray]], n: int, patch_size: int, chunk: int
) -> np.ndarray:
    """Gather yielded chunks by row, checking the reader's contract (every row exactly once, b <= chunk)."""
    out = np.zeros((n, patch_size, patch_size, 3), np.uint8)
    seen = np.zeros(n, np.int64)
    for rows, pixels in batches:
        assert rows.dtype == np.int64 and pixels.dtype == np.uint8
        assert 0 < rows.shape[0] <= chunk and pixels.shape == (rows.shape[0], patch_size, patch_size, 3)
        out[rows] = pixels
        seen[rows] += 1
    assert (seen == 1).all()
    return out


def expected(handle: LibHandle, coords: np.ndarray, patch_size: int) -> np.ndarray:
    """Upstream's way, patch by patch: read_region, convert RGB, cv2.resize when the read size differs."""
    out = np.zeros((coords.shape[0], patch_size, patch_size, 3), np.uint8)
    for i, (x, y, w, h, level) in enumerate(coords.tolist()):
        rgb = handle.read_region(x, y, level, w, h)
        out[i] = (
            rgb if rgb.shape[:2] == (patch_size, patch_size) else cv2.resize(rgb, (patch_size, patch_size))
        )
    return out


def distinct_tiles(handle: LibHandle, coords: np.ndarray) -> dict[int, int]:
    """Per level, the number of distinct tiles the patches overlap (computed independently of the plan)."""
    metas = tile_metas(handle)
    assert metas is not None
    result = {}
    for level in np.unique(coords[:, 4]).tolist():
        meta = metas[level]
        assert meta is not None
        sub = coords[coords[:, 4] == level].astype(np.int64)
        rx, ry = level_origins(sub[:, 0], sub[:, 1], handle.info.level_downsamples[level])
        tx0, tx1, ty0, ty1 = tile_spans(rx, ry, sub[:, 2], sub[:, 3], meta.grid)
        tiles = {
            ty * meta.grid.across + tx
            for i in range(sub.shape[0])
            for ty in range(ty0[i], ty1[i])
            for tx in range(tx0[i], tx1[i])
        }
        result[level] = len(tiles)
    return result


def decodes_per_level(reader: TileOnceReader) -> dict[int, int]:
    """Per level, how many distinct tiles the reader decoded (from its (level, tile) decode counter)."""
    per: dict[int, int] = {}
    for level, _tile in reader.decode_counts:
        per[level] = per.get(level, 0) + 1
    return per


REAL_TILED = ["aperio/CMU-1-Small-Region.svs", "aperio/small-16x16.svs", "generic-tiff/boxes.tiff"]


@pytest.mark.parametrize("relative", REAL_TILED)
def test_tile_once_equals_tiffslide_on_real_slides(relative: str) -> None:
    """Random patches at every level, across tile and slide edges, read sizes around the patch size: the tile-once
    reader gives exactly tiffslide's read_region(...).convert("RGB") followed by upstream's cv2 resize."""
    handle = LibHandle(real_slide(relative), "tiffslide")
    assert supports_tile_once(handle)
    assert isinstance(make_patch_reader(handle, 2), TileOnceReader)
    coords = random_coords(handle.info, 120, seed=len(relative))
    got = collect(TileOnceReader(threads=2).iter_patches(handle, coords, 256, 16), len(coords), 256, 16)
    np.testing.assert_array_equal(got, expected(handle, coords, 256))


@pytest.mark.parametrize("relative", REAL_TILED)
def test_tile_once_equals_openslide_where_openslide_agrees(relative: str) -> None:
    """Against OpenSlide: level-0 patches anywhere (incl. outside: transparent -> black), and level-1 patches at
    even level-0 positions of boxes.tiff (downsample 2), where OpenSlide needs no sub-pixel placement."""
    path = real_slide(relative)
    tiff, osl = LibHandle(path, "tiffslide"), LibHandle(path, "openslide")
    coords = random_coords(tiff.info, 80, seed=7)
    coords[:, 4] = 0
    if len(tiff.info.level_dimensions) > 1:
        extra = random_coords(tiff.info, 40, seed=8)
        extra[:, 4] = 1
        extra[:, :2] -= extra[:, :2] % 2
        coords = np.concatenate([coords, extra])
    got = collect(TileOnceReader(threads=2).iter_patches(tiff, coords, 224, 32), len(coords), 224, 32)
    np.testing.assert_array_equal(got, expected(osl, coords, 224))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_tile_once_equals_tiffslide_and_openslide_on_synthetic(tmp_path: Path, variant: str) -> None:
    """Synthetic Aperio-like pyramids in every supported compression (3 levels, partial edge tiles): equal to
    tiffslide everywhere, and to OpenSlide where it reads the file, at positions that are whole pixels on every level
    (sizes divisible by 4 make the downsamples exactly 1, 2, 4; OpenSlide places other positions sub-pixel)."""
    path = write_pyramid(tmp_path / f"{variant}.svs", variant, width=776, height=520, tile=128)
    handle = LibHandle(path, "tiffslide")
    assert supports_tile_once(handle)
    coords = random_coords(handle.info, 90, seed=3)
    got = collect(TileOnceReader(threads=2).iter_patches(handle, coords, 224, 25), len(coords), 224, 25)
    np.testing.assert_array_equal(got, expected(handle, coords, 224))
    if variant in OPENSLIDE_READS:
        osl = LibHandle(path, "openslide")
        aligned = coords.copy()
        aligned[:, :2] -= aligned[:, :2] % 4
        got = collect(TileOnceReader(threads=1).iter_patches(handle, aligned, 224, 25), len(coords), 224, 25)
        np.testing.assert_array_equal(got, expected(osl, aligned, 224))


@pytest.mark.parametrize(
    "stride, read, patch, chunk", [(240, 240, 240, 7), (200, 256, 256, 64), (256, 512, 256, 3)]
)
def test_each_tile_decoded_once(stride: int, read: int, patch: int, chunk: int) -> None:
    """A dense lattice over CMU-1 (non-overlapping, overlapping, and 512-px reads resized to 256), several chunk
    sizes: the number of decodes equals the number of distinct tiles touched, and pixels still match tiffslide."""
    handle = LibHandle(real_slide("aperio/CMU-1-Small-Region.svs"), "tiffslide")
    coords = grid_coords(handle.info, 0, read, stride)
    reader = TileOnceReader(threads=2)
    got = collect(reader.iter_patches(handle, coords, patch, chunk), len(coords), patch, chunk)
    assert decodes_per_level(reader) == distinct_tiles(handle, coords)
    assert set(reader.decode_counts.values()) == {1}
    assert reader.statistics()["tiles_decoded_twice"] == 0
    sample = np.random.default_rng(0).choice(len(coords), 25, replace=False)
    np.testing.assert_array_equal(got[sample], expected(handle, coords[sample], patch))


def test_each_tile_decoded_once_per_level_on_a_pyramid(tmp_path: Path) -> None:
    """Mixed levels in one coords array (shuffled): decodes per level equal the distinct tiles touched there."""
    path = write_pyramid(tmp_path / "p.svs", "jpeg_rgb", width=900, height=700, tile=64)
    handle = LibHandle(path, "tiffslide")
    coords = np.concatenate([grid_coords(handle.info, lv, 100, 70) for lv in range(3)])
    coords = coords[np.random.default_rng(1).permutation(len(coords))]
    reader = TileOnceReader(threads=2)
    got = collect(reader.iter_patches(handle, coords, 128, 50), len(coords), 128, 50)
    assert decodes_per_level(reader) == distinct_tiles(handle, coords)
    assert set(reader.decode_counts.values()) == {1}
    np.testing.assert_array_equal(got, expected(handle, coords, 128))


def test_ndpi_falls_back_to_read_region() -> None:
    """NDPI's 8-pixel stripes do not fit tile-once: the chosen reader is RegionReader, and both readers still give
    tiffslide's pixels (TileOnceReader falls back by itself)."""
    handle = LibHandle(real_slide("hamamatsu/test3-DAPI-2-387.ndpi"), "tiffslide")
    assert not supports_tile_once(handle)
    assert isinstance(make_patch_reader(handle, 2), RegionReader)
    coords = random_coords(handle.info, 24, seed=5, sizes=(128, 256))
    want = expected(handle, coords, 128)
    for reader in (RegionReader(threads=2), TileOnceReader(threads=2)):
        np.testing.assert_array_equal(collect(reader.iter_patches(handle, coords, 128, 5), 24, 128, 5), want)


@pytest.mark.parametrize(
    "relative",
    ["dicom/camelyon-multiframe/multiframe_camelyon_challenge_image.dcm", "dicom/boxes/boxes_0.dcm"],
)
def test_dicom_via_openslide_region_reader(relative: str) -> None:
    """DICOM is read by OpenSlide: no tile-once; RegionReader equals OpenSlide's read_region patch by patch."""
    pytest.importorskip("openslide")
    try:
        handle = LibHandle(real_slide(relative), "openslide")
    except Exception as exc:  # noqa: BLE001 - an OpenSlide build without DICOM support
        pytest.skip(f"openslide cannot open DICOM here: {exc}")
    assert not supports_tile_once(handle)
    reader = make_patch_reader(handle, 2)
    assert isinstance(reader, RegionReader)
    coords = random_coords(handle.info, 30, seed=9, sizes=(32, 128, 200))
    got = collect(reader.iter_patches(handle, coords, 128, 8), 30, 128, 8)
    np.testing.assert_array_equal(got, expected(handle, coords, 128))


def test_openslide_handle_of_a_tiff_is_not_tile_once() -> None:
    """The tile reader reproduces tiffslide only: an OpenSlide-backed handle of an SVS gets RegionReader."""
    handle = LibHandle(real_slide("aperio/CMU-1-Small-Region.svs"), "openslide")
    assert tile_metas(handle) is None and isinstance(make_patch_reader(handle, 1), RegionReader)


@pytest.mark.parametrize(
    "reader", [TileOnceReader(threads=2), RegionReader(threads=2)], ids=["tile-once", "region"]
)
def test_corrupt_tile_raises_slide_error(reader: TileOnceReader | RegionReader) -> None:
    """unreadable.svs has a corrupt JPEG tile: both readers raise one SlideError naming the slide, on one line."""
    handle = LibHandle(real_slide("errors/unreadable.svs"), "tiffslide")
    coords = np.array([[0, 0, 16, 16, 0]], np.int32)
    with pytest.raises(SlideError) as info:
        list(reader.iter_patches(handle, coords, 16, 4))
    assert info.value.slide == "unreadable.svs"
    assert "\n" not in info.value.one_line()


def test_empty_coords_and_bad_arguments() -> None:
    """No patches -> nothing yielded; wrong coords shape, level out of range, non-positive chunk -> errors."""
    handle = LibHandle(real_slide("aperio/small-16x16.svs"), "tiffslide")
    for reader in (TileOnceReader(), RegionReader()):
        assert list(reader.iter_patches(handle, np.zeros((0, 5), np.int32), 32, 4)) == []
        with pytest.raises(ValueError):
            list(reader.iter_patches(handle, np.zeros((3, 4), np.int32), 32, 4))
        with pytest.raises(ValueError):
            list(reader.iter_patches(handle, np.zeros((1, 5), np.int32) + 1, 32, 0))
        with pytest.raises(SlideError, match="level"):
            list(reader.iter_patches(handle, np.array([[0, 0, 8, 8, 3]], np.int32), 32, 4))


def open_fds(path: Path) -> int:
    """How many of this process's file descriptors point at `path`."""
    target = os.path.realpath(path)
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == target
        except OSError:
            continue
    return count


def test_stopping_early_releases_threads_and_file() -> None:
    """A consumer that stops after one chunk: closing the iterator joins the worker threads and closes the file."""
    handle = LibHandle(real_slide("aperio/CMU-1-Small-Region.svs"), "tiffslide")
    coords = grid_coords(handle.info, 0, 256, 256)
    gc.collect()  # handles of earlier tests caught in reference cycles must not close mid-test
    fds_before = open_fds(handle.path)
    it = TileOnceReader(threads=2).iter_patches(handle, coords, 256, 4)
    rows, _ = next(it)
    assert rows.shape == (4,) and open_fds(handle.path) == fds_before + 1
    assert [t for t in threading.enumerate() if t.name.startswith("tile-once")]
    it.close()  # type: ignore[attr-defined]
    assert open_fds(handle.path) == fds_before
    assert not [t for t in threading.enumerate() if t.name.startswith("tile-once")]


def test_with_project_slide_handle() -> None:
    """With the project's own `open_slide` handle (when present): tile-once is chosen for an SVS and its pixels
    equal the handle's read_region + upstream resize."""
    slides = pytest.importorskip("atlaspatch_stream.backends.slides")
    handle = slides.open_slide(real_slide("aperio/CMU-1-Small-Region.svs"))
    try:
        reader = make_patch_reader(handle, 2)
        assert isinstance(reader, TileOnceReader)
        coords = random_coords(handle.info, 40, seed=11)
        got = collect(reader.iter_patches(handle, coords, 224, 16), 40, 224, 16)
        np.testing.assert_array_equal(got, expected(handle, coords, 224))  # type: ignore[arg-type]
    finally:
        handle.close()
