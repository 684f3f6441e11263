"""Tiles of TIFF-family pyramid levels: which levels fit tile-once reading, raw tile reads, decoding, patch cutting.

The pixels produced here equal tiffslide's `read_region(...).convert("RGB")`: tiffslide maps a level-0 point to a
level by `int(x / downsample)`, reads the level through tifffile's decoders and pads outside the level with zeros.
We decode the same bytes with the same codec settings (for Aperio's RGB-coded JPEG tiles without an APP14/JFIF
marker: shared `JPEGTables` and an explicit RGB source colour space) and cut with the same geometry.
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SlideError, describe
from ..tileplan import TileGrid

# TIFF compression tag values we decode ourselves.
JPEG = 7
JPEG2000 = frozenset({33003, 33004, 33005, 34712})
BYTE_CODECS = frozenset({1, 5, 8, 32946, 50000})  # none, LZW, Adobe deflate, deflate, zstd
WEBP = 50001
SUPPORTED_COMPRESSIONS = frozenset({JPEG, WEBP, *JPEG2000, *BYTE_CODECS})

_PHOTOMETRIC_RGB = 2
_PHOTOMETRIC_YCBCR = 6


@dataclass(frozen=True, eq=False)
class TilePageMeta:
    """Everything needed to read and decode the tiles of one pyramid level (a tifffile page).

    Attributes:
        path: The TIFF file.
        level: The level index as the slide handle reports levels.
        downsample: The level's downsample (level-0 pixels per level pixel).
        grid: The level's size and tile size.
        compression: TIFF compression tag value.
        photometric: TIFF photometric tag value (2 RGB or 6 YCbCr).
        predictor: TIFF predictor tag value (1 none, 2 horizontal differencing).
        jpegtables: Shared JPEG tables (abbreviated tile streams), or None.
        jpeg_colorspace: Source colour space to force for JPEG (2 = RGB for marker-less RGB JPEG), or None.
        offsets: Byte offset of each tile in the file (row-major tile order).
        bytecounts: Byte count of each tile (0 = missing tile, read as black).
    """

    path: str
    level: int
    downsample: float
    grid: TileGrid
    compression: int
    photometric: int
    predictor: int
    jpegtables: bytes | None
    jpeg_colorspace: int | None
    offsets: np.ndarray
    bytecounts: np.ndarray


def decode_tile(raw: bytes, page_meta: TilePageMeta) -> np.ndarray:
    """Decode the raw bytes of one tile to RGB uint8 (h, w, 3) on the CPU, with imagecodecs (libjpeg-turbo, OpenJPEG,
    zlib...), which releases the GIL while decoding: safe from several threads at once.

    This is the codec under the `cpu` decoder backend (`backends.decoders`), which the reader also falls back to when
    a batch decoder rejects a batch, to name the corrupt tile. (h, w) is the tile size, or at least the part of the
    tile inside the level for an edge tile that was stored cropped. Raises any exception on corrupt data; the caller
    translates it.
    """
    import imagecodecs

    comp = page_meta.compression
    if comp == JPEG:
        return imagecodecs.jpeg8_decode(
            raw,
            tables=page_meta.jpegtables,
            colorspace=page_meta.jpeg_colorspace,
            outcolorspace=_PHOTOMETRIC_RGB,
        )
    if comp in JPEG2000:
        return imagecodecs.jpeg2k_decode(raw)
    if comp == WEBP:
        return imagecodecs.webp_decode(raw, hasalpha=False)
    return _decode_bytes(raw, page_meta)


def _decode_bytes(raw: bytes, meta: TilePageMeta) -> np.ndarray:
    """Decompress a byte-stream codec tile, reshape it to pixels and undo horizontal differencing."""
    import imagecodecs

    comp = meta.compression
    if comp == 1:
        data: Any = raw
    elif comp == 5:
        data = imagecodecs.lzw_decode(raw)
    elif comp == 50000:
        data = imagecodecs.zstd_decode(raw)
    else:
        data = imagecodecs.zlib_decode(raw)
    # TIFF stores every tile of a byte codec at full tile size.
    flat, g = np.frombuffer(data, dtype=np.uint8), meta.grid
    full = g.tile_h * g.tile_w * 3
    if flat.size < full:
        raise ValueError(f"tile decodes to {flat.size} bytes, expected {full}")
    pixels = flat[:full].reshape(g.tile_h, g.tile_w, 3)
    if meta.predictor == 2:
        return imagecodecs.delta_decode(pixels, axis=-2)
    return pixels


def jpeg_source_colorspace(photometric: int, is_jfif: bool) -> int | None:
    """The JPEG colour space to force when decoding, or None to let libjpeg infer it from the stream.

    Aperio writes RGB pixels as JPEG without the APP14/JFIF marker that would say so; libjpeg then assumes YCbCr and
    converts, which puts colours off by up to 248/255. The TIFF photometric tag is the authority.
    """
    if photometric == _PHOTOMETRIC_RGB and not is_jfif:
        return _PHOTOMETRIC_RGB
    return None


def _page_problem(page: Any) -> str | None:
    """Why a tifffile page cannot be read tile-once, or None when it can."""
    checks = [
        (type(page).__name__ != "TiffPage", "not a TIFF page"),
        (bool(getattr(page, "is_ndpi", False)), "NDPI restart-marker stripes, not tiles"),
        (not page.is_tiled or 322 not in page.tags, "not tiled"),
        (page.compression not in SUPPORTED_COMPRESSIONS, f"compression {int(page.compression)}"),
        (page.planarconfig != 1 or page.samplesperpixel != 3 or bool(page.extrasamples), "not 3-sample RGB"),
        (page.bitspersample != 8 or page.dtype != np.uint8, "not 8-bit"),
        (page.fillorder != 1 or page.predictor not in (1, 2), "unsupported fill order or predictor"),
        (page.imagedepth != 1 or page.tiledepth != 1, "volumetric"),
        (page.photometric not in (_PHOTOMETRIC_RGB, _PHOTOMETRIC_YCBCR), "photometric not RGB/YCbCr"),
        (
            page.photometric == _PHOTOMETRIC_YCBCR and page.compression not in (JPEG, *JPEG2000),
            "YCbCr outside JPEG",
        ),
    ]
    return next((why for bad, why in checks if bad), None)


def page_meta(path: str, level: int, downsample: float, page: Any) -> TilePageMeta | None:
    """The `TilePageMeta` of a tifffile page, or None when the page does not fit tile-once reading."""
    if _page_problem(page) is not None:
        return None
    grid = TileGrid(int(page.imagewidth), int(page.imagelength), int(page.tilewidth), int(page.tilelength))
    offsets = np.asarray(page.dataoffsets, dtype=np.int64)
    counts = np.asarray(page.databytecounts, dtype=np.int64)
    if offsets.shape[0] != grid.count or counts.shape[0] != grid.count:
        return None
    tables = page.jpegtables if page.compression == JPEG else None
    return TilePageMeta(
        path=path,
        level=level,
        downsample=downsample,
        grid=grid,
        compression=int(page.compression),
        photometric=int(page.photometric),
        predictor=int(page.predictor),
        jpegtables=bytes(tables) if tables else None,
        jpeg_colorspace=jpeg_source_colorspace(int(page.photometric), bool(page.is_jfif)),
        offsets=offsets,
        bytecounts=counts,
    )


def _tiffslide_levels(path: str) -> tuple[tuple[tuple[int, int], ...], list[Any]] | None:
    """tiffslide's level dimensions and the tifffile page of each level, or None when tiffslide cannot map them."""
    import tiffslide

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tiffslide warns about partly parsed vendor metadata
            slide = tiffslide.TiffSlide(path)
    except Exception:  # noqa: BLE001 - not a TIFF tiffslide can open: the caller falls back to read_region
        return None
    try:
        props = slide.properties
        if (
            props.get("tiffslide.series-axes") != "YXS"
            or "tiffslide.series-composition" in slide.zarr_group.attrs
        ):
            return None
        series = slide.ts_tifffile.series[props["tiffslide.series-index"]]
        pages = [series.levels[i][0] for i in range(len(slide.level_dimensions))]
        return tuple((int(w), int(h)) for w, h in slide.level_dimensions), pages
    except Exception:  # noqa: BLE001 - unusual layouts: fall back rather than guess
        return None
    finally:
        slide.close()


