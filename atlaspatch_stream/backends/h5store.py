"""HDF5 output in upstream's schema (reference §2.2–2.4), written so that no file ever looks complete unless it is.

A new slide is written to `.<stem>.h5.tmp.<uuid>` beside its final name and moved into place with `os.replace` once
coordinates and every requested feature set are complete. Feature sets go to `features/__tmp_<name>` and are renamed
when their row count is complete, so an existing file that gains encoders (reuse) never shows a partial set.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import SlideError
from ..outputs import PASSPORT_DTYPE, SlideAttrs

TMP_PREFIX = "__tmp_"


def passports(stem: str, coords: np.ndarray, magnification: int, target_mag: int, total: int) -> np.ndarray:
    """Passport strings for rows of `coords` (S160: long stems are truncated, as upstream)."""
    mag = str(magnification) if magnification else "na"
    tmag = str(target_mag) if target_mag else "na"
    text = [
        f"{stem}__x{x}_y{y}_rw{rw}_rh{rh}_lv{lv}_mag{mag}_tmag{tmag}_total{total}"
        for x, y, rw, rh, lv in coords.tolist()
    ]
    return np.array([t.encode("utf-8")[:160] for t in text], dtype=PASSPORT_DTYPE)


def temp_path_for(final: Path) -> Path:
    """A unique temporary name in the same folder: `.<name>.tmp.<uuid32hex>`."""
    return final.with_name(f".{final.name}.tmp.{uuid.uuid4().hex}")


def _contiguous_runs(rows: np.ndarray) -> list[tuple[int, int, int]]:
    """(start_row, stop_row, offset_in_sorted) for each run of consecutive rows in sorted `rows`."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [rows.size]])
    return [(int(rows[a]), int(rows[b - 1]) + 1, int(a)) for a, b in zip(starts, stops, strict=True)]


