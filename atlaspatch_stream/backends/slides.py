"""Slide access: the entry point `open_slide`, which picks the backend a slide's extension calls for.

Backends: tiffslide for the TIFF family (`slide_tiff.py`), OpenSlide for MRXS/VMS/DICOM and as the fallback when
tiffslide cannot open a TIFF (`slide_openslide.py`), Pillow for flat images (`slide_image.py`); what they share
(`BaseSlideHandle`, the bounded-memory thumbnail) is in `slide_base.py`. Third-party modules are imported lazily,
inside the backends' functions, so importing this module stays light.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import SlideError
from ..formats import DICOM_EXTENSIONS, IMAGE_EXTENSIONS, OPENSLIDE_EXTENSIONS, TIFF_EXTENSIONS
from .slide_base import NotRGBError
from .slide_image import ImageHandle
from .slide_openslide import OpenSlideHandle
from .slide_tiff import TiffSlideHandle, check_tiff_rgb

if TYPE_CHECKING:
    from ..protocols import SlideHandle


def dicom_entry_file(folder: Path) -> Path | None:
    """The first DICOM file (sorted by name, extension case-insensitive) in `folder`, or None."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in DICOM_EXTENSIONS)
    return files[0] if files else None


def _open_tiff_family(path: Path, mpp_override: float | None, name: str) -> SlideHandle:
    check_tiff_rgb(path, name)
    try:
        return TiffSlideHandle(path, mpp_override, name)
    except NotRGBError:
        raise
    except SlideError as tiff_error:
        try:
            return OpenSlideHandle(path, mpp_override, name)
        except NotRGBError:
            raise
        except SlideError as os_error:
            message = f"{tiff_error.args[0]}; openslide fallback: {os_error.args[0]}"
            raise SlideError(message, slide=name) from tiff_error


# NDPI: OpenSlide exposes the scaled levels that upstream's level choice and thumbnail use (tiffslide sees fewer), and
# its 8-pixel JPEG stripes do not fit tile-once reading anyway.
OPENSLIDE_FIRST = frozenset({".ndpi"})


def _open_openslide_first(path: Path, mpp_override: float | None, name: str) -> SlideHandle:
    try:
        return OpenSlideHandle(path, mpp_override, name)
    except NotRGBError:
        raise
    except SlideError:
        return _open_tiff_family(path, mpp_override, name)


def open_slide(path: Path, mpp_override: float | None = None, name: str | None = None) -> SlideHandle:
    """Open a slide with the backend its extension calls for.

    Args:
        path: a slide file, or a folder holding one DICOM series.
        mpp_override: the `--mpp-csv` value; decides mpp and magnification (required for flat images).
        name: the name used in error messages (defaults to the path).

    Returns:
        An object implementing `atlaspatch_stream.protocols.SlideHandle`, with `.path`, `.backend`, `.tiff_path`.

    Raises:
        SlideError: missing file, unsupported extension, unreadable or non-RGB image, implausible CSV mpp.
    """
    path = Path(path)
    label = name or str(path)
    if path.is_dir():
        entry = dicom_entry_file(path)
        if entry is None:
            raise SlideError(f"folder {path} holds no DICOM (.dcm) files", slide=label)
        return OpenSlideHandle(entry, mpp_override, label, display_path=path)
    if not path.is_file():
        raise SlideError(f"file not found: {path}", slide=label)
    suffix = path.suffix.lower()
    if suffix in OPENSLIDE_FIRST:
        return _open_openslide_first(path, mpp_override, label)
    if suffix in TIFF_EXTENSIONS:
        return _open_tiff_family(path, mpp_override, label)
    if suffix in OPENSLIDE_EXTENSIONS:
        return OpenSlideHandle(path, mpp_override, label)
    if suffix in IMAGE_EXTENSIONS:
        return ImageHandle(path, mpp_override, label)
    raise SlideError(f"No backend found for extension {path.suffix!r}", slide=label)
