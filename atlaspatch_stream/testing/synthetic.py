"""Synthetic slides: tiled pyramidal TIFFs laid out like Aperio SVS files, and flat images, with drawn tissue.

The tissue is deterministic from the seed: pinkish H&E-like textured blobs with holes on a near-white background.
Files follow the Aperio layout (page 0 = level 0, page 1 = stripped thumbnail, then the other levels, all tiled), with
an Aperio ImageDescription carrying `AppMag` and `MPP` when given, so tiffslide and OpenSlide both read the objective
power and the mpp. Compressions:

- `jpeg_rgb`: JPEG tiles with photometric RGB and no APP14/JFIF marker, component ids 0,1,2 - as Aperio writes them
  (a plain JPEG decoder would take them for YCbCr; TIFF readers must honour the photometric tag);
- `jpeg_ycbcr`: JPEG with photometric YCbCr and 2×2 chroma subsampling (written by tifffile);
- `jpeg2000`: Aperio's JPEG 2000 RGB (compression 33005), one J2K codestream per tile;
- `deflate`: lossless, so the pixels equal the drawn array.

Only numpy is needed at import time; tifffile, imagecodecs and Pillow are imported when writing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..backends.decoders.probe import aperio_jpeg

Compression = Literal["jpeg_rgb", "jpeg_ycbcr", "jpeg2000", "deflate"]
Tissue = Literal["blobs", "none", "full"]

__all__ = ["draw_tissue", "pyramid", "write_image", "write_sample_slide", "write_synthetic_slide"]

_BACKGROUND = np.array([243, 241, 244], np.float32)
_EOSIN = np.array([234, 160, 200], np.float32)
_HEMATOXYLIN = np.array([128, 72, 160], np.float32)
_NUCLEUS = np.array([75, 40, 120], np.float32)
# The tissue outline is drawn at 1/8 resolution: cheap, and edges stay organic after upsampling.
_MASK_CELL = 8
_APERIO_JP2K_RGB = 33005


def _smooth_noise(shape: tuple[int, int], cell: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth noise in [0, 1]: a random grid of `cell`-pixel spacing, bilinearly interpolated, float32."""
    h, w = shape
    grid = rng.random((h // cell + 2, w // cell + 2)).astype(np.float32)
    # Separable: interpolate along x on the small grid first, so only two full-size operations remain.
    xs = np.arange(w, dtype=np.float32) / cell
    x0 = xs.astype(np.int64)
    fx = xs - x0
    rows = grid[:, x0] * (1 - fx) + grid[:, x0 + 1] * fx
    ys = np.arange(h, dtype=np.float32) / cell
    y0 = ys.astype(np.int64)
    fy = (ys - y0)[:, None]
    out = rows[y0]
    out *= 1 - fy
    out += rows[y0 + 1] * fy
    return out


def _ellipses(shape: tuple[int, int], count: int, size: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """Union of `count` random ellipses with radii in `size` (fractions of the short side), with wobbly edges."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    wobble = _smooth_noise(shape, max(2, min(h, w) // 8), rng) - 0.5
    mask = np.zeros(shape, bool)
    for _ in range(count):
        cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
        ry, rx = (rng.uniform(*size) * min(h, w) for _ in range(2))
        mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1.0 + 0.6 * wobble
    return mask


def _tissue_mask(shape: tuple[int, int], tissue: Tissue, rng: np.random.Generator) -> np.ndarray:
    """Bool tissue mask at full resolution."""
    if tissue == "none":
        return np.zeros(shape, bool)
    if tissue == "full":
        return np.ones(shape, bool)
    small = (max(8, -(-shape[0] // _MASK_CELL)), max(8, -(-shape[1] // _MASK_CELL)))
    mask = _ellipses(small, int(rng.integers(2, 5)), (0.12, 0.28), rng)
    mask &= ~_ellipses(small, int(rng.integers(2, 5)), (0.02, 0.06), rng)  # holes (some land outside: fine)
    big = np.repeat(np.repeat(mask, _MASK_CELL, axis=0), _MASK_CELL, axis=1)
    return big[: shape[0], : shape[1]]


def draw_tissue(width: int, height: int, *, seed: int = 0, tissue: Tissue = "blobs") -> tuple[np.ndarray, np.ndarray]:
    """Draw an H&E-like RGB image and its tissue mask.

    Args:
        width, height: image size in pixels.
        seed: makes the drawing deterministic.
        tissue: "blobs" (textured blobs with holes), "none" (background only) or "full" (tissue everywhere).

    Returns:
        (RGB uint8 (height, width, 3), bool mask (height, width)).
    """
    rng = np.random.default_rng(seed)
    shape = (height, width)
    mask = _tissue_mask(shape, tissue, rng)
    stain = _smooth_noise(shape, 48, rng)
    nuclei = _smooth_noise(shape, 6, rng) > 0.82
    texture = rng.standard_normal(shape, dtype=np.float32)
    image = np.empty((height, width, 3), np.uint8)
    for c in range(3):  # channel by channel keeps the float temporaries at one plane each
        plane = _EOSIN[c] + (_HEMATOXYLIN[c] - _EOSIN[c]) * stain
        plane[nuclei] = _NUCLEUS[c]
        plane += 9.0 * texture
        plane = np.where(mask, plane, _BACKGROUND[c] + 1.5 * texture)
        image[..., c] = np.clip(np.rint(plane), 0, 255)
    return image, mask


def pyramid(image: np.ndarray, levels: Sequence[int]) -> list[np.ndarray]:
    """Levels of `image` at the given integer downsamples (first must be 1), by rounded block means."""
    out = []
    for factor in levels:
        if factor == 1:
            out.append(image)
            continue
        h, w = image.shape[0] // factor, image.shape[1] // factor
        # Two one-axis sums are much faster than one sum over a 5-D view.
        rows = image[: h * factor, : w * factor].reshape(h, factor, w * factor, 3).sum(axis=1, dtype=np.uint32)
        total = rows.reshape(h, w, factor, 3).sum(axis=2, dtype=np.uint32)
        area = factor * factor
        out.append(((total + area // 2) // area).astype(np.uint8))
    return out


def _iter_tiles(image: np.ndarray, tile: int) -> Iterator[np.ndarray]:
    """Row-major full-size tiles; edge tiles padded with the background colour."""
    h, w = image.shape[:2]
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            block = np.full((tile, tile, 3), _BACKGROUND.astype(np.uint8))
            part = image[y : y + tile, x : x + tile]
            block[: part.shape[0], : part.shape[1]] = part
            yield block


def _jpeg2000(tile: np.ndarray, quality: int) -> bytes:
    import imagecodecs

    # J2K codestream, irreversible with a quality-driven PSNR target: small tiles, visually lossless.
    return bytes(imagecodecs.jpeg2k_encode(tile, level=max(30, quality // 2), codecformat="J2K", reversible=False))


def _level_kwargs(image: np.ndarray, tile: int, compression: Compression, quality: int) -> dict:
    """tifffile `write` arguments for one tiled level."""
    base: dict = {"tile": (tile, tile), "metadata": None, "photometric": "rgb"}
    # Pre-encoded tiles: tifffile writes them as they are, so it must be told the image's shape.
    encoded = base | {"shape": image.shape, "dtype": np.uint8}
    if compression == "jpeg_rgb":
        # tifffile tags JPEG+RGB as YCbCr unless told the stream's colour space is RGB (the tiles are pre-encoded).
        return encoded | {"data": (aperio_jpeg(t, quality) for t in _iter_tiles(image, tile)), "compression": 7,
                          "subsampling": (1, 1), "compressionargs": {"outcolorspace": "RGB"}}
    if compression == "jpeg2000":
        return encoded | {"data": (_jpeg2000(t, quality) for t in _iter_tiles(image, tile)),
                          "compression": _APERIO_JP2K_RGB}
    if compression == "jpeg_ycbcr":
        # tifffile converts RGB input to YCbCr with 2x2 chroma subsampling and tags it YCbCr.
        return base | {"data": image, "compression": "jpeg", "compressionargs": {"level": quality}}
    return base | {"data": image, "compression": "zlib", "predictor": True}


def _description(shape: tuple[int, ...], tile: int, codec: str, quality: int, mpp: float | None,
                 power: int | None) -> str:
    h, w = shape[:2]
    fields = [f"Aperio Image Library v12.0.15 \r\n{w}x{h} [0,0 {w}x{h}] ({tile}x{tile}) {codec} Q={quality}"]
    if power is not None:
        fields.append(f"AppMag = {power}")
    if mpp is not None:
        fields.append(f"MPP = {mpp:.4f}")
    fields.append("Filename = synthetic")
    return "|".join(fields)


_CODEC_NAMES = {"jpeg_rgb": "JPEG/RGB", "jpeg_ycbcr": "JPEG/YCC", "jpeg2000": "J2K/KDU", "deflate": "Deflate"}


def write_synthetic_slide(path: Path, *, width: int = 4096, height: int = 3072, tile: int = 256,
                          levels: Sequence[int] = (1, 4, 16), mpp: float | None = 0.25,
                          objective_power: int | None = 40, compression: Compression = "jpeg_rgb", seed: int = 0,
                          tissue: Tissue = "blobs", quality: int = 90) -> Path:
    """Write a tiled pyramidal SVS-like TIFF with drawn tissue.

    Args:
        path: the file to write (a `.svs` suffix makes every reader treat it as Aperio).
        width, height: level-0 size in pixels.
        tile: tile edge (a multiple of 16).
        levels: integer downsample of each level, starting with 1.
        mpp: µm/px written as Aperio `MPP` (None: no mpp in the file).
        objective_power: written as Aperio `AppMag` (None: no objective power).
        compression: tile compression (module doc).
        seed: makes the drawing deterministic.
        tissue: "blobs", "none" or "full".
        quality: JPEG quality.

    Returns:
        `path`.
    """
    import tifffile

    if not levels or levels[0] != 1 or tile % 16:
        raise ValueError("levels must start with 1 and tile must be a multiple of 16")
    image, _ = draw_tissue(width, height, seed=seed, tissue=tissue)
    images = pyramid(image, levels)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    description = _description(image.shape, tile, _CODEC_NAMES[compression], quality, mpp, objective_power)
    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        tif.write(**_level_kwargs(images[0], tile, compression, quality), description=description, subfiletype=0)
        # Page 1 is the thumbnail in the Aperio layout (readers treat the 2nd directory so): stripped, uncompressed.
        thumb = pyramid(image, [max(1, max(width, height) // 256)])[0] if max(width, height) > 256 else image
        tif.write(thumb, photometric="rgb", metadata=None, description=description.split("|")[0] + " -> thumbnail")
        # Aperio levels are plain (NewSubfileType 0) pages: a "reduced" flag would end the level list for tifffile.
        for level_image in images[1:]:
            tif.write(**_level_kwargs(level_image, tile, compression, quality), description=description, subfiletype=0)
    return path


def write_sample_slide(path: Path) -> Path:
    """A small 4096×3072 slide at 40×, 0.25 µm/px, JPEG RGB tiles, levels 1/4/16: the README's sample input."""
    return write_synthetic_slide(path, width=4096, height=3072, mpp=0.25, objective_power=40, seed=0)


def write_image(path: Path, *, width: int = 1024, height: int = 768, seed: int = 0, tissue: Tissue = "blobs",
                quality: int = 90) -> Path:
    """A flat image (format from the suffix: .png, .jpg, ...) with drawn tissue; its mpp must come from a CSV."""
    from PIL import Image

    image, _ = draw_tissue(width, height, seed=seed, tissue=tissue)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    options: dict[str, Any] = {"quality": quality} if path.suffix.lower() in {".jpg", ".jpeg", ".webp"} else {}
    Image.fromarray(image).save(path, **options)
    return path