class SlideH5:
    """One slide's H5 being written. Not thread-safe: the writer stage owns it and calls it from one thread."""

    def __init__(self, final: Path, file: h5py.File, tmp: Path | None, num_patches: int, feature_chunk: int) -> None:
        self.final = final
        self.tmp = tmp
        self.file = file
        self.num_patches = num_patches
        self.feature_chunk = feature_chunk
        self._filled: dict[str, np.ndarray] = {}

    # -- creation -------------------------------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        final: Path,
        attrs: SlideAttrs,
        coords: np.ndarray,
        stem: str,
        write_batch: int,
        feature_chunk: int = 32,
    ) -> SlideH5:
        """Write coords, passports and attributes to a temporary file beside `final` (not yet visible)."""
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path_for(final)
        file = h5py.File(tmp, "w")
        try:
            store = cls(final, file, tmp, int(coords.shape[0]), feature_chunk)
            store._write_coords(attrs, coords, stem, write_batch)
        except BaseException:
            file.close()
            tmp.unlink(missing_ok=True)
            raise
        return store

    def _write_coords(self, attrs: SlideAttrs, coords: np.ndarray, stem: str, write_batch: int) -> None:
        for key, value in attrs.ordered():
            self.file.attrs[key] = value
        n = int(coords.shape[0])
        cds = self.file.create_dataset(
            "coords", shape=(0, 5), maxshape=(None, 5), chunks=(write_batch, 5), dtype="int32"
        )
        pds = self.file.create_dataset(
            "passports", shape=(0,), maxshape=(None,), chunks=(write_batch,), dtype=PASSPORT_DTYPE
        )
        for start in range(0, n, write_batch):
            block = np.ascontiguousarray(coords[start : start + write_batch], dtype=np.int32)
            stop = start + block.shape[0]
            cds.resize((stop, 5))
            cds[start:stop] = block
            pds.resize((stop,))
            pds[start:stop] = passports(stem, block, attrs.level0_magnification, attrs.target_magnification, n)
        self.file.attrs["num_patches"] = n

    @classmethod
    def open_existing(cls, final: Path, num_patches: int, feature_chunk: int = 32) -> SlideH5:
        """Open a complete H5 to add feature sets in place (reuse)."""
        try:
            file = h5py.File(final, "a")
        except OSError as exc:
            raise SlideError(f"cannot open existing output {final}: {exc}") from exc
        store = cls(final, file, None, num_patches, feature_chunk)
        store._drop_stale_tmp()
        return store

    def _drop_stale_tmp(self) -> None:
        group = self.file.get("features")
        if group is None:
            return
        for name in [n for n in group if n.startswith(TMP_PREFIX)]:
            del group[name]

    # -- features -------------------------------------------------------------------------------------------------

    def begin_feature(self, name: str, dim: int) -> None:
        """Create `features/__tmp_<name>` with N rows of width `dim` (raises if `features/<name>` exists)."""
        group = self.file.require_group("features")
        if name in group:
            if group[name].shape[0] == self.num_patches:
                raise SlideError(f"features/{name} already exists in {self.final}")
            del group[name]  # a partial set from another tool counts as missing (upstream §2.6 pitfall)
        tmp_name = TMP_PREFIX + name
        if tmp_name in group:
            del group[tmp_name]
        n = self.num_patches
        chunk_rows = max(1, min(self.feature_chunk, n)) if n else self.feature_chunk
        group.create_dataset(
            tmp_name, shape=(n, dim), maxshape=(None, dim), chunks=(chunk_rows, dim), dtype="float32"
        )
        self._filled[name] = np.zeros(n, dtype=bool)

    def has_feature(self, name: str) -> bool:
        """Whether a temporary feature set is open for `name`."""
        return name in self._filled

    def write_rows(self, name: str, rows: np.ndarray, values: np.ndarray) -> None:
        """Place `values` (b, D) at `rows`, by index, whatever the arrival order."""
        ds = self.file["features"][TMP_PREFIX + name]
        if values.shape[1] != ds.shape[1]:
            raise SlideError(f"encoder {name} returned width {values.shape[1]}, expected {ds.shape[1]}")
        order = np.argsort(rows, kind="stable")
        rows_sorted = rows[order]
        vals = np.ascontiguousarray(values[order], dtype=np.float32)
        for start, stop, offset in _contiguous_runs(rows_sorted):
            ds[start:stop] = vals[offset : offset + stop - start]
        self._filled[name][rows_sorted] = True

    def missing_rows(self, name: str) -> int:
        """How many rows of `name` are still unwritten."""
        filled = self._filled[name]
        return int(filled.size - np.count_nonzero(filled))

    def complete(self) -> bool:
        """True when every open feature set has all its rows."""
        return all(self.missing_rows(name) == 0 for name in self._filled)

    # -- end ------------------------------------------------------------------------------------------------------

    def finalize(self) -> Path:
        """Rename finished feature sets, close, and move a new file into place. Returns the final path."""
        group = self.file.get("features")
        for name in list(self._filled):
            if self.missing_rows(name):
                raise SlideError(f"features/{name}: {self.missing_rows(name)} rows missing at finalize")
            group.move(TMP_PREFIX + name, name)
        self.file.flush()
        self.file.close()
        if self.tmp is not None:
            os.replace(self.tmp, self.final)
        return self.final

    def abort(self) -> None:
        """Drop everything not yet final: the temporary file, or the temporary feature sets of a reused file."""
        with contextlib.suppress(Exception):
            if self.tmp is None:
                self._drop_stale_tmp()
            self.file.close()
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class ExistingH5:
    """What an existing output file says about itself (for reuse decisions)."""

    path: Path
    num_patches: int | None
    features: dict[str, int]  # name (lowercase) -> rows
    attrs: dict[str, Any]


def inspect_h5(path: Path) -> ExistingH5 | None:
    """Read an existing H5's patch count, feature row counts and attributes; None when unreadable."""
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: _plain(v) for k, v in f.attrs.items()}
            num = attrs.get("num_patches")
            if num is None and "coords" in f:
                num = int(f["coords"].shape[0])
            group = f.get("features")
            feats = {}
            if isinstance(group, h5py.Group):
                feats = {n.lower(): int(group[n].shape[0]) for n in group if not n.startswith(TMP_PREFIX)}
    except (OSError, KeyError, ValueError):
        return None
    return ExistingH5(path, None if num is None else int(num), feats, attrs)


def read_coords(path: Path) -> np.ndarray:
    """The `coords` dataset of a complete H5, int32 (N, 5)."""
    with h5py.File(path, "r") as f:
        return np.asarray(f["coords"][...], dtype=np.int32)


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    return value
