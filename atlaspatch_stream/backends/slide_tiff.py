"""tiffslide backend for the TIFF family (svs, tif/tiff, ndpi, scn, bif).

tiffslide keeps one zarr group per thread, so concurrent `read_region` calls on one handle are safe without a lock.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .metadata import normalize_properties
from .slide_base import BaseSlideHandle, NotRGBError

_RGB_PHOTOMETRICS = {"RGB", "YCBCR"}


def _check_rgb(slide: object, name: str) -> None:
    """Refuse what tiffslide sees as anything but 8-bit RGB at level 0 (channels as planes, grey, 16-bit...)."""
    props = slide.properties  # type: ignore[attr-defined]
    series = slide.ts_tifffile.series[props["tiffslide.series-index"]]  # type: ignore[attr-defined]
    page = series.levels[0].keyframe
    axes = str(props.get("tiffslide.series-axes", series.axes))
    problems = [] if axes == "YXS" else [f"axes {axes} (channels as planes: multiplex or grey)"]
    problems += _page_problems(page)
    if np.dtype(page.dtype) != np.uint8:
        problems.append(f"{np.dtype(page.dtype)} pixels")
    if problems:
        raise NotRGBError(f"not an 8-bit RGB image: {', '.join(problems)}", slide=name)


def _page_problems(page: object) -> list[str]:
    photometric = getattr(page.photometric, "name", str(page.photometric))  # type: ignore[attr-defined]
    samples = int(page.samplesperpixel)  # type: ignore[attr-defined]
    bits = page.bitspersample  # type: ignore[attr-defined]
    problems = []
    if samples != 3:
        problems.append(f"{samples} samples per pixel")
    if bits != 8:
        problems.append(f"{bits} bits per sample")
    if photometric not in _RGB_PHOTOMETRICS:
        problems.append(f"photometric {photometric}")
    return problems


def check_tiff_rgb(path: Path, name: str) -> None:
    """Refuse a TIFF whose first image is not 8-bit 3-sample RGB/YCbCr, before any backend (or fallback) opens it.

    Files tifffile cannot parse pass through: the slide libraries then report their own error.
    """
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            problems = _page_problems(tif.pages.first)
    except Exception:  # noqa: BLE001 - not ours to judge: the backends will say what is wrong
        return
    if problems:
        raise NotRGBError(f"not an 8-bit RGB image: {', '.join(problems)}", slide=name)


class TiffSlideHandle(BaseSlideHandle):
    """A TIFF-family slide read with tiffslide; `.tiff_path` serves tile readers."""

    backend = "tiffslide"

    def __init__(self, path: Path, mpp_override: float | None, name: str) -> None:
        super().__init__(path, name)
        self.tiff_path = self.path
        import tiffslide

        self._adopt(lambda: tiffslide.TiffSlide(str(path)), "tiffslide", mpp_override)

    def _properties(self) -> dict[str, str]:
        _check_rgb(self._slide, self.name)
        props = normalize_properties(self._slide.properties)
        # OpenSlide names a plain tiled TIFF "generic-tiff"; tiffslide leaves it empty. Match upstream's value.
        props.setdefault("openslide.vendor", "generic-tiff")
        return props

    def _read(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        return np.asarray(self._slide.read_region((x, y), level, (width, height), as_array=True))
