"""Reading an output H5 for `atlaspatch check`: read only, without HDF5 file locking, arrays in blocks.

`inspect_output` returns the first problem found as a reason code (see `qc.check`) with a one-line detail; a file
that does not open or read raises (OSError, KeyError, ...), which the caller reports as `corrupt`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .h5store import TMP_PREFIX as TMP_SET_PREFIX
from .h5store import _plain

REQUIRED_ATTRS = ("patch_size", "patch_size_level0", "level0_magnification", "target_magnification", "overlap",
                  "level0_width", "level0_height", "wsi_path", "filename")
_BLOCK_BYTES = 4 << 20  # features are scanned for NaN/Inf this many bytes at a time


@dataclass(frozen=True)
class Inspection:
    """What one H5 says: its root attributes, reason code ("ok" when none), detail and patch count."""

    attrs: dict[str, Any]
    code: str
    detail: str
    num_patches: int | None


def inspect_output(path: Path, patch_size: int | None, target_mag: int | None,
                   encoders: tuple[str, ...]) -> Inspection:
    """Check one H5's schema, completeness, geometry (when asked), coordinates, feature sets and their values."""
    with h5py.File(path, "r", locking=False) as f:
        opened = _Opened.read(f)
        code, detail, num = _content_verdict(opened, patch_size, target_mag, encoders)
    return Inspection(opened.attrs, code, detail, num)


@dataclass(frozen=True)
class _Opened:
    """An open H5's attributes and datasets, each looked up once (h5py lookups dominate on small files)."""

    attrs: dict[str, Any]
    coords: Any
    passports: Any
    sets: dict[str, Any]  # every features/ dataset, temporary ones included

    @classmethod
    def read(cls, f: Any) -> _Opened:
        group = f.get("features")
        sets = {n: group[n] for n in group} if group is not None and hasattr(group, "keys") else {}
        return cls({k: _plain(v) for k, v in f.attrs.items()}, f.get("coords"), f.get("passports"), sets)

    def final_sets(self) -> dict[str, Any]:
        """The feature sets under their final names."""
        return {n: ds for n, ds in self.sets.items() if not n.startswith(TMP_SET_PREFIX)}


def _content_verdict(f: _Opened, patch_size: int | None, target_mag: int | None,
                     encoders: tuple[str, ...]) -> tuple[str, str, int | None]:
    problem = _schema_problem(f)
    if problem:
        return "schema", problem, None
    num = int(f.attrs.get("num_patches", f.coords.shape[0]))
    checks: list[tuple[str, Any]] = [
        ("incomplete", lambda: _incomplete(f, num)),
        ("geometry_mismatch", lambda: _geometry(f.attrs, patch_size, target_mag)),
        ("coords_out_of_bounds", lambda: _out_of_bounds(f.coords, f.attrs)),
        ("missing_features", lambda: _missing(f, encoders)),
        ("nonfinite_features", lambda: _nonfinite(f)),
    ]
    for code, check in checks:
        detail = check()
        if detail:
            return code, detail, num
    return "ok", "", num


def _schema_problem(f: _Opened) -> str:
    missing = [k for k in REQUIRED_ATTRS if k not in f.attrs]
    if missing:
        return "missing attribute(s) " + ", ".join(missing)
    for name, ds in (("coords", f.coords), ("passports", f.passports)):
        if ds is None or not hasattr(ds, "dtype"):
            return f"missing dataset {name}"
    coords, passports = f.coords, f.passports
    if coords.dtype != np.int32 or coords.ndim != 2 or coords.shape[1] != 5:
        return f"coords is {coords.dtype} {coords.shape}, expected int32 (N, 5)"
    if passports.dtype.kind != "S" or passports.ndim != 1:
        return f"passports is {passports.dtype} {passports.shape}, expected fixed bytes (N,)"
    for name, ds in f.final_sets().items():
        if ds.dtype != np.float32 or ds.ndim != 2:
            return f"features/{name} is {ds.dtype} {ds.shape}, expected float32 (N, D)"
    return ""


def _incomplete(f: _Opened, num: int) -> str:
    rows, passports = f.coords.shape[0], f.passports.shape[0]
    if rows != num or passports != num:
        return f"coords has {rows} rows, passports {passports}, num_patches is {num}"
    for name, ds in f.sets.items():
        if name.startswith(TMP_SET_PREFIX):
            return f"features/{name} is a feature set still being written"
        if ds.shape[0] != num:
            return f"features/{name} has {ds.shape[0]} rows, num_patches is {num}"
    return ""


def _geometry(attrs: Mapping[str, Any], patch_size: int | None, target_mag: int | None) -> str:
    wanted = {"patch_size": patch_size, "target_magnification": target_mag}
    diffs = [f"{k}={attrs[k]} (expected {v})" for k, v in wanted.items() if v is not None and int(attrs[k]) != v]
    return "; ".join(diffs)


def _out_of_bounds(coords: Any, attrs: Mapping[str, Any]) -> str:
    width, height = int(attrs["level0_width"]), int(attrs["level0_height"])
    for start, block in _blocks(coords):
        bad = ((block[:, 0] < 0) | (block[:, 0] >= width) | (block[:, 1] < 0) | (block[:, 1] >= height)
               | (block[:, 2] <= 0) | (block[:, 3] <= 0) | (block[:, 4] < 0))
        if bad.any():
            row = start + int(np.argmax(bad))
            return f"row {row}: {block[row - start].tolist()} outside the {width}x{height} slide"
    return ""


def _missing(f: _Opened, encoders: tuple[str, ...]) -> str:
    have = {n.lower() for n in f.final_sets()}
    lacking = [e for e in encoders if e.lower() not in have]
    return ("no features/" + ", features/".join(lacking)) if lacking else ""


def _nonfinite(f: _Opened) -> str:
    found = []
    for name, ds in f.final_sets().items():
        bad = sum(int((~np.isfinite(block).all(axis=1)).sum()) for _, block in _blocks(ds))
        if bad:
            found.append(f"features/{name}: {bad} of {ds.shape[0]} rows with NaN or Inf")
    return "; ".join(found)


def _blocks(ds: Any) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, rows) blocks of about `_BLOCK_BYTES` each (flat memory whatever the slide's size)."""
    row_bytes = max(1, int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize)
    step = max(1, _BLOCK_BYTES // row_bytes)
    for start in range(0, ds.shape[0], step):
        yield start, ds[start : start + step]


def read_summary(path: Path, *, coords: bool = True) -> tuple[dict[str, Any], np.ndarray]:
    """An H5's root attributes and its coords (int32 (N, 5); (0, 5) unless `coords`), for the report's cards."""
    with h5py.File(path, "r", locking=False) as f:
        rows = np.asarray(f["coords"][...], dtype=np.int32) if coords else np.zeros((0, 5), np.int32)
        return {k: _plain(v) for k, v in f.attrs.items()}, rows
