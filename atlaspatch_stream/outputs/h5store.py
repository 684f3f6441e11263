"""HDF5 output in upstream's schema (reference §2.2–2.4), written so that no file ever looks complete unless it is,
and so that a failing output disk fails the slide cleanly instead of crashing the process.

A new slide is written to `.<stem>.h5.tmp.<hostkey>-<pid>-<start>.<hex>` beside its final name (the owner in the
name lets `claims.sweep_orphans` tell a dead writer's file from a live one's) and moved into place with `os.replace`
once coordinates and every requested feature set are complete and fsynced. Feature sets go to `features/__tmp_<name>`
and are renamed when their row count is complete, so an existing file that gains encoders never shows a partial set.

Why the old store segfaulted on a full disk (reproduced with h5py 3.16 / HDF5 2.0 on a 4 MiB tmpfs, then in isolation):
1. HDF5 defers writes (chunk cache, metadata cache). The OS error surfaces when a dataset handle is closed, and
   h5py closes handles in `__dealloc__`, where an exception can only be printed ("Exception ignored ... Can't
   decrement id ref count ... errno = 28"). The store never learned that its rows were lost, went on, and HDF5 then
   used the half-closed dataset: SIGSEGV inside `H5Lmove` (the `group.move` of finalize).
2. When the flush at close fails, `H5Fclose` fails and leaves the file's shared state freed under still-registered
   dataset and group ids; deallocating those Python objects later (or at interpreter exit) runs `H5D_close` on freed
   memory: SIGSEGV with no Python frame (gdb: `H5Idec_ref -> H5D__close_cb -> H5D_close`).
3. Those deallocations happened in whatever thread dropped the last reference: `inspect_h5` ran in the opener
   threads while the writer thread wrote, and the write stage's `abort` ran on anyio's default limiter.

Why it cannot happen now:
- HDF5 never sees an OS error. Files are opened through `h5io.OutputFile` (h5py `driver="fileobj"`): the first
  failing OS call is recorded and the file is poisoned (later writes kept in memory, so HDF5 reads back what it
  wrote). Every HDF5 call, the close included, takes its ordinary successful path; HDF5's own error paths, where the
  use-after-free lives, are never entered. Deferred errors cannot hide either: the store checks the poison after
  every operation and raises `OutputError`.
- Handles are explicit: one dataset handle per feature set and one group handle, closed by id before the file, in
  finalize and abort; nothing is left for a destructor.
- Every h5py call of the process runs on one thread (`h5thread.h5_executor()`): the store's methods hop there by
  themselves, whatever thread calls them, and exceptions come back with their frames cleared, so no h5py object is
  ever released in another thread. An `atexit` hook aborts any store still open before HDF5's own exit handlers run.
- `abort()` on a broken file only closes (a successful close, since HDF5 saw no error) and unlinks; it never raises.

Free space is checked before a file is created and before a feature set is added that was not counted at create:
`estimate_h5_bytes` (measured: see its docstring) against `statvfs` free space minus what other open stores on the
same filesystem have reserved but not yet written, raising `OutputError(kind="disk_full")` with the figures.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import h5py
import numpy as np

from ..errors import OutputError, SlideError, disk_full_before, free_bytes, output_error
from .claims import owned_temp_path
from .h5io import OutputFile
from .h5thread import on_h5_thread
from .layout import PASSPORT_DTYPE, SlideAttrs

log = logging.getLogger("atlaspatch_stream")

TMP_PREFIX = "__tmp_"
T = TypeVar("T")
P = ParamSpec("P")

# Measured on files this store wrote (N from 0 to 100k, 0-3 feature sets of width 3-1536, chunks 32-8192 rows):
# beyond the allocated chunks, root attributes and coords/passports headers take 12.9 KB, each feature set 2.9 KB,
# and the chunk index about 47 B per chunk. The constants below double those; `MARGIN` covers the rest.
BASE_OVERHEAD = 32 * 1024
SET_OVERHEAD = 8 * 1024
CHUNK_OVERHEAD = 96
MARGIN = 1.02
COORD_ROW = 5 * 4
PASSPORT_ROW = 160


def passports(stem: str, coords: np.ndarray, magnification: int, target_mag: int, total: int) -> np.ndarray:
    """Passport strings for rows of `coords` (S160: long stems are truncated, as upstream)."""
    mag = str(magnification) if magnification else "na"
    tmag = str(target_mag) if target_mag else "na"
    text = [f"{stem}__x{x}_y{y}_rw{rw}_rh{rh}_lv{lv}_mag{mag}_tmag{tmag}_total{total}"
            for x, y, rw, rh, lv in coords.tolist()]
    return np.array([t.encode("utf-8")[:160] for t in text], dtype=PASSPORT_DTYPE)


# -- size estimates and the free-space check ------------------------------------------------------------------------


def _chunked_rows(n: int, chunk: int) -> tuple[int, int]:
    """(rows allocated, chunks) for `n` rows in chunks of `chunk` rows: HDF5 allocates whole chunks."""
    chunks = math.ceil(n / chunk) if n else 0
    return chunks * chunk, chunks


def feature_set_bytes(num_patches: int, dim: int, feature_chunk: int) -> int:
    """Bytes one float32 feature set of width `dim` adds to a file (chunk rounding, index and header included)."""
    chunk = max(1, min(feature_chunk, num_patches)) if num_patches else feature_chunk
    rows, chunks = _chunked_rows(num_patches, chunk)
    return math.ceil((rows * dim * 4 + chunks * CHUNK_OVERHEAD + SET_OVERHEAD) * MARGIN)


def estimate_h5_bytes(num_patches: int, dims: Iterable[int], write_batch: int, feature_chunk: int) -> int:
    """An upper estimate of a finished slide's H5 size.

    coords (N x 5 x 4 B) and passports (N x 160 B), both in chunks of `write_batch` rows (so even one patch
    allocates a whole chunk: 1.47 MB at the default 8192), plus N x D x 4 B per feature set in chunks of
    `feature_chunk` rows, plus HDF5's headers and chunk index (see the constants above).
    """
    rows, chunks = _chunked_rows(num_patches, write_batch)
    coords = rows * (COORD_ROW + PASSPORT_ROW) + 2 * chunks * CHUNK_OVERHEAD + BASE_OVERHEAD
    return math.ceil(coords * MARGIN) + sum(feature_set_bytes(num_patches, d, feature_chunk) for d in dims)


def check_free_space(folder: Path, needed: int, *, reserved: int = 0) -> None:
    """Raise `OutputError(kind="disk_full")` when `needed` bytes do not fit in `folder`'s free space.

    Args:
        folder: The output folder (its filesystem is measured with statvfs).
        needed: Bytes about to be written.
        reserved: Bytes other writers on the same filesystem have promised but not yet written.
    """
    free = free_bytes(folder)
    if free is None:
        return  # statvfs unsupported: the write itself will tell
    available = max(0, free - reserved)
    if needed > available:
        raise disk_full_before(needed, available, folder)


# -- the store ------------------------------------------------------------------------------------------------------


def _contiguous_runs(rows: np.ndarray) -> list[tuple[int, int, int]]:
    """(start_row, stop_row, offset_in_sorted) for each run of consecutive rows in sorted `rows`."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [rows.size]])
    return [(int(rows[a]), int(rows[b - 1]) + 1, int(a)) for a, b in zip(starts, stops, strict=True)]


