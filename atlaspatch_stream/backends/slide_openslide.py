"""OpenSlide backend (openslide-bin wheel): MRXS, VMS/VMU, DICOM, BIFF, and the fallback for TIFFs tiffslide refuses.

OpenSlide handles are thread-safe. Pixels are `read_region(...).convert("RGB")`: alpha dropped, so transparent
and outside-the-slide pixels are black, as upstream.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import SlideError, describe
from .metadata import normalize_properties, resolve_metadata
from .slide_base import BaseSlideHandle, make_info


class OpenSlideHandle(BaseSlideHandle):
    """A slide read with OpenSlide. For a DICOM series, `path` is any file of it (OpenSlide finds the rest)."""

    backend = "openslide"

    def __init__(
        self, path: Path, mpp_override: float | None, name: str, display_path: Path | None = None
    ) -> None:
        super().__init__(display_path or path, name)
        import openslide

        self.file = Path(path)
        self._adopt(lambda: openslide.OpenSlide(str(path)), "openslide", mpp_override)

    def _setup(self, mpp_override: float | None) -> None:
        try:
            props = normalize_properties(dict(self._slide.properties))
            meta = resolve_metadata(props, mpp_override)
            dims = tuple(self._slide.level_dimensions)
            downsamples = tuple(self._slide.level_downsamples)
        except Exception as exc:  # noqa: BLE001
            raise SlideError(f"cannot read slide metadata: {describe(exc)}", slide=self.name) from exc
        self.properties = props
        self.info = make_info(self.path, self.backend, dims, downsamples, meta)

    def _read(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        return np.asarray(self._slide.read_region((x, y), level, (width, height)).convert("RGB"))