@functools.lru_cache(maxsize=16)
def _describe_cached(
    path: str, mtime_ns: int, size: int
) -> tuple[tuple[tuple[int, int], ...], tuple[Any, ...], tuple[str | None, ...]] | None:
    """Cached body of `describe_levels` and `level_problems`; mtime and size in the key keep a rewritten file apart."""
    found = _tiffslide_levels(path)
    if found is None:
        return None
    dims, pages = found
    # Level downsamples as tiffslide (and OpenSlide) compute them: the mean of the width and height ratios.
    w0, h0 = dims[0]
    downs = tuple(((w0 / w) + (h0 / h)) / 2.0 for w, h in dims)
    metas = tuple(page_meta(path, i, downs[i], page) for i, page in enumerate(pages))
    problems = tuple(
        None if meta is not None else (_page_problem(page) or "tile offsets do not match the tile grid")
        for meta, page in zip(metas, pages, strict=True)
    )
    return dims, metas, problems


def _described(path: str | os.PathLike[str]) -> Any:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _describe_cached(str(Path(path)), st.st_mtime_ns, st.st_size)


def describe_levels(
    path: str | os.PathLike[str],
) -> tuple[tuple[tuple[int, int], ...], tuple[TilePageMeta | None, ...]] | None:
    """Level dimensions (as tiffslide reports levels) and, per level, its `TilePageMeta` or None when unsupported.

    Returns None when the file is not a TIFF that tiffslide reads as a plain RGB pyramid.
    """
    found = _described(path)
    return None if found is None else (found[0], found[1])


