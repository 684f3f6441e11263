"""Tile planning (pure), tile layout discovery, raw reads, decoding and patch cutting of the tile-once reader."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import cv2
import imagecodecs
import numpy as np
import pytest
import tifffile
import tiffslide

from atlaspatch_stream.backends.decoders.cpu import CpuDecoder
from atlaspatch_stream.backends.readers import TileOnceReader
from atlaspatch_stream.backends.tiles import (
    TilePageMeta,
    cut_patch,
    decode_tile,
    describe_levels,
    jpeg_source_colorspace,
    read_raw,
    resize_patch,
)
from atlaspatch_stream.errors import SlideError
from atlaspatch_stream.protocols import DecodedTiles
from atlaspatch_stream.tileplan import TileGrid, chunk_bounds, level_origins, plan_level, tile_spans
from tests.conftest import real_slide

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# tifffile write arguments per synthetic variant. "jpeg_rgb" is Aperio's way: RGB pixels JPEG-coded as RGB.
VARIANTS: dict[str, dict[str, object]] = {
    "jpeg_rgb": {"compression": "jpeg", "photometric": "rgb", "compressionargs": {"outcolorspace": "rgb"}},
    "jpeg_ycbcr": {"compression": "jpeg", "photometric": "rgb"},
    "deflate": {"compression": "zlib", "predictor": True, "photometric": "rgb"},
    "lzw": {"compression": "lzw", "photometric": "rgb"},
    "zstd": {"compression": "zstd", "photometric": "rgb"},
    "jpeg2000": {"compression": "jpeg2000", "photometric": "rgb"},
    "aperio_j2k": {"compression": 33005, "photometric": "rgb"},
}
OPENSLIDE_READS = {"jpeg_rgb", "jpeg_ycbcr", "deflate", "lzw", "zstd", "aperio_j2k"}


def textured_image(width: int, height: int, seed: int) -> np.ndarray:
    """Smooth gradients plus noise: every tile differs and colour-space mistakes show."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([(xx * 0.6) % 256, (yy * 0.8) % 256, ((xx + yy) * 0.3) % 256], -1) * 0.7
    return (base + rng.integers(0, 70, (height, width, 3))).astype(np.uint8)


