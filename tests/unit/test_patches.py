"""The torch cutter and resizer (`backends.patches`) on CPU tensors against cv2 and the numpy reference cutter."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from atlaspatch_stream.backends.decoders.cpu import CpuDecoder
from atlaspatch_stream.backends.patches import cut_patches, linear_coefficients, resize_linear
from atlaspatch_stream.backends.readers import TileOnceReader
from atlaspatch_stream.backends.tiles import cut_patch, resize_patch
from atlaspatch_stream.testing.synthetic import draw_tissue
from atlaspatch_stream.tileplan import TileGrid, tile_spans
from tests.conftest import real_slide
from tests.helpers import all_raws, level_meta
from tests.unit.test_readers import LibHandle, collect, random_coords

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def patches_of(read: int, n: int, seed: int) -> np.ndarray:
    """n crops of drawn tissue (texture, edges, background) and n of uniform noise, read×read each."""
    rng = np.random.default_rng(seed)
    tissue, _ = draw_tissue(1400, 1400, seed=seed)
    ys, xs = rng.integers(0, 1400 - read, (2, n))
    crops = [tissue[y : y + read, x : x + read] for y, x in zip(ys, xs, strict=True)]
    noise = rng.integers(0, 256, (n, read, read, 3), dtype=np.uint8)
    return np.concatenate([np.stack(crops), noise])


@pytest.mark.parametrize("read, size", [(512, 256), (448, 224), (1024, 256), (896, 224), (256, 256)])
def test_resize_is_bit_exact_at_1x_2x_4x(read: int, size: int) -> None:
    """Read sizes of one, two and four times the patch size: torch equals cv2.resize (INTER_LINEAR) bit for bit."""
    x = patches_of(read, 6, seed=read)
    got = resize_linear(torch.from_numpy(x), size).numpy()
    want = np.stack([cv2.resize(p, (size, size)) for p in x])
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("read, size", [(512, 224), (300, 256), (600, 224), (257, 256), (224, 256), (100, 256)])
def test_resize_within_one_grey_level_at_other_ratios(read: int, size: int) -> None:
    """Other ratios, down and up: never more than one grey level from cv2, and on at most 1% of the values (the
    replayed fixed-point arithmetic matches cv2's SIMD kernel; only border rows of upscales can round apart)."""
    x = patches_of(read, 6, seed=read + 1)
    got = resize_linear(torch.from_numpy(x), size).numpy().astype(int)
    want = np.stack([cv2.resize(p, (size, size)) for p in x]).astype(int)
    diff = np.abs(got - want)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_coefficients_clamp_at_the_borders() -> None:
    """The 11-bit weights sum to 2048 everywhere; positions before the first and past the last source pixel take
    that pixel alone (as OpenCV clamps)."""
    i0, i1, w0, w1 = linear_coefficients(224, 256)
    assert ((w0 + w1) == 2048).all() and i0.min() == 0 and i1.max() == 223
    assert (w0[0], w1[0]) == (2048, 0) and (w0[-1], w1[-1]) == (2048, 0)


@pytest.fixture(scope="module")
def cmu_tiles() -> tuple[dict[int, np.ndarray | None], TileGrid]:
    """Every decoded tile of CMU-1 (240² tiles, 2220×2967), with a few dropped as missing (None)."""
    meta = level_meta(real_slide("aperio/CMU-1-Small-Region.svs"))
    tiles: dict[int, np.ndarray | None] = {
        t: CpuDecoder().decode_batch([raw], meta).pixels[0]  # type: ignore[misc]
        for t, raw in enumerate(all_raws(meta))
    }
    for t in (0, 17, 40):
        tiles[t] = None
    return tiles, meta.grid


def reference_cut(tiles: dict, grid: TileGrid, rects: np.ndarray, size: int) -> np.ndarray:
    out = []
    for x, y, w, h in rects.tolist():
        tx0, tx1, ty0, ty1 = tile_spans(*(np.array([v]) for v in (x, y, w, h)), grid)
        needed = np.array([r * grid.across + c for r in range(ty0[0], ty1[0]) for c in range(tx0[0], tx1[0])])
        out.append(resize_patch(cut_patch(tiles, grid, (x, y, w, h), needed.astype(np.int64)), size))
    return np.stack(out)


@pytest.mark.parametrize("read, size, exact", [(240, 240, True), (256, 256, True), (512, 256, True),
                                               (300, 224, False)])
def test_cut_equals_numpy_cutter_on_real_tiles(cmu_tiles: tuple, read: int, size: int, exact: bool) -> None:
    """Random rectangles over CMU-1 crossing tile and slide edges (some wholly outside, some over missing tiles),
    cut and resized in torch: equal to the numpy cutter + cv2 (within one grey level at non-integer ratios); the
    padding of edge tiles never leaks in."""
    tiles, grid = cmu_tiles
    rng = np.random.default_rng(read)
    n = 40
    rects = np.stack([rng.integers(-600, grid.width + 80, n), rng.integers(-600, grid.height + 80, n),
                      np.full(n, read), np.full(n, read)], 1)
    got = cut_patches(tiles, grid, rects, size, "cpu")
    assert got.dtype == torch.uint8 and tuple(got.shape) == (n, size, size, 3) and got.device.type == "cpu"
    diff = np.abs(got.numpy().astype(int) - reference_cut(tiles, grid, rects, size))
    assert diff.max() == 0 if exact else diff.max() <= 1


def test_cut_in_small_canvas_batches_equals_one_batch(cmu_tiles: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """A canvas budget that allows only a few patches per gather gives the same pixels as one big gather."""
    from atlaspatch_stream.backends import patches

    tiles, grid = cmu_tiles
    rng = np.random.default_rng(9)
    rects = np.stack([rng.integers(0, grid.width, 30), rng.integers(0, grid.height, 30),
                      np.full(30, 512), np.full(30, 512)], 1)
    whole = cut_patches(tiles, grid, rects, 256, "cpu")
    monkeypatch.setattr(patches, "CANVAS_BUDGET", 3 * (512 + 240) ** 2 * 3)
    np.testing.assert_array_equal(cut_patches(tiles, grid, rects, 256, "cpu").numpy(), whole.numpy())


def test_mixed_sizes_are_refused_and_empty_is_empty(cmu_tiles: tuple) -> None:
    """One call cuts one read size (the reader groups them); no rectangles gives an empty batch."""
    tiles, grid = cmu_tiles
    with pytest.raises(ValueError, match="one size"):
        cut_patches(tiles, grid, np.array([[0, 0, 10, 10], [0, 0, 20, 20]]), 16, "cpu")
    assert tuple(cut_patches(tiles, grid, np.zeros((0, 4), np.int64), 16, "cpu").shape) == (0, 16, 16, 3)


def test_reader_torch_cutter_on_cpu_matches_cv2_cutter() -> None:
    """The tile-once reader with the torch cutter (the GPU path's code, on CPU tensors) and mixed read sizes gives
    the cv2 cutter's pixels: exactly at 1× and 2×, within one grey level elsewhere; with device_output it yields
    torch tensors on the decoder's device."""
    handle = LibHandle(real_slide("aperio/CMU-1-Small-Region.svs"), "tiffslide")
    coords = random_coords(handle.info, 80, seed=21, sizes=(256, 512, 300))
    ref = collect(TileOnceReader(threads=2, cutter="cv2").iter_patches(handle, coords, 256, 16), 80, 256, 16)
    got = collect(TileOnceReader(threads=2, cutter="torch").iter_patches(handle, coords, 256, 16), 80, 256, 16)
    diff = np.abs(got.astype(int) - ref)
    integer = np.isin(coords[:, 2], (256, 512))
    assert diff[integer].max() == 0 and diff.max() <= 1
    reader = TileOnceReader(threads=2, cutter="torch", device_output=True)
    rows, pixels = next(iter(reader.iter_patches(handle, coords, 256, 16)))
    assert isinstance(pixels, torch.Tensor) and pixels.device.type == "cpu" and pixels.dtype == torch.uint8
