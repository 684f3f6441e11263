"""Patch readers: the pixels of planned patches at `patch_size`, as upstream reads them (§2.4), only faster.

- `TileOnceReader`: for tiled TIFF-family slides read through tiffslide. Each tile of a level that the slide's patches
  touch is read (`os.pread`) and decoded once in worker threads, and every patch overlapping it is cut from it.
  Patches are cut in row bands and a decoded tile is dropped as soon as no remaining patch needs it.
- `RegionReader`: `handle.read_region` per patch from a pool of threads, for every other slide (NDPI stripes, DICOM,
  MRXS, plain images, odd TIFF layouts).

Both give, per patch, exactly `read_region(...).convert("RGB")` of the slide library, then upstream's
`cv2.resize(rgb, (patch_size, patch_size))` (INTER_LINEAR) when the read size differs from `patch_size`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from ..errors import SlideError, describe, is_bug
from ..protocols import PatchReader, SlideHandle, TileDecoder
from ..tileplan import LevelPlan, chunk_bounds, plan_level
from .tiles import (
    ImagecodecsDecoder,
    TilePageMeta,
    cut_patch,
    describe_levels,
    load_tile,
    resize_patch,
)


def slide_name(handle: Any) -> str:
    """The name used in error messages: the handle's display name, else its path."""
    return str(getattr(handle, "name", None) or getattr(handle, "path", None) or handle.info.path)


def _backend(handle: Any) -> str | None:
    return getattr(handle, "backend", None) or getattr(getattr(handle, "info", None), "backend", None)


def tile_metas(handle: Any) -> tuple[TilePageMeta | None, ...] | None:
    """Per level of `handle`, its tile layout when that level can be read tile-once (else None there).

    Returns None for the whole slide when it is not a tiffslide-read TIFF whose levels match the handle's levels:
    the tile reader reproduces tiffslide's pixels, so it never stands in for another library.
    """
    if _backend(handle) != "tiffslide":
        return None
    path = getattr(handle, "tiff_path", None) or getattr(handle, "path", None) or handle.info.path
    found = describe_levels(path)
    if found is None:
        return None
    dims, metas = found
    if tuple((int(w), int(h)) for w, h in handle.info.level_dimensions) != dims:
        return None
    return metas


def supports_tile_once(handle: Any) -> bool:
    """True when at least one level of the slide can be read tile-once (other levels then use `read_region`)."""
    metas = tile_metas(handle)
    return metas is not None and any(m is not None for m in metas)


def make_patch_reader(handle: Any, threads: int) -> PatchReader:
    """The best reader for this slide: `TileOnceReader` when `supports_tile_once(handle)`, else `RegionReader`."""
    if supports_tile_once(handle):
        return TileOnceReader(threads=threads)
    return RegionReader(threads=threads)


def check_coords(coords: np.ndarray, handle: Any) -> np.ndarray:
    """Validate coords (N, 5) = x, y, read_w, read_h, level against the slide; returns them as int64."""
    arr = np.asarray(coords)
    if arr.ndim != 2 or arr.shape[1] != 5:
        raise ValueError(f"coords must have shape (N, 5), got {arr.shape}")
    arr = arr.astype(np.int64, copy=False)
    levels = len(handle.info.level_dimensions)
    if arr.shape[0] and (arr[:, 4].min() < 0 or arr[:, 4].max() >= levels):
        raise SlideError(f"patch level out of range 0..{levels - 1}", slide=slide_name(handle))
    if arr.shape[0] and (arr[:, 2].min() <= 0 or arr[:, 3].min() <= 0):
        raise ValueError("patch read sizes must be positive")
    return arr


def _check_args(patch_size: int, chunk: int) -> None:
    if patch_size <= 0 or chunk <= 0:
        raise ValueError(f"patch_size and chunk must be positive, got {patch_size} and {chunk}")


def read_one(handle: Any, row: np.ndarray, patch_size: int) -> np.ndarray:
    """One patch through `handle.read_region`, resized as upstream; foreign errors become `SlideError`."""
    x, y, w, h, level = (int(v) for v in row)
    try:
        rgb = np.asarray(handle.read_region(x, y, level, w, h))
    except SlideError:
        raise
    except Exception as exc:  # library errors on a bad slide are per-slide failures; bugs propagate
        if is_bug(exc):
            raise
        raise SlideError(
            f"read_region failed at x={x}, y={y}, level={level}: {describe(exc)}", slide=slide_name(handle)
        ) from exc
    return resize_patch(rgb, patch_size)


def _region_chunks(
    handle: Any, coords: np.ndarray, rows: np.ndarray, patch_size: int, chunk: int, pool: ThreadPoolExecutor
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield chunks of `rows` read per patch in `pool`, keeping the next chunk in flight while one is consumed."""
    bounds = chunk_bounds(int(rows.shape[0]), chunk)

    def submit(b: int, e: int) -> list[Future[np.ndarray]]:
        return [pool.submit(read_one, handle, coords[r], patch_size) for r in rows[b:e].tolist()]

    pending = submit(*bounds[0]) if bounds else []
    for k, (b, e) in enumerate(bounds):
        current, pending = pending, (submit(*bounds[k + 1]) if k + 1 < len(bounds) else [])
        out = np.empty((e - b, patch_size, patch_size, 3), dtype=np.uint8)
        for i, fut in enumerate(current):
            out[i] = fut.result()
        yield rows[b:e].astype(np.int64), out


class RegionReader:
    """Reads each patch with `handle.read_region` from a pool of `threads` threads (the universal fallback)."""

    def __init__(self, threads: int = 2) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.threads = threads

    def iter_patches(
        self, handle: SlideHandle, coords: np.ndarray, patch_size: int, chunk: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (rows int64 (b,), pixels uint8 (b, patch_size, patch_size, 3)), rows in coords order, b <= chunk."""
        _check_args(patch_size, chunk)
        arr = check_coords(coords, handle)
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="region-reader")
        try:
            yield from _region_chunks(
                handle, arr, np.arange(arr.shape[0], dtype=np.int64), patch_size, chunk, pool
            )
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


