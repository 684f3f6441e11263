"""Patch readers: the pixels of planned patches at `patch_size`, as upstream reads them (§2.4), only faster.

- `TileOnceReader`: for tiled TIFF-family slides read through tiffslide. Each tile of a level that the slide's patches
  touch is read (`os.pread`) and decoded once, in batches, by the run's tile decoder (`backends.decoders`: `cpu`,
  `dali`, `nvimgcodec`) in worker threads, and every patch overlapping it is cut from it. Patches are cut in row bands
  and a decoded tile is dropped as soon as no remaining patch needs it. A level the decoder cannot decode exactly
  goes to the `cpu` decoder; a level that is not tiled (NDPI stripes, odd layouts) to `read_region`. Either way the
  reason is kept in `routes`, for the run report.
- `RegionReader`: `handle.read_region` per patch from a pool of threads, for every other slide (NDPI stripes, DICOM,
  MRXS, plain images, odd TIFF layouts).

Both give, per patch, exactly `read_region(...).convert("RGB")` of the slide library, then upstream's
`cv2.resize(rgb, (patch_size, patch_size))` (INTER_LINEAR) when the read size differs from `patch_size`. On a GPU
decoder the cut and resize run in torch on the device (`backends.patches`): equal at read sizes of 1, 2 and 4 times
the patch size, within one grey level otherwise.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ..batching import to_host
from ..buffers import BufferPool
from ..errors import SlideError, describe, is_bug
from ..items import Pixels
from ..protocols import DecodedTiles, PatchReader, SlideHandle, TileDecoder
from ..tileplan import LevelPlan, chunk_bounds, plan_level
from .decoders.cpu import CpuDecoder
from .tiles import (
    TilePageMeta,
    check_tile,
    cut_patch,
    describe_levels,
    level_problems,
    read_raw,
    resize_patch,
    tile_error,
)

Cutter = Literal["auto", "cv2", "torch"]
Chunks = Iterator[tuple[np.ndarray, Any]]  # (rows, pixels) per chunk of patches


@dataclass(frozen=True)
class Route:
    """How one level of a slide was read.

    Attributes:
        level: The pyramid level.
        decoder: "cpu", "dali", "nvimgcodec", or "read_region" (no tile decoding at all).
        reason: Why not the run's decoder ("" when it is the run's decoder).
    """

    level: int
    decoder: str
    reason: str = ""


def describe_routes(routes: list[Route]) -> str:
    """One line for the run report, e.g. "level 0: dali; level 2: cpu (deflate tiles: dali decodes JPEG ...)"."""
    parts = [f"level {r.level}: {r.decoder}" + (f" ({r.reason})" if r.reason else "") for r in routes]
    return "; ".join(parts)


def slide_name(handle: Any) -> str:
    """The name used in error messages: the handle's display name, else its path."""
    return str(getattr(handle, "name", None) or getattr(handle, "path", None) or handle.info.path)


def _backend(handle: Any) -> str | None:
    return getattr(handle, "backend", None) or getattr(getattr(handle, "info", None), "backend", None)


def _tiff_path(handle: Any) -> str:
    return getattr(handle, "tiff_path", None) or getattr(handle, "path", None) or handle.info.path


def tile_metas(handle: Any) -> tuple[TilePageMeta | None, ...] | None:
    """Per level of `handle`, its tile layout when that level can be read tile-once (else None there).

    Returns None for the whole slide when it is not a tiffslide-read TIFF whose levels match the handle's levels:
    the tile reader reproduces tiffslide's pixels, so it never stands in for another library.
    """
    if _backend(handle) != "tiffslide":
        return None
    found = describe_levels(_tiff_path(handle))
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


class PatchIterator:
    """One slide's patch chunks (`protocols.PatchChunks`): an iterator, closable, that tells how the slide was read.

    Attributes:
        reader: The reader producing the chunks; `routes` says which decoder read each level and why.
    """

    def __init__(self, reader: Any, chunks: Iterator[tuple[np.ndarray, Pixels]]) -> None:
        self.reader = reader
        self._chunks = chunks

    def __iter__(self) -> PatchIterator:
        return self

    def __next__(self) -> tuple[np.ndarray, Pixels]:
        return next(self._chunks)

    def close(self) -> None:
        """Stop the reader: joins its threads and closes its file (also mid-slide)."""
        if isinstance(self._chunks, Generator):  # the readers' chunks are generators: closing one stops its threads
            self._chunks.close()

    @property
    def routes(self) -> str:
        """`describe_routes` of the reader's routes so far (for the run report)."""
        return describe_routes(self.reader.routes)


