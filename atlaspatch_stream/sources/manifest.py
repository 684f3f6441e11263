"""The `encode-patient` manifest: a CSV of `case_id`, `slide_path` and optionally `mpp`, with upstream 1.1's rules.

Slide paths are resolved against the CSV's folder. Each of these is an error before any slide is opened: a missing
column or file, an empty case id (or `.`, `..`, or one with a path separator), one slide twice in a case, one slide
with two different mpp values, and two different files with one stem (their H5s would collide).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from .discover import stem_for


@dataclass(frozen=True)
class Manifest:
    """Cases in manifest order, each with its slides in manifest order, and the mpp given per slide."""

    path: Path
    cases: dict[str, tuple[Path, ...]]
    mpp: dict[Path, float]

    def slides(self) -> list[Path]:
        """Every distinct slide, in first-mention order."""
        return list(dict.fromkeys(p for paths in self.cases.values() for p in paths))


def read_manifest(path: Path) -> Manifest:
    """Read and check a manifest.

    Raises:
        ConfigError: one line naming the manifest row and the rule it breaks.
    """
    path = Path(os.path.abspath(path))
    cases: dict[str, list[Path]] = {}
    mpp: dict[Path, float] = {}
    stems: dict[str, Path] = {}
    for line, row in _rows(path):
        where = f"{path.name} line {line}"
        case_id = _case_id(row.get("case_id"), where)
        slide = _slide(row.get("slide_path"), path.parent, where)
        if slide in cases.setdefault(case_id, []):
            raise ConfigError(f"{where}: slide {slide} is listed twice for case {case_id!r}")
        cases[case_id].append(slide)
        _record_mpp(mpp, slide, row.get("mpp"), where)
        first = stems.setdefault(stem_for(slide), slide)
        if first != slide:
            raise ConfigError(f"{where}: {slide} and {first} share the stem {stem_for(slide)!r} (their H5s would "
                              f"collide); rename one")
    if not cases:
        raise ConfigError(f"manifest {path} lists no slides")
    return Manifest(path, {k: tuple(v) for k, v in cases.items()}, mpp)


def _rows(path: Path) -> list[tuple[int, dict[str, str]]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            missing = {"case_id", "slide_path"} - set(reader.fieldnames or ())
            if missing:
                raise ConfigError(f"manifest {path} lacks the column(s) {', '.join(sorted(missing))} "
                                  f"(needs case_id, slide_path and optionally mpp)")
            return [(i + 2, {k: (v or "").strip() for k, v in row.items() if k}) for i, row in enumerate(reader)]
    except OSError as exc:
        raise ConfigError(f"cannot read manifest {path}: {exc.strerror or exc}") from exc


def _case_id(value: str | None, where: str) -> str:
    case_id = value or ""
    bad = not case_id or case_id in (".", "..") or any(sep in case_id for sep in ("/", "\\", os.sep))
    if bad:
        raise ConfigError(f"{where}: case id {case_id!r} cannot name a file (empty, '.', '..' or a path separator)")
    return case_id


def _slide(value: str | None, folder: Path, where: str) -> Path:
    if not value:
        raise ConfigError(f"{where}: empty slide_path")
    slide = Path(os.path.abspath(folder / value))  # normalised, symbolic links kept (their names are the stems)
    if not slide.exists():
        raise ConfigError(f"{where}: slide {value} not found (resolved to {slide})")
    return slide


def _record_mpp(mpp: dict[Path, float], slide: Path, value: str | None, where: str) -> None:
    if not value:
        return
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{where}: mpp {value!r} is not a number") from None
    if number <= 0:
        raise ConfigError(f"{where}: mpp {value!r} must be > 0")
    if mpp.setdefault(slide, number) != number:
        raise ConfigError(f"{where}: slide {slide} is given two mpp values ({mpp[slide]} and {number})")