_OPEN: set[SlideH5] = set()  # stores not yet finalized or aborted; touched only on the H5 thread


def _guarded(method: Callable[Concatenate[SlideH5, P], T]) -> Callable[Concatenate[SlideH5, P], T]:
    """`method` run on the H5 thread, refused once the store is broken or done; OS-level failures (also hidden
    ones, via the poison) become `OutputError` and break the store."""

    @on_h5_thread
    @functools.wraps(method)
    def guarded(self: SlideH5, /, *args: P.args, **kwargs: P.kwargs) -> T:
        if self._broken is not None:
            raise self._broken
        if self._done:
            raise ValueError(f"{self.final}: store already finalized or aborted")
        try:
            result = method(self, *args, **kwargs)
        except (OutputError, SlideError):
            self._check_poison()  # a poisoned file wins: its error is the real cause
            raise
        except Exception as exc:
            self._check_poison()
            translated = output_error(exc, self.final)
            if translated is None:
                raise
            self._broken = translated
            raise translated from exc
        self._check_poison()
        return result

    return guarded


class SlideH5:
    """One slide's H5 being written. Any thread may call it; every h5py call runs on the H5 thread.

    Raises (from every method that writes): `OutputError` for OS-level output failures (the store is then broken:
    only `abort()` remains), `SlideError` for per-slide problems (wrong width, rows missing, existing set).
    """

    def __init__(self, final: Path, tmp: Path | None, handle: OutputFile, mode: str, num_patches: int,
                 feature_chunk: int, reserved: int, planned: Iterable[str]) -> None:
        """Open `handle` with h5py (`create` and `open_existing` call this); on failure close it, remove a new file,
        and raise the translated error."""
        try:
            self._file: h5py.File | None = h5py.File(handle, mode)
        except Exception as exc:
            handle.close()
            if tmp is not None:
                with contextlib.suppress(OSError):
                    tmp.unlink()
            if handle.error is not None:
                raise _translate(handle.error, final) from exc
            raise
        self.final = final
        self.tmp = tmp
        self.num_patches = num_patches
        self.feature_chunk = feature_chunk
        self._handle = handle
        self._group: h5py.Group | None = None
        self._datasets: dict[str, h5py.Dataset] = {}
        self._filled: dict[str, np.ndarray] = {}
        self._planned = set(planned)
        self._staged: list[tuple[str, str]] = []  # (group, name) of small datasets renamed at finalize
        self._reserved = reserved
        self._base_size = handle.size
        self._dev = os.fstat(handle.fd).st_dev if handle.fd is not None else -1
        self._broken: OutputError | None = None
        self._done = False
        _OPEN.add(self)

    # -- creation -------------------------------------------------------------------------------------------------

    @classmethod
    @on_h5_thread
    def create(cls, final: Path, attrs: SlideAttrs, coords: np.ndarray, stem: str, write_batch: int,
               feature_chunk: int = 32, feature_dims: Mapping[str, int] | None = None) -> SlideH5:
        """Check free space, then write coords, passports and attributes to a temporary file beside `final`.

        Args:
            final: The slide's final H5 path (not visible until `finalize`).
            attrs: Root attributes.
            coords: int32 (N, 5).
            stem: The slide stem (passports).
            write_batch: Rows per coords/passports chunk.
            feature_chunk: Rows per feature chunk.
            feature_dims: Feature sets to be added (name -> width), counted in the free-space check now.

        Raises:
            OutputError: the file would not fit (`disk_full`, before anything is written) or cannot be written.
        """
        dims = dict(feature_dims or {})
        n = int(coords.shape[0])
        needed = estimate_h5_bytes(n, dims.values(), write_batch, feature_chunk)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            check_free_space(final.parent, needed, reserved=_reserved_on(os.stat(final.parent).st_dev))
            tmp = owned_temp_path(final)
            handle = OutputFile(tmp, create=True)
        except OSError as exc:
            raise _translate(exc, final.parent) from exc
        store = cls(final, tmp, handle, "w", n, feature_chunk, needed, dims)
        store._run_or_abort(store._write_coords, attrs, coords, stem, write_batch)
        return store

    @_guarded
    def _write_coords(self, attrs: SlideAttrs, coords: np.ndarray, stem: str, write_batch: int) -> None:
        file = self._require_file()
        file.attrs.update(attrs.ordered())
        n = int(coords.shape[0])
        cds = file.create_dataset("coords", shape=(0, 5), maxshape=(None, 5), chunks=(write_batch, 5), dtype="int32")
        pds = file.create_dataset("passports", shape=(0,), maxshape=(None,), chunks=(write_batch,),
                                  dtype=PASSPORT_DTYPE)
        try:
            for start in range(0, n, write_batch):
                block = np.ascontiguousarray(coords[start : start + write_batch], dtype=np.int32)
                stop = start + block.shape[0]
                cds.resize((stop, 5))
                cds[start:stop] = block
                pds.resize((stop,))
                pds[start:stop] = passports(stem, block, attrs.level0_magnification, attrs.target_magnification, n)
        finally:
            cds.id.close()
            pds.id.close()
        file.attrs["num_patches"] = n

    @classmethod
    @on_h5_thread
    def open_existing(cls, final: Path, num_patches: int, feature_chunk: int = 32) -> SlideH5:
        """Open a complete H5 to add feature sets in place (reuse).

        Raises:
            OutputError: the file cannot be opened for writing (permission, read-only, gone).
            SlideError: the file is not a readable HDF5 file.
        """
        try:
            handle = OutputFile(final, create=False)
        except OSError as exc:
            raise _translate(exc, final) from exc
        try:
            store = cls(final, None, handle, "a", num_patches, feature_chunk, 0, ())
        except OutputError:
            raise
        except Exception as exc:
            raise SlideError(f"cannot open existing output {final}: {exc}") from exc
        store._run_or_abort(store._drop_stale_tmp)
        return store

    def _run_or_abort(self, fn: Callable[..., Any], *args: Any) -> None:
        """A step of opening: on any failure the store is aborted before the error propagates."""
        try:
            fn(*args)
        except BaseException:
            self.abort()
            raise

    @_guarded
    def _drop_stale_tmp(self) -> None:
        group = self._require_file().get("features")
        if group is None:
            return
        try:
            for name in [n for n in group if n.startswith(TMP_PREFIX)]:
                del group[name]
        finally:
            group.id.close()

    # -- features -------------------------------------------------------------------------------------------------

    @_guarded
    def begin_feature(self, name: str, dim: int) -> None:
        """Create `features/__tmp_<name>` with N rows of width `dim`, after a free-space check if not yet counted.

        Raises:
            SlideError: `features/<name>` already exists complete.
            OutputError: the set would not fit (`disk_full`) or cannot be written.
        """
        group = self._features_group()
        if name in group:
            if group[name].shape[0] == self.num_patches:
                raise SlideError(f"features/{name} already exists in {self.final}")
            del group[name]  # a partial set from another tool counts as missing (upstream §2.6 pitfall)
        tmp_name = TMP_PREFIX + name
        if tmp_name in group:
            del group[tmp_name]
        if name not in self._planned:
            needed = feature_set_bytes(self.num_patches, dim, self.feature_chunk)
            check_free_space(self.final.parent, needed, reserved=_reserved_on(self._dev))
            self._reserved += needed
            self._planned.add(name)
        n = self.num_patches
        chunk_rows = max(1, min(self.feature_chunk, n)) if n else self.feature_chunk
        self._datasets[name] = group.create_dataset(tmp_name, shape=(n, dim), maxshape=(None, dim),
                                                    chunks=(chunk_rows, dim), dtype="float32")
        self._filled[name] = np.zeros(n, dtype=bool)

    def has_feature(self, name: str) -> bool:
        """Whether a temporary feature set is open for `name`."""
        return name in self._filled

    @_guarded
    def write_rows(self, name: str, rows: np.ndarray, values: np.ndarray) -> None:
        """Place `values` (b, D) at `rows`, by index, whatever the arrival order.

        Raises:
            SlideError: the width differs from the set's.
            OutputError: the write failed at the OS level.
        """
        ds = self._datasets[name]
        if values.shape[1] != ds.shape[1]:
            raise SlideError(f"encoder {name} returned width {values.shape[1]}, expected {ds.shape[1]}")
        order = np.argsort(rows, kind="stable")
        rows_sorted = rows[order]
        vals = np.ascontiguousarray(values[order], dtype=np.float32)
        for start, stop, offset in _contiguous_runs(rows_sorted):
            ds[start:stop] = vals[offset : offset + stop - start]
        self._filled[name][rows_sorted] = True

    @_guarded
    def put_dataset(self, group: str, name: str, data: np.ndarray, attrs: Mapping[str, Any]) -> None:
        """Write a small dataset as `<group>/__tmp_<name>`; `finalize` renames it to `<group>/<name>` (replacing an
        older one) after the file is synced, so `<group>/<name>` is never seen partial (slide embeddings)."""
        grp = self._require_file().require_group(group)
        try:
            if TMP_PREFIX + name in grp:
                del grp[TMP_PREFIX + name]
            ds = grp.create_dataset(TMP_PREFIX + name, data=data)
            ds.attrs.update(attrs)
            ds.id.close()
        finally:
            grp.id.close()
        self._staged.append((group, name))

    def _staged_sets(self) -> list[tuple[str, str]]:
        """(group, name) of every dataset written under its temporary name: the feature sets, then small ones."""
        return [("features", name) for name in self._filled] + self._staged

    def missing_rows(self, name: str) -> int:
        """How many rows of `name` are still unwritten."""
        filled = self._filled[name]
        return int(filled.size - np.count_nonzero(filled))

    def complete(self) -> bool:
        """True when every open feature set has all its rows."""
        return all(self.missing_rows(name) == 0 for name in self._filled)

    @_guarded
    def set_feature_attrs(self, name: str, attrs: Mapping[str, int]) -> None:
        """Attributes of the open feature set `name` (e.g. `nonfinite_rows`); they travel with its rename."""
        self._datasets[name].attrs.update(dict(attrs))

    # -- end ------------------------------------------------------------------------------------------------------

    @_guarded
    def finalize(self) -> Path:
        """Rename finished sets, flush, close, fsync, and move a new file into place. Returns the final path.

        Raises:
            SlideError: rows are missing (call `abort()`).
            OutputError: flushing, syncing or renaming failed (call `abort()`; nothing became visible).
        """
        for name in self._filled:
            if self.missing_rows(name):
                raise SlideError(f"features/{name}: {self.missing_rows(name)} rows missing at finalize")
        # Rows reach the disk under their temporary names first; only then are the sets renamed. In a reused file,
        # written in place, a failure can then never leave a set visible under its final name without its rows.
        self._require_file().flush()
        self._handle.sync()
        self._check_poison()
        file = self._require_file()
        for group, name in self._staged_sets():
            grp = file[group]
            try:
                if name in grp:
                    del grp[name]  # an older slide embedding (`begin_feature` removed an older feature set)
                grp.move(TMP_PREFIX + name, name)
            finally:
                grp.id.close()
        self._close_file(flush=True)
        self._check_poison()
        self._handle.sync()
        self._handle.close()
        self._check_poison()
        if self.tmp is not None:
            move_into_place(self.tmp, self.final)
        self._done = True
        _OPEN.discard(self)
        return self.final

    @on_h5_thread
    def abort(self) -> None:
        """Drop everything not yet final: the temporary file, or the temporary feature sets of a reused file.

        Never raises. On a broken file it only closes (HDF5 saw no error, so the close succeeds) and unlinks; a
        reused file that broke keeps whatever it had on disk before the failure (a rerun rebuilds it when
        `inspect_h5` finds it unreadable).
        """
        if self._done:
            return
        self._done = True
        _OPEN.discard(self)
        healthy = self._broken is None and self._handle.error is None
        try:
            if self.tmp is None and healthy and self._file is not None:
                self._drop_open_tmp_sets()
            self._close_file(flush=False)
        except Exception as exc:  # noqa: BLE001 - abort is the last resort and must not raise
            log.warning("%s: closing after a failure: %s", self.final, exc)
        self._handle.close()
        if self.tmp is not None:
            try:
                self.tmp.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("could not remove %s (%s); the next start-up sweep removes it", self.tmp, exc)

    def _drop_open_tmp_sets(self) -> None:
        for name in self._filled:
            self._datasets.pop(name).id.close()
        file = self._require_file()
        for group, name in self._staged_sets():
            if f"{group}/{TMP_PREFIX}{name}" in file:
                del file[f"{group}/{TMP_PREFIX}{name}"]

    # -- helpers ------------------------------------------------------------------------------------------------

    def _check_poison(self) -> None:
        error = self._handle.error
        if error is not None and self._broken is None:
            self._broken = _translate(error, self.final)
        if self._broken is not None:
            raise self._broken

    def _require_file(self) -> h5py.File:
        if self._file is None:
            raise ValueError(f"{self.final}: file already closed")
        return self._file

    def _features_group(self) -> h5py.Group:
        if self._group is None:
            self._group = self._require_file().require_group("features")
        return self._group

    def _close_file(self, *, flush: bool) -> None:
        """Close dataset and group handles by id, then the file (h5py closes anything else still open)."""
        for ds in self._datasets.values():
            if ds.id.valid:
                ds.id.close()
        self._datasets.clear()
        if self._group is not None and self._group.id.valid:
            self._group.id.close()
        self._group = None
        file, self._file = self._file, None
        if file is not None and file.id.valid:
            if flush:
                file.flush()
            file.close()

    def outstanding(self) -> int:
        """Bytes reserved by the free-space checks and not yet written."""
        return max(0, self._reserved - max(0, self._handle.size - self._base_size))


