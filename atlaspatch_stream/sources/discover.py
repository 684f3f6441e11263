"""Input discovery (upstream §1.5) and the `--mpp-csv` table (§7.3).

Deliberate improvements over upstream: extensions match case-insensitively (`.Svs` is found), and the DICOM files
of one folder are one slide. A DICOM series is represented by **its folder**: the folder is the discovered entry,
`open_slide` opens it through the folder's first `.dcm` file, and `stem_for` gives the folder name, so outputs are
named after the series rather than after one of its files.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

from ..errors import ConfigError, NotASlideError
from ..formats import DICOM_EXTENSIONS, SUPPORTED_EXTENSIONS
from ..items import SlideJob

log = logging.getLogger(__name__)


def _entry(path: Path) -> Path:
    """The slide a supported file belongs to: its folder for DICOM, itself otherwise."""
    return path.parent if path.suffix.lower() in DICOM_EXTENSIONS else path


def discover_slides(path: Path, recursive: bool) -> list[Path]:
    """The slides under `path`.

    Args:
        path: a slide file (returned as is, whatever its suffix: opening reports unsupported ones) or a folder.
        recursive: also search sub-folders.

    Returns:
        Sorted, de-duplicated paths; every DICOM series folder appears once, as the folder.

    Raises:
        ConfigError: `path` does not exist, or a folder holds no supported file.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ConfigError(f"Input path does not exist: {path}")
    candidates = path.rglob("*") if recursive else path.glob("*")
    found = {_entry(p) for p in candidates if p.suffix.lower() in SUPPORTED_EXTENSIONS and p.is_file()}
    if not found:
        hint = "; it holds sub-folders: use --recursive to search them" if not recursive and any(
            p.is_dir() for p in path.iterdir()) else ""
        raise ConfigError(f"No WSI files found in {path}{hint}")
    return sorted(found)


def slide_job(path: Path, slide_id: int, mpp: dict[str, float] | None = None, *, check: bool = True) -> SlideJob:
    """The job for one slide path (a file, or a DICOM series folder), with its `--mpp-csv` entry.

    Raises:
        NotASlideError: with `check`, when the path does not exist or is not a slide format we read.
    """
    path = Path(path)
    if check:
        _check_slide(path)
    return SlideJob(slide_id, path, stem_for(path), mpp_for(path, mpp), display=str(path))


def _check_slide(path: Path) -> None:
    if path.is_dir():
        if not any(p.suffix.lower() in DICOM_EXTENSIONS for p in path.iterdir()):
            raise NotASlideError(f"{path}: a folder without DICOM (.dcm) files is not a slide")
    elif not path.is_file():
        raise NotASlideError(f"{path}: no such file")
    elif path.suffix.lower() not in SUPPORTED_EXTENSIONS:
        raise NotASlideError(f"{path}: {path.suffix or 'no extension'} is not a slide format we read")


def stem_for(path: Path) -> str:
    """The output name of a slide: `Path.stem`, or the folder name for a DICOM series folder."""
    path = Path(path)
    return path.name if path.is_dir() else path.stem


def _parse_mpp(text: str | None) -> float | None:
    try:
        value = float((text or "").strip())
    except ValueError:
        return None
    return value if math.isfinite(value) and value > 0 else None


def load_mpp_csv(path: Path) -> dict[str, float]:
    """Read a `wsi,mpp` CSV into {slide stem: mpp}.

    The header must contain the exact (case-sensitive) names `wsi` and `mpp`. Rows with an empty name, a
    non-numeric or non-positive mpp are skipped with a warning. `wsi` may be a bare name or a path; its stem is the key.

    Raises:
        ConfigError: unreadable file, missing header names, or no valid row.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            fields = reader.fieldnames or []
            if "wsi" not in fields or "mpp" not in fields:
                raise ConfigError(f"{path}: the mpp CSV needs the header columns 'wsi' and 'mpp', found {fields}")
            table = _rows_to_table(reader, path)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"cannot read mpp CSV {path}: {exc}") from exc
    if not table:
        raise ConfigError(f"{path}: no valid rows (need a slide name and a positive mpp)")
    return table


def _rows_to_table(reader: csv.DictReader, path: Path) -> dict[str, float]:
    table: dict[str, float] = {}
    for line, row in enumerate(reader, start=2):
        name = (row.get("wsi") or "").strip()
        mpp = _parse_mpp(row.get("mpp"))
        if not name or mpp is None:
            log.warning("%s line %d: skipped (wsi=%r, mpp=%r)", path, line, row.get("wsi"), row.get("mpp"))
            continue
        table[Path(name).stem] = mpp  # as upstream: a bare name or a full path; the extension is ignored
    return table


def mpp_for(path: Path, table: dict[str, float] | None) -> float | None:
    """The CSV mpp of the slide at `path` (matched by `stem_for`), or None."""
    return table.get(stem_for(path)) if table else None
