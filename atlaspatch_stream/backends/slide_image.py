"""Pillow backend for flat images (png, jpg, jpeg, bmp, webp, gif): one level, mpp from `--mpp-csv` required.

As upstream, the whole image is decoded into memory (and Pillow's decompression-bomb limit applies), but only on
the first read, so an opened-but-waiting slide costs no pixel memory.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from ..errors import SlideError, describe
from .metadata import ResolvedMetadata, magnification_from_mpp, validate_override
from .slide_base import BaseSlideHandle, NotRGBError, make_info

# Modes whose `.convert("RGB")` is what upstream feeds on; 16/32-bit and float modes are refused.
_ACCEPTED_MODES = {"RGB", "RGBA", "RGBX", "P", "PA", "L", "LA", "1", "CMYK", "YCbCr"}


class ImageHandle(BaseSlideHandle):
    """A flat image as a one-level slide."""

    backend = "pillow"

    def __init__(self, path: Path, mpp_override: float | None, name: str) -> None:
        super().__init__(path, name)
        if mpp_override is None:
            raise SlideError("mpp is required for standard images: give it with --mpp-csv", slide=name,
                             kind="no_magnification")
        try:
            mpp = validate_override(mpp_override)
        except ValueError as exc:
            raise SlideError(str(exc), slide=name) from exc
        size, mode = self._probe()
        if mode not in _ACCEPTED_MODES:
            raise NotRGBError(f"not an 8-bit RGB image: Pillow mode {mode}", slide=name)
        meta = ResolvedMetadata(mpp=mpp, magnification=magnification_from_mpp(mpp), mpp_source="mpp-csv")
        self.info = make_info(self.path, self.backend, (size,), (1.0,), meta)
        self._pixels: np.ndarray | None = None
        self._lock = threading.Lock()

    def _probe(self) -> tuple[tuple[int, int], str]:
        from PIL import Image

        try:
            with Image.open(self.path) as image:
                return (int(image.width), int(image.height)), str(image.mode)
        except Exception as exc:  # noqa: BLE001 - translated at the backend edge
            raise SlideError(f"Pillow cannot open the image: {describe(exc)}", slide=self.name) from exc

    def pixels(self) -> np.ndarray:
        """The whole image, RGB uint8 (decoded once, on first use)."""
        with self._lock:
            if self._pixels is None:
                from PIL import Image

                with Image.open(self.path) as image:
                    self._pixels = np.asarray(image.convert("RGB"))
            return self._pixels

    def _read(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        pixels = self.pixels()
        out = np.zeros((height, width, 3), np.uint8)
        x0, y0 = max(0, x), max(0, y)
        x1, y1 = min(pixels.shape[1], x + width), min(pixels.shape[0], y + height)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = pixels[y0:y1, x0:x1]
        return out

    def overlay_thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """A LANCZOS thumbnail of the whole image (upstream's `ImageWSI.get_thumb`)."""
        from PIL import Image

        try:
            image = Image.fromarray(self.pixels())
            image.thumbnail((max_size, max_size), Image.Resampling.LANCZOS)
        except Exception as exc:  # noqa: BLE001
            raise SlideError(f"cannot build the overlay thumbnail: {describe(exc)}", slide=self.name) from exc
        return np.asarray(image)

    def close(self) -> None:
        """Drop the decoded pixels."""
        with self._lock:
            self._pixels = None
