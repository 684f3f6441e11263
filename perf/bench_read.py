"""Benchmark: patches/s of the tile-once reader vs per-patch tiffslide / openslide `read_region` (upstream's way).

Slides: the real CMU-1-Small-Region SVS, and a large synthetic Aperio-like SVS (JPEG tiles, RGB-coded, 240 px) made
by tiling CMU-1's pixels, written once to a temporary folder. Configurations: 256-px patches read at 256 and 512-px
reads resized to 256 (cv2 INTER_LINEAR, as upstream), at level 0, on a lattice in row-major order, 1 and 2 threads.
Baselines read each patch with `read_region(...).convert("RGB")` (+ cv2.resize), one library handle per thread for
tiffslide, one shared handle for OpenSlide (its tile cache included, as in upstream), each run on a fresh handle.

Prints ONE JSON line and appends it to perf/results/bench_read.jsonl. Usage:
    python perf/bench_read.py [--size 20000] [--max-patches 1200] [--no-append]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import tifffile
import tiffslide
from common import machine, write_result  # perf/common.py (scripts run from perf/)

from atlaspatch_stream.backends.readers import TileOnceReader, supports_tile_once
from atlaspatch_stream.items import SlideInfo

ROOT = Path(__file__).resolve().parents[1]
SLIDES = Path(os.environ.get("ATLASPATCH_TEST_SLIDES", ROOT.parent / "shared" / "slides"))
CMU = SLIDES / "aperio" / "CMU-1-Small-Region.svs"
TILE = 240


class BenchHandle:
    """A minimal tiffslide-backed SlideHandle (used when the project's `open_slide` is unavailable)."""

    backend = "tiffslide"

    def __init__(self, path: Path) -> None:
        self.path = self.tiff_path = Path(path)
        self.name = self.path.name
        self._slide = tiffslide.TiffSlide(path)
        self._lock = threading.Lock()
        dims = tuple((int(w), int(h)) for w, h in self._slide.level_dimensions)
        self.info = SlideInfo(
            str(path),
            "tiffslide",
            dims[0][0],
            dims[0][1],
            dims,
            tuple(self._slide.level_downsamples),
            None,
            None,
        )

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        with self._lock:
            return np.asarray(self._slide.read_region((x, y), level, (width, height)).convert("RGB"))

    def close(self) -> None:
        self._slide.close()


def open_handle(path: Path) -> object:
    """The project's slide handle when available, else `BenchHandle`."""
    try:
        from atlaspatch_stream.backends.slides import open_slide

        return open_slide(path)
    except ImportError:
        return BenchHandle(path)


def write_large_svs(path: Path, size: int) -> Path:
    """A size x size Aperio-like SVS: CMU-1's pixels tiled, JPEG RGB-coded tiles (no APP14/JFIF), 240-px tiles."""
    with tiffslide.TiffSlide(CMU) as slide:
        src = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    h, w = src.shape[:2]
    big = np.tile(src, (2, 2, 1))  # wrap-around source for tiles that straddle CMU-1's border

    def tiles():
        for ty in range(0, size, TILE):
            for tx in range(0, size, TILE):
                oy, ox = ty % h, tx % w
                yield big[oy : oy + TILE, ox : ox + TILE]

    desc = f"Aperio Image Library v12.0.0\r\n{size}x{size} [0,0 {size}x{size}] ({TILE}x{TILE}) JPEG/RGB Q=80|AppMag = 20|MPP = 0.499"
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(
            tiles(),
            shape=(size, size, 3),
            dtype=np.uint8,
            tile=(TILE, TILE),
            photometric="rgb",
            compression="jpeg",
            compressionargs={"outcolorspace": "rgb", "level": 80},
            description=desc,
            metadata=None,
        )
        thumb = cv2.resize(src, (w // 8, h // 8), interpolation=cv2.INTER_AREA)
        tw.write(
            thumb, photometric="rgb", description="Aperio Image Library v12.0.0\r\nthumbnail", metadata=None
        )
    return path


def lattice(width: int, height: int, read: int, max_patches: int) -> np.ndarray:
    """Row-major lattice of read x read patches at level 0 (step = read), the first `max_patches` rows kept."""
    xs, ys = np.meshgrid(np.arange(0, width - read + 1, read), np.arange(0, height - read + 1, read))
    n = min(xs.size, max_patches)
    coords = np.stack(
        [xs.ravel(), ys.ravel(), np.full(xs.size, read), np.full(xs.size, read), np.zeros(xs.size)], 1
    )
    return coords[:n].astype(np.int32)


def upstream_patch(
    read: Callable[[int, int, int, int], np.ndarray], row: np.ndarray, patch: int
) -> np.ndarray:
    """Upstream's per-patch path: read_region -> RGB array -> cv2.resize when the read size differs."""
    x, y, w, h, _ = (int(v) for v in row)
    rgb = read(x, y, w, h)
    return rgb if rgb.shape[0] == patch and rgb.shape[1] == patch else cv2.resize(rgb, (patch, patch))


def run_tiffslide(path: Path, coords: np.ndarray, patch: int, threads: int) -> float:
    """Seconds to read every patch with tiffslide, one TiffSlide per thread."""
    local = threading.local()

    def read(x: int, y: int, w: int, h: int) -> np.ndarray:
        if not hasattr(local, "slide"):
            local.slide = tiffslide.TiffSlide(path)
        return np.asarray(local.slide.read_region((x, y), 0, (w, h)).convert("RGB"))

    return _timed_pool(lambda r: upstream_patch(read, r, patch), coords, threads)


def run_openslide(path: Path, coords: np.ndarray, patch: int, threads: int) -> float:
    """Seconds to read every patch with one (thread-safe) OpenSlide handle, fresh so its tile cache starts cold."""
    import openslide

    slide = openslide.OpenSlide(str(path))

    def read(x: int, y: int, w: int, h: int) -> np.ndarray:
        return np.asarray(slide.read_region((x, y), 0, (w, h)).convert("RGB"))

    try:
        return _timed_pool(lambda r: upstream_patch(read, r, patch), coords, threads)
    finally:
        slide.close()


def _timed_pool(fn: Callable[[np.ndarray], np.ndarray], coords: np.ndarray, threads: int) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(fn, coords, chunksize=16):
            pass
    return time.perf_counter() - start


def run_tile_once(path: Path, coords: np.ndarray, patch: int, threads: int) -> float:
    """Seconds for the tile-once reader (slide opening included, as each slide pays it once)."""
    start = time.perf_counter()
    handle = open_handle(path)
    try:
        assert supports_tile_once(handle), "tile-once not chosen for the benchmark slide"
        for _ in TileOnceReader(threads=threads).iter_patches(handle, coords, patch, 64):  # type: ignore[arg-type]
            pass
    finally:
        handle.close()  # type: ignore[attr-defined]
    return time.perf_counter() - start


def check_identical(path: Path, coords: np.ndarray, patch: int) -> bool:
    """Tile-once pixels equal OpenSlide's per-patch pixels (+ upstream resize) on a sample of the grid."""
    import openslide

    sample = coords[:: max(1, len(coords) // 40)]
    handle = open_handle(path)
    slide = openslide.OpenSlide(str(path))
    try:
        got = {
            int(r): p
            for rows, px in TileOnceReader(2).iter_patches(handle, sample, patch, 16)  # type: ignore[arg-type]
            for r, p in zip(rows, px, strict=True)
        }
        return all(
            np.array_equal(
                got[i],
                upstream_patch(
                    lambda x, y, w, h: np.asarray(slide.read_region((x, y), 0, (w, h)).convert("RGB")),
                    row,
                    patch,
                ),
            )
            for i, row in enumerate(sample)
        )
    finally:
        slide.close()
        handle.close()  # type: ignore[attr-defined]


def bench_slide(path: Path, max_patches: int) -> dict[str, object]:
    """Rates (patches/s) per configuration, method and thread count, with ratios for 2 threads."""
    path.read_bytes()  # warm the page cache so every method starts equal
    with tiffslide.TiffSlide(path) as slide:
        width, height = slide.dimensions
    out: dict[str, object] = {"size": [width, height]}
    for name, read in (("256", 256), ("512to256", 512)):
        coords = lattice(width, height, read, max_patches)
        rates: dict[str, float] = {}
        for threads in (1, 2):
            for method, fn in (
                ("tile_once", run_tile_once),
                ("openslide", run_openslide),
                ("tiffslide", run_tiffslide),
            ):
                rates[f"{method}_t{threads}"] = round(len(coords) / fn(path, coords, 256, threads), 1)
        out[name] = {
            "patches": int(len(coords)),
            "rates": rates,
            "x_openslide_t2": round(rates["tile_once_t2"] / rates["openslide_t2"], 2),
            "x_tiffslide_t2": round(rates["tile_once_t2"] / rates["tiffslide_t2"], 2),
            "x_openslide_t1": round(rates["tile_once_t1"] / rates["openslide_t1"], 2),
            "x_tiffslide_t1": round(rates["tile_once_t1"] / rates["tiffslide_t1"], 2),
            "identical_to_openslide": check_identical(path, coords, 256),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=20000, help="side of the synthetic slide, pixels")
    parser.add_argument(
        "--max-patches", type=int, default=1200, help="patches per configuration (row-major prefix)"
    )
    parser.add_argument(
        "--no-append", action="store_true", help="print only; do not append to the results file"
    )
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    record: dict[str, Any] = {
        "bench": "read",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine("imagecodecs", "tiffslide", "openslide-python", "openslide-bin", "tifffile"),
        "max_patches": args.max_patches,
    }
    record["cmu1_small_region"] = bench_slide(CMU, args.max_patches)
    with tempfile.TemporaryDirectory(prefix="bench_read_") as tmp:
        start = time.perf_counter()
        big = write_large_svs(Path(tmp) / "large.svs", args.size)
        record["synthetic_write_s"] = round(time.perf_counter() - start, 1)
        record[f"synthetic_{args.size}"] = bench_slide(big, args.max_patches)
    write_result("bench_read", record, append=not args.no_append)


if __name__ == "__main__":
    main()