def write_pyramid(
    path: Path,
    variant: str,
    width: int = 420,
    height: int = 300,
    tile: int = 64,
    factors: tuple[int, ...] = (1, 2, 4),
    seed: int = 0,
) -> Path:
    """An Aperio-like tiled pyramid (level 0, a stripped thumbnail, reduced levels) that tiffslide and openslide read.

    Sizes not multiples of the tile size give partial edge tiles, padded in the file.
    """
    kw = VARIANTS[variant]
    img = textured_image(width, height, seed)
    head = f"Aperio Image Library v12.0.0\r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile})|AppMag = 20|MPP = 0.5"
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, tile=(tile, tile), description=head, metadata=None, **kw)
        thumb = cv2.resize(img, (width // 8, height // 8), interpolation=cv2.INTER_AREA)
        tw.write(
            thumb, description="Aperio Image Library v12.0.0\r\nthumbnail", photometric="rgb", metadata=None
        )
        for f in factors[1:]:
            level = cv2.resize(img, (width // f, height // f), interpolation=cv2.INTER_AREA)
            tw.write(
                level,
                tile=(tile, tile),
                description="Aperio Image Library v12.0.0\r\nlevel",
                metadata=None,
                **kw,
            )
    return path


def level_pixels(path: Path, level: int) -> np.ndarray:
    """A whole level as tiffslide reads it (the reference)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slide = tiffslide.TiffSlide(path)
    try:
        w, h = slide.level_dimensions[level]
        return np.asarray(slide.read_region((0, 0), level, (w, h)).convert("RGB"))
    finally:
        slide.close()


def decode_all_tiles(meta: TilePageMeta) -> dict[int, np.ndarray | None]:
    """Every tile of a level through `decode_tile` (None for a missing tile)."""
    fd = os.open(meta.path, os.O_RDONLY)
    try:
        raws = [read_raw(fd, meta, t) for t in range(meta.grid.count)]
    finally:
        os.close(fd)
    return {t: None if raw is None else decode_tile(raw, meta) for t, raw in enumerate(raws)}


def read_first_tile(meta: TilePageMeta, reader: TileOnceReader, slide: str) -> None:
    """Read one patch covering tile 0 of `meta`'s level through `reader`."""
    coords = np.array([[0, 0, meta.grid.tile_w, meta.grid.tile_h, meta.level]])
    list(reader.iter_level(meta, coords, 16, 1, slide=slide))


# ---------------------------------------------------------------------------------------------------------------
# planning (pure)


def test_grid_counts_origins_and_inside_part_of_edge_tiles() -> None:
    """A 300x250 level in 64-px tiles: 5x4 tiles; the last column/row keep only their inside part."""
    grid = TileGrid(300, 250, 64, 64)
    assert (grid.across, grid.down, grid.count) == (5, 4, 20)
    assert grid.origin(6) == (64, 64)
    assert grid.valid_size(4) == (300 - 256, 64)
    assert grid.valid_size(19) == (300 - 256, 250 - 192)


def test_level_origins_truncate_like_tiffslide() -> None:
    """Random level-0 points and odd downsamples map as `int(x / ds)`, the transform tiffslide applies."""
    rng = np.random.default_rng(1)
    xs = rng.integers(-500, 100_000, 500)
    for ds in (1.0, 2.0, 4.016129032258064, 8.086312118570184, 3.9999):
        rx, _ = level_origins(xs, xs, ds)
        assert rx.tolist() == [int(int(x) / ds) for x in xs]


def test_tile_spans_match_brute_force_overlap() -> None:
    """For random rectangles (inside, across and beyond the edges), the tile ranges are exactly the tiles overlapped."""
    grid = TileGrid(301, 250, 64, 48)
    rng = np.random.default_rng(2)
    rx, ry = rng.integers(-200, 400, 300), rng.integers(-200, 350, 300)
    rw, rh = rng.integers(1, 200, 300), rng.integers(1, 200, 300)
    tx0, tx1, ty0, ty1 = tile_spans(rx, ry, rw, rh, grid)
    for i in range(300):
        brute = {
            t
            for t in range(grid.count)
            if _overlap((rx[i], ry[i], rw[i], rh[i]), (*grid.origin(t), *grid.valid_size(t)))
        }
        spans = {ty * grid.across + tx for ty in range(ty0[i], ty1[i]) for tx in range(tx0[i], tx1[i])}
        assert spans == brute


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def test_plan_orders_row_bands_and_knows_last_use() -> None:
    """Shuffled overlapping patches: the plan cuts them by (y, x), lists each one's tiles, and a tile's last use is
    the last position whose patch overlaps it, so tiles dropped after it are never needed again."""
    grid = TileGrid(1000, 700, 100, 100)
    xs, ys = np.meshgrid(np.arange(-50, 1000, 150), np.arange(-30, 700, 150))
    n = xs.size
    coords = np.stack(
        [xs.ravel() * 2, ys.ravel() * 2, np.full(n, 220), np.full(n, 220), np.ones(n)], 1
    ).astype(np.int32)
    rows = np.random.default_rng(3).permutation(n)
    plan = plan_level(rows, coords, 2.0, grid)
    keys = list(zip(plan.ry.tolist(), plan.rx.tolist(), strict=True))
    assert keys == sorted(keys) and sorted(plan.rows.tolist()) == list(range(n))
    for i in range(len(plan)):
        rect = (int(plan.rx[i]), int(plan.ry[i]), 220, 220)
        brute = {t for t in range(grid.count) if _overlap(rect, (*grid.origin(t), *grid.valid_size(t)))}
        assert set(plan.tiles[plan.starts[i] : plan.starts[i + 1]].tolist()) == brute
        assert all(plan.last_use[t] >= i for t in brute)
    for t in range(grid.count):
        users = [i for i in range(len(plan)) if t in plan.tiles[plan.starts[i] : plan.starts[i + 1]]]
        assert plan.last_use[t] == (max(users) if users else -1)
    needed_now = plan.tiles_of(0, 10)
    dropped = plan.done_after(10, needed_now)
    assert not set(dropped.tolist()) & set(plan.tiles[plan.starts[10] :].tolist())


def test_chunk_bounds_cover_all_in_order() -> None:
    """Chunks of at most `chunk`, contiguous, covering everything; a non-positive chunk is refused."""
    assert chunk_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert chunk_bounds(0, 4) == []
    with pytest.raises(ValueError):
        chunk_bounds(3, 0)


# ---------------------------------------------------------------------------------------------------------------
# layout discovery


def test_describe_levels_real_slides() -> None:
    """SVS and generic tiled TIFF levels are described; NDPI stripes and an unknown compression are not."""
    svs = describe_levels(real_slide("aperio/CMU-1-Small-Region.svs"))
    assert svs is not None
    dims, metas = svs
    assert dims == ((2220, 2967),)
    meta = metas[0]
    assert meta is not None and meta.compression == 7 and meta.jpegtables and meta.jpeg_colorspace == 2
    assert (meta.grid.tile_w, meta.grid.tile_h) == (240, 240)

    boxes = describe_levels(real_slide("generic-tiff/boxes.tiff"))
    assert boxes is not None and len(boxes[1]) == 4 and all(m is not None for m in boxes[1])
    assert [m.predictor for m in boxes[1] if m] == [2, 2, 2, 2]

    ndpi = describe_levels(real_slide("hamamatsu/test3-DAPI-2-387.ndpi"))
    assert ndpi is not None and all(m is None for m in ndpi[1])
    odd = describe_levels(real_slide("errors/unopenable.tiff"))
    assert odd is not None and odd[1] == (None,)


def test_describe_levels_not_a_tiff(tmp_path: Path) -> None:
    """A PNG and a missing file are not TIFF pyramids: None, so the reader falls back to read_region."""
    png = tmp_path / "x.png"
    cv2.imwrite(str(png), textured_image(32, 32, 0))
    assert describe_levels(png) is None
    assert describe_levels(tmp_path / "missing.svs") is None


def test_jpeg_colorspace_rule() -> None:
    """Only marker-less RGB JPEG gets its source colour space forced to RGB."""
    assert jpeg_source_colorspace(2, False) == 2
    assert jpeg_source_colorspace(2, True) is None
    assert jpeg_source_colorspace(6, False) is None


# ---------------------------------------------------------------------------------------------------------------
# decoding


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_tile_decodes_like_tiffslide(tmp_path: Path, variant: str) -> None:
    """Each level of a synthetic pyramid: every decoded tile's inside part equals the level as tiffslide reads it."""
    path = write_pyramid(tmp_path / f"{variant}.svs", variant)
    found = describe_levels(path)
    assert found is not None
    for meta in found[1]:
        assert meta is not None
        whole = level_pixels(path, meta.level)
        for tile, pixels in decode_all_tiles(meta).items():
            x, y = meta.grid.origin(tile)
            w, h = meta.grid.valid_size(tile)
            assert pixels is not None
            np.testing.assert_array_equal(pixels[:h, :w], whole[y : y + h, x : x + w])


def test_aperio_rgb_jpeg_needs_tables_and_rgb_colorspace() -> None:
    """CMU-1's tiles are abbreviated JPEG with shared tables, RGB-coded without a marker: our decode equals tiffslide,
    while letting libjpeg guess the colour space (a plain decoder) is visibly wrong."""
    path = real_slide("aperio/CMU-1-Small-Region.svs")
    found = describe_levels(path)
    assert found is not None and found[1][0] is not None
    meta = found[1][0]
    tile = meta.grid.across * 5 + 4
    fd = os.open(path, os.O_RDONLY)
    try:
        raw = read_raw(fd, meta, tile)
    finally:
        os.close(fd)
    assert raw is not None
    ours = decode_tile(raw, meta)
    x, y = meta.grid.origin(tile)
    with tiffslide.TiffSlide(path) as slide:
        ref = np.asarray(slide.read_region((x, y), 0, (240, 240)).convert("RGB"))
    np.testing.assert_array_equal(ours, ref)
    guessed = imagecodecs.jpeg8_decode(raw, tables=meta.jpegtables)
    assert np.abs(guessed.astype(int) - ref).max() > 30


def test_corrupt_tile_is_one_line_slide_error() -> None:
    """unreadable.svs has a corrupt JPEG tile: loading it raises SlideError naming the slide, tile and cause."""
    path = real_slide("errors/unreadable.svs")
    found = describe_levels(path)
    assert found is not None and found[1][0] is not None
    with pytest.raises(SlideError) as info:
        read_first_tile(found[1][0], TileOnceReader(), "unreadable.svs")
    line = info.value.one_line()
    assert "\n" not in line and line.startswith("unreadable.svs: corrupt tile 0")
    assert info.value.slide == "unreadable.svs"


def test_decoder_too_small_output_is_rejected(tmp_path: Path) -> None:
    """A decoder that returns fewer pixels than a tile's inside part is a corrupt tile, not a silent black patch."""

    class Tiny(CpuDecoder):
        def decode_batch(self, raws: Sequence[bytes], meta: TilePageMeta) -> DecodedTiles:
            return DecodedTiles([np.zeros((2, 2, 3), np.uint8) for _ in raws])

    path = write_pyramid(tmp_path / "d.svs", "deflate", factors=(1,))
    found = describe_levels(path)
    assert found is not None and found[1][0] is not None
    with pytest.raises(SlideError, match="decoded shape"):
        read_first_tile(found[1][0], TileOnceReader(decoder=Tiny()), "d.svs")


# ---------------------------------------------------------------------------------------------------------------
# cutting and resizing


def test_cut_patch_never_leaks_edge_tile_padding() -> None:
    """Tiles filled to full size with 255 beyond the level's edge: a patch over the edge is black outside the level
    and shows only inside pixels within it."""
    grid = TileGrid(100, 70, 64, 64)
    tiles: dict[int, np.ndarray | None] = {}
    for t in range(grid.count):
        tile = np.full((64, 64, 3), 255, np.uint8)
        w, h = grid.valid_size(t)
        tile[:h, :w] = (t + 1) * 10
        tiles[t] = tile
    tiles[0] = None  # a missing tile reads as black
    rect = (40, 30, 100, 60)
    tx0, tx1, ty0, ty1 = tile_spans(*(np.array([v]) for v in rect), grid)
    needed = np.array([ty * grid.across + tx for ty in range(ty0[0], ty1[0]) for tx in range(tx0[0], tx1[0])])
    out = cut_patch(tiles, grid, rect, needed)
    expected = np.zeros((60, 100, 3), np.uint8)
    for t in range(1, grid.count):
        x, y = grid.origin(t)
        w, h = grid.valid_size(t)
        ys, xs = slice(max(y, 30) - 30, min(y + h, 90) - 30), slice(max(x, 40) - 40, min(x + w, 140) - 40)
        expected[ys, xs] = (t + 1) * 10
    np.testing.assert_array_equal(out, expected)
    assert not (out == 255).any()


def test_resize_patch_is_upstreams_cv2_linear() -> None:
    """A 512 read goes to 256 with cv2's default INTER_LINEAR; a read at patch size is returned unchanged."""
    img = textured_image(512, 512, 4)
    np.testing.assert_array_equal(
        resize_patch(img, 256), cv2.resize(img, (256, 256), interpolation=cv2.INTER_LINEAR)
    )
    small = img[:224, :224]
    assert resize_patch(small, 224) is small