class TileOnceReader:
    """Reads every touched tile once (raw bytes + `decoder` in `threads` threads) and cuts patches from the tiles.

    Memory per slide: the tiles of one chunk of patches and of the next (decoded ahead), plus tiles a later patch
    still needs; in row-band order that is about two tile rows of the patched area.
    """

    def __init__(self, threads: int = 2, decoder: TileDecoder | None = None) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.threads = threads
        self.decoder: TileDecoder = decoder or ImagecodecsDecoder()

    def iter_patches(
        self, handle: SlideHandle, coords: np.ndarray, patch_size: int, chunk: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (rows int64 (b,), pixels uint8 (b, patch_size, patch_size, 3)); rows in row-band order, b <= chunk.

        Levels that cannot be read tile-once (and whole slides, see `tile_metas`) are read with `read_region`.
        Raises SlideError on a corrupt or unreadable tile.
        """
        _check_args(patch_size, chunk)
        arr = check_coords(coords, handle)
        metas = tile_metas(handle)
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="tile-once")
        try:
            yield from self._iter_all(handle, arr, metas, patch_size, chunk, pool)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _iter_all(
        self,
        handle: Any,
        coords: np.ndarray,
        metas: tuple[TilePageMeta | None, ...] | None,
        patch_size: int,
        chunk: int,
        pool: ThreadPoolExecutor,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        levels = coords[:, 4]
        tiled = [lv for lv in np.unique(levels).tolist() if metas is not None and metas[lv] is not None]
        for lv in tiled:
            meta = metas[lv]  # type: ignore[index]
            assert meta is not None
            plan = plan_level(np.flatnonzero(levels == lv), coords, meta.downsample, meta.grid)
            yield from self._iter_level(plan, meta, patch_size, chunk, pool, slide_name(handle))
        rest = np.flatnonzero(~np.isin(levels, tiled))
        if rest.size:
            yield from _region_chunks(handle, coords, rest, patch_size, chunk, pool)

    def _iter_level(
        self,
        plan: LevelPlan,
        meta: TilePageMeta,
        patch_size: int,
        chunk: int,
        pool: ThreadPoolExecutor,
        slide: str,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        try:
            fd = os.open(meta.path, os.O_RDONLY)
        except OSError as exc:
            raise SlideError(f"cannot open for tile reads: {describe(exc)}", slide=slide) from exc
        cache: dict[int, Future[np.ndarray | None]] = {}

        def load(tile: int) -> np.ndarray | None:
            return load_tile(fd, meta, tile, self.decoder, slide)

        try:
            yield from self._cut_chunks(plan, cache, load, patch_size, chunk, pool)
        finally:
            for fut in cache.values():
                fut.cancel()
            # Decodes already running still read from fd: wait for them before closing it.
            for fut in cache.values():
                if not fut.cancelled():
                    fut.exception()
            os.close(fd)

    @staticmethod
    def _cut_chunks(
        plan: LevelPlan,
        cache: dict[int, Future[np.ndarray | None]],
        load: Callable[[int], np.ndarray | None],
        patch_size: int,
        chunk: int,
        pool: ThreadPoolExecutor,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        bounds = chunk_bounds(len(plan), chunk)

        def submit(b: int, e: int) -> None:
            for tile in plan.tiles_of(b, e).tolist():
                if tile not in cache:
                    cache[tile] = pool.submit(load, tile)

        if bounds:
            submit(*bounds[0])
        for k, (b, e) in enumerate(bounds):
            if k + 1 < len(bounds):
                submit(*bounds[k + 1])  # decode ahead while this chunk is cut and consumed
            now = plan.tiles_of(b, e)
            decoded = {t: cache[t].result() for t in now.tolist()}
            out = _cut_range(plan, decoded, b, e, patch_size)
            for tile in plan.done_after(e, now).tolist():
                del cache[tile]
            yield plan.rows[b:e].copy(), out


def _cut_range(
    plan: LevelPlan, decoded: dict[int, np.ndarray | None], b: int, e: int, patch_size: int
) -> np.ndarray:
    """Cut (and resize as upstream) the patches at plan positions [b, e) from decoded tiles."""
    out = np.empty((e - b, patch_size, patch_size, 3), dtype=np.uint8)
    for i in range(b, e):
        rect = (int(plan.rx[i]), int(plan.ry[i]), int(plan.rw[i]), int(plan.rh[i]))
        needed = plan.tiles[plan.starts[i] : plan.starts[i + 1]]
        out[i - b] = resize_patch(cut_patch(decoded, plan.grid, rect, needed), patch_size)
    return out