def _reserved_on(dev: int) -> int:
    """Bytes open stores on filesystem `dev` have reserved but not yet written (H5 thread only)."""
    return sum(store.outstanding() for store in _OPEN if store._dev == dev)


def _translate(exc: OSError, path: Path) -> OutputError:
    """An OSError on an output path as an OutputError (errors we do not map become `output_io`)."""
    return output_error(exc, path) or OutputError(f"output I/O error on {path} ({exc.strerror or exc})",
                                                  kind="output_io", path=path, errno=exc.errno)


def move_into_place(tmp: Path, final: Path) -> None:
    """`os.replace` a finished temporary file onto its final name, and make the rename durable (filesystems that
    cannot fsync a folder are left as they are)."""
    try:
        os.replace(tmp, final)
    except OSError as exc:
        raise _translate(exc, final) from exc
    with contextlib.suppress(OSError):
        fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@atexit.register
def _abort_open_stores() -> None:
    """At interpreter exit: abort stores still open (each on the H5 thread) before HDF5's own exit handlers run."""
    for store in list(_OPEN):
        store.abort()


# -- reading --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExistingH5:
    """What an existing output file says about itself (for reuse decisions)."""

    path: Path
    num_patches: int | None
    features: dict[str, int]  # name (lowercase) -> rows
    attrs: dict[str, Any]


@on_h5_thread
def inspect_h5(path: Path) -> ExistingH5 | None:
    """Read an existing H5's patch count, feature row counts and attributes; None when unreadable (H5 thread)."""
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: _plain(v) for k, v in f.attrs.items()}
            num = attrs.get("num_patches")
            if num is None and "coords" in f:
                num = int(f["coords"].shape[0])
            group = f.get("features")
            feats = ({n.lower(): int(group[n].shape[0]) for n in group if not n.startswith(TMP_PREFIX)}
                     if isinstance(group, h5py.Group) else {})
    except (OSError, KeyError, ValueError):
        return None
    return ExistingH5(path, None if num is None else int(num), feats, attrs)


@on_h5_thread
def read_coords(path: Path) -> np.ndarray:
    """The `coords` dataset of a complete H5, int32 (N, 5) (H5 thread)."""
    with h5py.File(path, "r") as f:
        return np.asarray(f["coords"][...], dtype=np.int32)


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    return value
