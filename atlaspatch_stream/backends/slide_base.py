"""The shared slide-handle base (`BaseSlideHandle`), `SlideInfo` construction and the bounded-memory thumbnail.

The thumbnail is upstream's segmentation input (§3.2 steps 1-6). When the chosen pyramid level fits in the memory
budget it is read whole, exactly as upstream does, and the result is bit-identical. Otherwise the level is read in
row strips and reduced strip by strip:

- integer level→thumbnail factors in both axes: cv2's INTER_AREA is then a block mean over whole blocks, so resizing
  strips whose height is a multiple of the vertical factor gives bit-identical pixels (same cv2 code path);
- other factors: the same area-weighted mean (INTER_AREA's definition), horizontally by cv2 on float32 strips and
  vertically by explicit overlap weights, rounded once at the end; pixels may differ from the whole-level path by
  one grey level where float rounding falls differently (the closest possible without holding the level).

The backends (`slide_tiff`, `slide_openslide`, `slide_image`) build on it; `slides.open_slide` picks among them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SlideError, describe
from ..geometry import optimal_level
from ..items import SlideInfo
from .metadata import ResolvedMetadata, resolve_metadata

_MB = 1 << 20


class NotRGBError(SlideError):
    """The image is not 8-bit RGB (multiplex, grey, 16-bit...): refused, never retried with another backend."""


def level0_row(row: int, downsample: float) -> int:
    """The smallest level-0 y whose `int(y / ds)` is `row`: how the libraries map level-0 to level coordinates."""
    y = math.ceil(row * downsample)
    while y > 0 and int((y - 1) / downsample) >= row:
        y -= 1
    while int(y / downsample) < row:
        y += 1
    return y


def upstream_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Step 5: cv2 INTER_AREA when shrinking in either dimension, else INTER_CUBIC; `size` is (w, h)."""
    import cv2

    h, w = image.shape[:2]
    shrinking = size[0] < w or size[1] < h
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)


def pil_thumbnail(image: np.ndarray, max_size: int) -> np.ndarray:
    """Step 6: PIL `Image.thumbnail((max, max))` with its defaults (BICUBIC, reducing_gap 2.0)."""
    from PIL import Image

    pil = Image.fromarray(image)
    pil.thumbnail((max_size, max_size), resample=Image.Resampling.BICUBIC, reducing_gap=2.0)
    return np.asarray(pil.convert("RGB"))


def _vertical_weights(rows: np.ndarray, scale: float, out_rows: int) -> tuple[np.ndarray, ...]:
    """For source rows `rows`, the output row each overlaps first/second and the overlap fractions (÷ scale)."""
    first = np.minimum((rows / scale).astype(np.int64), out_rows - 1)
    boundary = (first + 1) * scale
    w_first = np.clip(np.minimum(rows + 1.0, boundary) - rows, 0.0, 1.0)
    second = np.minimum(first + 1, out_rows - 1)
    w_second = np.where(second > first, 1.0 - w_first, 0.0)
    return first, w_first / scale, second, w_second / scale