def region_reason(handle: Any) -> str:
    """Why a slide is read with `read_region` rather than tile-once (for the run report)."""
    backend = _backend(handle)
    if backend != "tiffslide":
        return f"{backend or 'unknown'} slide: tiles are read through its library"
    problems = level_problems(_tiff_path(handle))
    if problems is None:
        return "not a plain tiled TIFF pyramid"
    return "; ".join(sorted({p for p in problems if p})) or "levels do not match the slide handle"


def make_patch_reader(handle: Any, threads: int, decoder: TileDecoder | None = None, *,
                      device_output: bool = False, buffers: BufferPool | None = None) -> PatchReader:
    """The best reader for this slide: `TileOnceReader` when `supports_tile_once(handle)`, else `RegionReader`.

    Args:
        handle: The open slide.
        threads: Reader threads for this slide.
        decoder: The run's tile decoder (shared by all slides); None = the `cpu` reference.
        device_output: Yield torch tensors on the decoder's device instead of host numpy (GPU decoders only).
        buffers: Where host chunks are allocated (the run's pool); None = fresh arrays.
    """
    if supports_tile_once(handle):
        return TileOnceReader(threads=threads, decoder=decoder, device_output=device_output, buffers=buffers)
    return RegionReader(threads=threads, reason=region_reason(handle), buffers=buffers)


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
    except Exception as exc:  # library errors on a bad slide are per-slide failures; bugs propagate
        if isinstance(exc, SlideError) or is_bug(exc):
            raise
        raise SlideError(f"read_region failed at x={x}, y={y}, level={level}: {describe(exc)}",
                         slide=slide_name(handle)) from exc
    return resize_patch(rgb, patch_size)


