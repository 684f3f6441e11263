"""OpenSlide backend (openslide-bin wheel): MRXS, VMS/VMU, DICOM, BIFF, and the fallback for TIFFs tiffslide refuses.

OpenSlide handles are thread-safe. Pixels are `read_region(...).convert("RGB")`: alpha dropped, so transparent
and outside-the-slide pixels are black, as upstream.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .metadata import normalize_properties
from .slide_base import BaseSlideHandle


class OpenSlideHandle(BaseSlideHandle):
    """A slide read with OpenSlide. For a DICOM series, `path` is any file of it (OpenSlide finds the rest)."""

    backend = "openslide"

    def __init__(
        self, path: Path, mpp_override: float | None, name: str, display_path: Path | None = None
    ) -> None:
        super().__init__(display_path or path, name)
        import openslide

        self._adopt(lambda: openslide.OpenSlide(str(path)), "openslide", mpp_override)

    def _properties(self) -> dict[str, str]:
        return normalize_properties(dict(self._slide.properties))

    def _read(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        return np.asarray(self._slide.read_region((x, y), level, (width, height)).convert("RGB"))