class BaseSlideHandle:
    """What every slide backend shares: identity, error translation and the thumbnail algorithm.

    Subclasses set `info`, `backend` and implement `_read` (RGB uint8, no error translation) and `close`.
    """

    backend: str = ""
    info: SlideInfo
    tiff_path: Path | None = None

    def __init__(self, path: Path, name: str) -> None:
        self.path = Path(path)
        self.name = name

    def _adopt(self, open_library: Callable[[], Any], library: str, mpp_override: float | None) -> None:
        """Open the library's handle (errors translated) and read its metadata; close it again if that fails."""
        try:
            self._slide = open_library()
        except Exception as exc:  # noqa: BLE001 - translated at the backend edge
            raise SlideError(f"{library} cannot open the file: {describe(exc)}", slide=self.name) from exc
        try:
            self._setup(mpp_override)
        except BaseException:
            self._slide.close()
            raise

    def _setup(self, mpp_override: float | None) -> None:
        """Set `info` from the library's level geometry and `_properties()` (errors become one SlideError)."""
        try:
            meta = resolve_metadata(self._properties(), mpp_override)
            dims = tuple(self._slide.level_dimensions)
            downsamples = tuple(self._slide.level_downsamples)
        except SlideError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise SlideError(f"cannot read slide metadata: {describe(exc)}", slide=self.name) from exc
        self.info = make_info(self.path, self.backend, dims, downsamples, meta)

    def _properties(self) -> dict[str, str]:
        """The library's slide properties, `metadata.normalize_properties`d."""
        raise NotImplementedError

    def overlay_thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """The library's own `get_thumbnail` (best level, white background), what upstream draws overlays on."""
        try:
            image = self._slide.get_thumbnail((max_size, max_size))
        except Exception as exc:  # noqa: BLE001
            raise SlideError(f"cannot build the overlay thumbnail: {describe(exc)}", slide=self.name) from exc
        return np.asarray(image.convert("RGB"))

    def close(self) -> None:
        """Close the library's handle."""
        self._slide.close()

    # -- reading ---------------------------------------------------------------------------------------------
    def _read(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        raise NotImplementedError

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 (height, width, 3) of the region at level-0 (x, y) on `level`; outside the slide is black.

        Raises:
            SlideError: bad level or size, or the library failed (corrupt tile, unsupported compression).
        """
        if not 0 <= level < len(self.info.level_dimensions):
            raise SlideError(
                f"level {level} does not exist (slide has {len(self.info.level_dimensions)})", slide=self.name
            )
        if width <= 0 or height <= 0:
            raise SlideError(f"region size must be positive, got {width}x{height}", slide=self.name)
        try:
            region = self._read(int(x), int(y), int(level), int(width), int(height))
        except SlideError:
            raise
        except Exception as exc:  # noqa: BLE001 - foreign errors are translated at the backend edge
            raise SlideError(
                f"cannot read region ({x}, {y}) level {level} size {width}x{height}: {describe(exc)}",
                slide=self.name,
            ) from exc
        return np.ascontiguousarray(region)

    def _read_rows(self, level: int, row0: int, row1: int, width: int) -> np.ndarray:
        """Level rows [row0, row1) and columns [0, width) of `level`, black outside."""
        y = level0_row(row0, self.info.level_downsamples[level])
        return self.read_region(0, y, level, width, row1 - row0)

    # -- thumbnails ------------------------------------------------------------------------------------------
    def thumbnail(self, power: float, max_size: int, budget_mb: int) -> np.ndarray:
        """Upstream's segmentation thumbnail (§3.2 steps 1-6): RGB uint8, at most `max_size` on its long side.

        Args:
            power: the thumbnail magnification (1.25 upstream).
            max_size: the PIL thumbnail bound (1024 upstream).
            budget_mb: the largest level read in one piece; larger levels are read in strips (module doc).

        Raises:
            SlideError: magnification unknown, or the read failed.
        """
        magnification = self.info.magnification
        if magnification is None:
            raise SlideError("WSI base magnification is unknown (no objective power or mpp in its metadata); "
                             "give its mpp with --mpp-csv", slide=self.name, kind="no_magnification")
        target_ds = magnification / power
        level = optimal_level(self.info.level_downsamples, target_ds)
        level_ds = self.info.level_downsamples[level]
        w0, h0 = self.info.width, self.info.height
        level_size = (max(1, round(w0 / level_ds)), max(1, round(h0 / level_ds)))
        # max(1, ...): upstream would crash on a slide smaller than one thumbnail pixel; we keep one pixel.
        target = (max(1, round(w0 / target_ds)), max(1, round(h0 / target_ds)))
        resized = self._level_resized(level, level_size, target, budget_mb * _MB)
        return pil_thumbnail(resized, max_size)

    def _level_resized(
        self, level: int, size: tuple[int, int], target: tuple[int, int], budget: int
    ) -> np.ndarray:
        """Steps 4-5: the level (`size`) resized to `target`, whole when it fits in `budget` bytes, else in strips."""
        lw, lh = size
        tw, th = target
        if lw * lh * 3 <= budget or tw > lw or th > lh:
            # Upscaling only happens on levels smaller than the thumbnail, which always fit.
            return upstream_resize(self.read_region(0, 0, level, lw, lh), target)
        if lw % tw == 0 and lh % th == 0:
            return self._strips_exact(level, size, target, budget)
        return self._strips_area(level, size, target, budget)

    def _strips_exact(
        self, level: int, size: tuple[int, int], target: tuple[int, int], budget: int
    ) -> np.ndarray:
        """Integer factors: INTER_AREA on strips of whole blocks equals INTER_AREA on the whole level."""
        import cv2

        lw, lh = size
        tw, th = target
        factor = lh // th
        rows = max(factor, (budget // (lw * 3)) // factor * factor)
        out = np.empty((th, tw, 3), np.uint8)
        for row0 in range(0, lh, rows):
            row1 = min(lh, row0 + rows)
            strip = self._read_rows(level, row0, row1, lw)
            out[row0 // factor : row1 // factor] = cv2.resize(
                strip, (tw, (row1 - row0) // factor), interpolation=cv2.INTER_AREA
            )
        return out

    def _strips_area(
        self, level: int, size: tuple[int, int], target: tuple[int, int], budget: int
    ) -> np.ndarray:
        """Non-integer factors: area-weighted mean, horizontal by cv2 (float32), vertical by overlap weights."""
        import cv2

        lw, lh = size
        tw, th = target
        scale = lh / th
        rows = max(1, budget // (lw * 3 * 5))  # uint8 strip + its float32 copy
        acc = np.zeros((th, tw, 3), np.float64)
        for row0 in range(0, lh, rows):
            row1 = min(lh, row0 + rows)
            strip = self._read_rows(level, row0, row1, lw).astype(np.float32)
            horizontal = cv2.resize(strip, (tw, row1 - row0), interpolation=cv2.INTER_AREA).astype(np.float64)
            first, w_first, second, w_second = _vertical_weights(
                np.arange(row0, row1, dtype=np.float64), scale, th
            )
            np.add.at(acc, first, horizontal * w_first[:, None, None])
            np.add.at(acc, second, horizontal * w_second[:, None, None])
        return np.clip(np.rint(acc), 0, 255).astype(np.uint8)

    def __enter__(self) -> BaseSlideHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.backend} {self.path}>"


def make_info(
    path: Path,
    backend: str,
    dimensions: tuple[tuple[int, int], ...],
    downsamples: tuple[float, ...],
    meta: ResolvedMetadata,
) -> SlideInfo:
    """A `SlideInfo` from level geometry and resolved metadata."""
    return SlideInfo(
        path=str(path),
        backend=backend,
        width=int(dimensions[0][0]),
        height=int(dimensions[0][1]),
        level_dimensions=tuple((int(w), int(h)) for w, h in dimensions),
        level_downsamples=tuple(float(d) for d in downsamples),
        mpp=meta.mpp,
        magnification=meta.magnification,
        vendor=meta.vendor,
        institution=meta.institution,
        stain=meta.stain,
    )