def _pooled(threads: int, name: str, chunks: Callable[[ThreadPoolExecutor], Chunks]) -> Chunks:
    """Yield `chunks(pool)` from a pool of `threads` threads, shut down (queued reads cancelled) when done or closed."""
    pool = ThreadPoolExecutor(threads, thread_name_prefix=name)
    try:
        yield from chunks(pool)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _region_chunks(handle: Any, coords: np.ndarray, rows: np.ndarray, patch_size: int, chunk: int,
                   pool: ThreadPoolExecutor, buffers: BufferPool) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield chunks of `rows` read per patch in `pool` (into `buffers`), keeping the next chunk in flight while one is
    consumed."""
    bounds = chunk_bounds(int(rows.shape[0]), chunk)

    def submit(b: int, e: int) -> list[Future[np.ndarray]]:
        return [pool.submit(read_one, handle, coords[r], patch_size) for r in rows[b:e].tolist()]

    pending = submit(*bounds[0]) if bounds else []
    for k, (b, e) in enumerate(bounds):
        current, pending = pending, (submit(*bounds[k + 1]) if k + 1 < len(bounds) else [])
        out = buffers.empty((e - b, patch_size, patch_size, 3))
        for i, fut in enumerate(current):
            out[i] = fut.result()
        yield rows[b:e].astype(np.int64), out


class RegionReader:
    """Reads each patch with `handle.read_region` from a pool of `threads` threads (the universal fallback).

    Args:
        threads: Reader threads.
        reason: Why this slide is not read tile-once (recorded in `routes`).
        buffers: Where chunks are allocated (the run's pool); None = fresh arrays.
    """

    def __init__(self, threads: int = 2, reason: str = "", buffers: BufferPool | None = None) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.threads = threads
        self.reason = reason
        self.buffers = buffers or BufferPool(0)
        self.routes: list[Route] = []

    def iter_patches(self, handle: SlideHandle, coords: np.ndarray, patch_size: int,
                     chunk: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (rows int64 (b,), pixels uint8 (b, patch_size, patch_size, 3)), rows in coords order, b <= chunk."""
        _check_args(patch_size, chunk)
        arr = check_coords(coords, handle)
        self.routes = [Route(lv, "read_region", self.reason) for lv in np.unique(arr[:, 4]).tolist()]
        rows = np.arange(arr.shape[0], dtype=np.int64)
        yield from _pooled(self.threads, "region-reader",
                           lambda pool: _region_chunks(handle, arr, rows, patch_size, chunk, pool, self.buffers))


class TileOnceReader:
    """Reads every touched tile once (raw bytes in `threads` threads, batches through `decoder`) and cuts patches.

    Memory per slide: the tiles of one chunk of patches and of the next (decoded ahead), plus tiles a later patch
    still needs; in row-band order that is about two tile rows of the patched area.

    Args:
        threads: Reader threads for this slide (each reads and decodes one batch of tiles at a time).
        decoder: The run's tile decoder, shared by all slides; None = the `cpu` reference.
        cutter: "cv2" (numpy + cv2, the reference), "torch" (`backends.patches`, on the decoder's device), or
            "auto": torch when the decoder's pixels live on a GPU, else cv2.
        device_output: Yield torch tensors on the decoder's device (for encoders that take them) instead of numpy.
        buffers: Where host chunks cut with cv2 are allocated (the run's pool); None = fresh arrays.

    Attributes:
        routes: After (or during) `iter_patches`, how each level was read and why not by `decoder`.
        decode_counts: (level, tile) -> times decoded in the last `iter_patches` (the tile-once invariant: all 1).
    """

    def __init__(self, threads: int = 2, decoder: TileDecoder | None = None, *, cutter: Cutter = "auto",
                 device_output: bool = False, buffers: BufferPool | None = None) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.threads = threads
        self.decoder: TileDecoder = decoder or CpuDecoder()
        self._cpu: TileDecoder = self.decoder if self.decoder.name == "cpu" else CpuDecoder()
        self.cutter = cutter
        self.device_output = device_output
        self.buffers = buffers or BufferPool(0)
        self.routes: list[Route] = []
        self.decode_counts: Counter[tuple[int, int]] = Counter()
        self._lock = threading.Lock()
        self._cut_stream: Any = None

    def statistics(self) -> dict[str, Any]:
        """Routes, tiles decoded, and how many tiles were decoded more than once (0 unless the plan is broken)."""
        with self._lock:
            counts = list(self.decode_counts.values())
        return {"routes": describe_routes(self.routes), "tiles_decoded": sum(counts),
                "tiles_decoded_twice": sum(1 for c in counts if c > 1)}

    def iter_patches(self, handle: SlideHandle, coords: np.ndarray, patch_size: int,
                     chunk: int) -> Iterator[tuple[np.ndarray, Pixels]]:
        """Yield (rows int64 (b,), pixels uint8 (b, patch_size, patch_size, 3)); rows in row-band order, b <= chunk.

        Pixels are numpy, or torch on the decoder's device with `device_output`. Levels that cannot be read
        tile-once (and whole slides, see `tile_metas`) are read with `read_region`. Raises SlideError on a corrupt
        or unreadable tile.
        """
        _check_args(patch_size, chunk)
        arr = check_coords(coords, handle)
        metas = tile_metas(handle) or ()
        self.routes, self.decode_counts = [], Counter()
        yield from _pooled(self.threads, "tile-once",
                           lambda pool: self._iter_all(handle, arr, metas, patch_size, chunk, pool))

    def iter_level(self, meta: TilePageMeta, coords: np.ndarray, patch_size: int, chunk: int,
                   slide: str = "") -> Chunks:
        """`iter_patches` for patches of one described level, without a slide handle (benchmarks, device checks).

        Args:
            meta: The level (e.g. `tiles.page_meta` of a tifffile page).
            coords: int (N, 5) x, y, read_w, read_h, level in level-0 pixels (all at `meta.level`).
            patch_size: Output edge.
            chunk: Most patches per yielded chunk.
            slide: Name used in error messages.
        """
        _check_args(patch_size, chunk)
        arr = np.asarray(coords, dtype=np.int64)
        plan = plan_level(np.arange(arr.shape[0]), arr, meta.downsample, meta.grid)
        self.routes, self.decode_counts = [], Counter()
        yield from _pooled(self.threads, "tile-once",
                           lambda pool: self._iter_level(plan, meta, patch_size, chunk, pool, slide or meta.path))

    def _iter_all(self, handle: Any, coords: np.ndarray, metas: tuple[TilePageMeta | None, ...], patch_size: int,
                  chunk: int, pool: ThreadPoolExecutor) -> Chunks:
        """Each tiled level through `_iter_level`, then every other level's patches through `read_region`."""
        levels = coords[:, 4]
        tiled = {lv: meta for lv in np.unique(levels).tolist() if metas and (meta := metas[lv]) is not None}
        for lv, meta in tiled.items():
            plan = plan_level(np.flatnonzero(levels == lv), coords, meta.downsample, meta.grid)
            yield from self._iter_level(plan, meta, patch_size, chunk, pool, slide_name(handle))
        rest = np.flatnonzero(~np.isin(levels, list(tiled)))
        if rest.size:
            reason = region_reason(handle)
            self.routes += [Route(lv, "read_region", reason) for lv in np.unique(levels[rest]).tolist()]
            for rows, pixels in _region_chunks(handle, coords, rest, patch_size, chunk, pool, self.buffers):
                yield rows, self._output(pixels)

    def _route(self, meta: TilePageMeta) -> TileDecoder:
        """The decoder for this level: the run's, or `cpu` when the run's cannot decode it exactly."""
        why = self.decoder.unsupported(meta)
        with self._lock:
            self.routes.append(Route(meta.level, "cpu" if why else self.decoder.name, why or ""))
        return self._cpu if why else self.decoder

    def _iter_level(self, plan: LevelPlan, meta: TilePageMeta, patch_size: int, chunk: int,
                    pool: ThreadPoolExecutor, slide: str) -> Chunks:
        """Chunks of `plan`'s patches cut from tiles decoded once, in batches; the next chunk's tiles decode ahead."""
        decoder = self._route(meta)
        try:
            fd = os.open(meta.path, os.O_RDONLY)
        except OSError as exc:
            raise SlideError(f"cannot open for tile reads: {describe(exc)}", slide=slide) from exc
        cache: dict[int, tuple[Future[DecodedTiles], int]] = {}  # tile -> the batch decoding it, its place there
        bounds = chunk_bounds(len(plan), chunk)

        def submit(b: int, e: int) -> None:
            new = [t for t in plan.tiles_of(b, e).tolist() if t not in cache]
            for k in range(0, len(new), decoder.batch_size):
                group = new[k : k + decoder.batch_size]
                fut = pool.submit(self._load_batch, fd, meta, group, decoder, slide)
                cache.update({t: (fut, i) for i, t in enumerate(group)})

        try:
            if bounds:
                submit(*bounds[0])
            for k, (b, e) in enumerate(bounds):
                if k + 1 < len(bounds):
                    submit(*bounds[k + 1])  # decode ahead while this chunk is cut and consumed
                now = plan.tiles_of(b, e)
                results = {t: cache[t][0].result() for t in now.tolist()}
                decoded = {t: results[t].pixels[cache[t][1]] for t in now.tolist()}
                ready = list({id(r): r.ready for r in results.values() if r.ready is not None}.values())
                out = self._cut(plan, decoded, ready, b, e, patch_size)
                for tile in plan.done_after(e, now).tolist():
                    del cache[tile]
                yield plan.rows[b:e].copy(), out
        finally:
            futures = {id(f): f for f, _ in cache.values()}.values()
            for fut in futures:
                fut.cancel()
            # Decodes already running still read from fd: wait for them before closing it.
            for fut in futures:
                if not fut.cancelled():
                    fut.exception()
            os.close(fd)

    def _load_batch(self, fd: int, meta: TilePageMeta, tiles: list[int], decoder: TileDecoder,
                    slide: str) -> DecodedTiles:
        """Read `tiles` and decode the present ones in one call; None for missing tiles (black)."""
        raws: list[bytes] = []
        present: list[int] = []
        for i, tile in enumerate(tiles):
            try:
                raw = read_raw(fd, meta, tile)
            except Exception as exc:  # noqa: BLE001 - I/O errors on a bad file are per-slide failures
                raise tile_error(meta, tile, exc, slide) from exc
            if raw is not None:
                raws.append(raw)
                present.append(i)
        pixels: list[Any] = [None] * len(tiles)
        if not raws:
            return DecodedTiles(pixels)
        ids = [tiles[i] for i in present]
        result = self._decode(decoder, raws, ids, meta, slide)
        for i, tile, px in zip(present, ids, result.pixels, strict=True):
            pixels[i] = check_tile(px, meta, tile, slide)
        with self._lock:
            self.decode_counts.update((meta.level, t) for t in ids)
        return DecodedTiles(pixels, result.ready)

    def _decode(self, decoder: TileDecoder, raws: list[bytes], ids: list[int], meta: TilePageMeta,
                slide: str) -> DecodedTiles:
        """One batch through `decoder`; on failure, tile by tile through `cpu`, which names the corrupt tile."""
        try:
            return decoder.decode_batch(raws, meta)
        except Exception as exc:  # isolate the bad tile (or a GPU-only failure) with the reference; bugs propagate
            if is_bug(exc):
                raise
            failure = exc
        pixels = []
        for raw, tile in zip(raws, ids, strict=True):
            try:
                pixels.append(self._cpu.decode_batch([raw], meta).pixels[0])
            except Exception as exc:  # noqa: BLE001 - the corrupt tile: a per-slide failure
                raise tile_error(meta, tile, exc, slide) from exc
        with self._lock:  # the reference decoded what the backend refused: note it for the report
            self.routes.append(Route(meta.level, "cpu", f"{decoder.name} failed a batch: {describe(failure)}"))
        return DecodedTiles(pixels)

    # -- cutting --------------------------------------------------------------------------------------------------

    def _cut(self, plan: LevelPlan, decoded: dict[int, Any], ready: list[Any], b: int, e: int,
             patch_size: int) -> Any:
        if self.cutter == "cv2" or (self.cutter == "auto" and self.decoder.device == "cpu"):
            return self._output(_cut_range(plan, decoded, self.buffers.empty((e - b, patch_size, patch_size, 3)), b))
        if self.decoder.device == "cpu":
            return self._output(_torch_cut_range(plan, decoded, b, e, patch_size, "cpu"))
        import torch

        if self._cut_stream is None:
            self._cut_stream = torch.cuda.Stream(device=self.decoder.device, priority=-1)
        with torch.cuda.stream(self._cut_stream):
            for event in ready:
                self._cut_stream.wait_event(event)
            out = _torch_cut_range(plan, decoded, b, e, patch_size, self.decoder.device)
            done = torch.cuda.Event()
            done.record(self._cut_stream)
        # In this worker thread, never on the event loop: after it, tiles may be freed and `out` read on any stream
        # (a consumer on another stream calls `out.record_stream(its_stream)` before use).
        done.synchronize()
        return self._output(out)

    def _output(self, pixels: Any) -> Any:
        """Pixels in the form the consumer asked for: numpy on the host, or torch on the decoder's device."""
        if self.device_output:
            import torch

            return torch.as_tensor(pixels).to(self.decoder.device, non_blocking=True)
        return to_host(pixels)


def _cut_range(plan: LevelPlan, decoded: dict[int, np.ndarray | None], out: np.ndarray, b: int) -> np.ndarray:
    """Cut (and resize as upstream to `out`'s edge) the patches at plan positions [b, b + len(out)) into `out`."""
    patch_size, e = out.shape[1], b + out.shape[0]
    for i in range(b, e):
        rect = (int(plan.rx[i]), int(plan.ry[i]), int(plan.rw[i]), int(plan.rh[i]))
        needed = plan.tiles[plan.starts[i] : plan.starts[i + 1]]
        out[i - b] = resize_patch(cut_patch(decoded, plan.grid, rect, needed), patch_size)
    return out


def _torch_cut_range(plan: LevelPlan, decoded: dict[int, Any], b: int, e: int, patch_size: int,
                     device: str) -> Any:
    """`_cut_range` in torch on `device` (`backends.patches.cut_patches`), one call per distinct read size."""
    import torch

    from .patches import cut_patches

    rects = np.stack([plan.rx[b:e], plan.ry[b:e], plan.rw[b:e], plan.rh[b:e]], axis=1).astype(np.int64)
    sizes, which = np.unique(rects[:, 2:], axis=0, return_inverse=True)
    if len(sizes) == 1:
        return cut_patches(decoded, plan.grid, rects, patch_size, device)
    out = torch.empty((e - b, patch_size, patch_size, 3), dtype=torch.uint8, device=device)
    for k in range(len(sizes)):
        sel = np.flatnonzero(which.reshape(-1) == k)
        out[torch.from_numpy(sel).to(device)] = cut_patches(decoded, plan.grid, rects[sel], patch_size, device)
    return out