def level_problems(path: str | os.PathLike[str]) -> tuple[str | None, ...] | None:
    """Per level, why it cannot be read tile-once ("NDPI stripes", "compression 52479", ...) or None when it can."""
    found = _described(path)
    return None if found is None else found[2]


def read_raw(fd: int, meta: TilePageMeta, tile: int) -> bytes | None:
    """The stored bytes of one tile (`os.pread`, safe from many threads), or None for a missing tile."""
    count = int(meta.bytecounts[tile])
    if count <= 0:
        return None
    data = os.pread(fd, count, int(meta.offsets[tile]))
    if len(data) != count:
        raise OSError(f"short read: {len(data)} of {count} bytes (file truncated?)")
    return data


def tile_error(meta: TilePageMeta, tile: int, exc: BaseException, slide: str) -> SlideError:
    """The one-line `SlideError` for a tile that cannot be read or decoded."""
    x, y = meta.grid.origin(tile)
    return SlideError(f"corrupt tile {tile} (level {meta.level}, x={x}, y={y}): {describe(exc)}", slide=slide)


def check_tile(pixels: Any, meta: TilePageMeta, tile: int, slide: str) -> Any:
    """Reject decoded tiles (numpy or torch, HWC) too small to cover the tile's inside part, or not RGB uint8."""
    vw, vh = meta.grid.valid_size(tile)
    ok = str(pixels.dtype).endswith("uint8") and pixels.ndim == 3 and pixels.shape[2] == 3
    if not ok or pixels.shape[0] < vh or pixels.shape[1] < vw:
        raise SlideError(
            f"corrupt tile {tile} (level {meta.level}): decoded shape {pixels.shape}, need at least ({vh}, {vw}, 3)",
            slide=slide,
        )
    return pixels


def cut_patch(
    tiles: dict[int, np.ndarray | None], grid: TileGrid, rect: tuple[int, int, int, int], needed: np.ndarray
) -> np.ndarray:
    """Assemble the level-pixel rectangle (x, y, w, h) from decoded tiles; outside the level stays black.

    Args:
        tiles: Decoded tiles by tile id (None = missing tile, black).
        grid: The level's tile grid.
        rect: Top-left and size in level pixels; may extend past the level's edges.
        needed: The tile ids the rectangle overlaps.

    Returns:
        uint8 (h, w, 3).
    """
    x, y, w, h = rect
    out = np.zeros((h, w, 3), dtype=np.uint8)
    x0, x1 = max(x, 0), min(x + w, grid.width)
    y0, y1 = max(y, 0), min(y + h, grid.height)
    for tile in needed.tolist():
        pixels = tiles[tile]
        if pixels is None:
            continue
        tx, ty = grid.origin(tile)
        # Intersect with the tile's inside part only, so the padding of edge tiles never leaks in.
        ax, bx = max(x0, tx), min(x1, tx + grid.tile_w)
        ay, by = max(y0, ty), min(y1, ty + grid.tile_h)
        if ax < bx and ay < by:
            out[ay - y : by - y, ax - x : bx - x] = pixels[ay - ty : by - ty, ax - tx : bx - tx]
    return out


def resize_patch(rgb: np.ndarray, patch_size: int) -> np.ndarray:
    """Resize to (patch_size, patch_size) exactly as upstream: `cv2.resize` with the default INTER_LINEAR."""
    if rgb.shape[0] == patch_size and rgb.shape[1] == patch_size:
        return rgb
    import cv2

    return cv2.resize(rgb, (patch_size, patch_size))
