"""Benchmark: the free-space checks cost nothing measurable per slide.

Writes the same slide with the H5 store (create with the planned sets' widths, begin every set, rows in encoder
batches, finalize), alternating slide by slide: with the free-space checks (the store as shipped) and with
`check_free_space` replaced by a no-op; the ratio is the median of the per-pair ratios. Also times the check alone (estimate + reservation sum + statvfs), and, for
context, the same file written the old way (plain h5py, sec2 driver, no fsync, no H5 thread), since the store now
writes through h5py's fileobj driver on one thread and fsyncs before the rename.

Prints ONE JSON line and appends it to perf/results/bench_space_check.jsonl. Usage:
    python perf/bench_space_check.py [--slides 6] [--patches 3000] [--rounds 5] [--out DIR] [--no-append]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from common import machine, write_result  # perf/common.py (scripts run from perf/)

from atlaspatch_stream.outputs import PASSPORT_DTYPE, SlideAttrs, h5store
from atlaspatch_stream.outputs.h5store import SlideH5, check_free_space, estimate_h5_bytes, passports

DIMS = {"color_stats": 9, "resnet18": 512}  # the encoders
WRITE_BATCH, BATCH = 8192, 32
ATTRS = SlideAttrs(256, 512, 40, 20, 0, 46000, 32914, "/slides/s.svs", "s.svs", mpp=0.25, magnification=40)


def _data(n: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    coords = np.zeros((n, 5), np.int32)
    coords[:, :2] = rng.integers(0, 40000, size=(n, 2))
    coords[:, 2:4] = 512
    return coords, {name: rng.random((n, d), dtype=np.float32) for name, d in DIMS.items()}


def ours(final: Path, coords: np.ndarray, feats: dict[str, np.ndarray]) -> None:
    """The store as the write stage drives it."""
    n = coords.shape[0]
    store = SlideH5.create(final, ATTRS, coords, final.stem, WRITE_BATCH, BATCH, DIMS)
    for name, dim in DIMS.items():
        store.begin_feature(name, dim)
    for start in range(0, n, BATCH):
        rows = np.arange(start, min(n, start + BATCH))
        for name in DIMS:
            store.write_rows(name, rows, feats[name][rows])
    store.finalize()


def old_sec2(final: Path, coords: np.ndarray, feats: dict[str, np.ndarray]) -> None:
    """The previous store's calls: sec2 driver, in the calling thread, no free-space check, no fsync."""
    n = coords.shape[0]
    tmp = final.with_name(f".{final.name}.tmp.old")
    with h5py.File(tmp, "w") as f:
        for key, value in ATTRS.ordered():
            f.attrs[key] = value
        cds = f.create_dataset("coords", shape=(0, 5), maxshape=(None, 5), chunks=(WRITE_BATCH, 5), dtype="int32")
        pds = f.create_dataset("passports", shape=(0,), maxshape=(None,), chunks=(WRITE_BATCH,), dtype=PASSPORT_DTYPE)
        for start in range(0, n, WRITE_BATCH):
            block = coords[start : start + WRITE_BATCH]
            stop = start + block.shape[0]
            cds.resize((stop, 5))
            cds[start:stop] = block
            pds.resize((stop,))
            pds[start:stop] = passports(final.stem, block, 40, 20, n)
        f.attrs["num_patches"] = n
        group = f.require_group("features")
        for name, dim in DIMS.items():
            group.create_dataset(f"__tmp_{name}", shape=(n, dim), maxshape=(None, dim), chunks=(BATCH, dim),
                                 dtype="float32")
        for start in range(0, n, BATCH):
            for name in DIMS:
                f["features"][f"__tmp_{name}"][start : start + BATCH] = feats[name][start : start + BATCH]
        for name in DIMS:
            group.move(f"__tmp_{name}", name)
    os.replace(tmp, final)


def _timed(fn: Callable[[], None]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _pair_round(out: Path, slides: int, data: tuple[np.ndarray, dict[str, np.ndarray]],
                writers: dict[str, Callable[..., None]]) -> dict[str, list[float]]:
    """Per-slide seconds of each writer, alternating writers slide by slide (drift on a shared machine cancels)."""
    times: dict[str, list[float]] = {tag: [] for tag in writers}
    for i in range(slides):
        for tag, writer in writers.items():
            final = out / "patches" / f"{tag}{i}.h5"
            times[tag].append(_timed(lambda final=final, writer=writer: writer(final, *data)))
            final.unlink()
    return times


def _check_alone(out: Path, n: int, repeats: int = 2000) -> float:
    """Seconds per free-space check as `create` makes it (estimate, reservations, statvfs)."""
    folder = out / "patches"
    dev = os.stat(folder).st_dev
    started = time.perf_counter()
    for _ in range(repeats):
        needed = estimate_h5_bytes(n, DIMS.values(), WRITE_BATCH, BATCH)
        check_free_space(folder, needed, reserved=h5store._reserved_on(dev))
    return (time.perf_counter() - started) / repeats


def _iqr_ms(values: list[float]) -> list[float]:
    q = statistics.quantiles(values, n=4)
    return [round(q[0] * 1e3, 2), round(q[2] * 1e3, 2)]


def main() -> None:
    """Run the interleaved rounds and print the result line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--slides", type=int, default=6)
    parser.add_argument("--patches", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: a temporary folder)")
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-space-"))
    (out / "patches").mkdir(parents=True, exist_ok=True)
    try:
        line = _measure(args, out)
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)
    write_result("bench_space_check", line, append=not args.no_append)


def _measure(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """All rounds, and the result line."""
    data = _data(args.patches)
    real_check = h5store.check_free_space

    def unchecked(final: Path, coords: np.ndarray, feats: dict[str, np.ndarray]) -> None:
        h5store.check_free_space = lambda *a, **k: None  # type: ignore[assignment]
        try:
            ours(final, coords, feats)
        finally:
            h5store.check_free_space = real_check

    writers = {"checked": ours, "unchecked": unchecked, "old_sec2": old_sec2}
    _pair_round(out, 1, data, writers)  # warm-up
    times: dict[str, list[float]] = {tag: [] for tag in writers}
    for _ in range(args.rounds):
        for tag, values in _pair_round(out, args.slides, data, writers).items():
            times[tag].extend(values)
    pair_ratio = statistics.median(c / u for c, u in zip(times["checked"], times["unchecked"], strict=True))
    med = {k: statistics.median(v) for k, v in times.items()}
    check_s = _check_alone(out, args.patches)
    line: dict[str, Any] = {
        "bench": "space_check",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "patches_per_slide": args.patches,
        "encoders": DIMS,
        "slides_per_round": args.slides,
        "rounds": args.rounds,
        "ms_per_slide_with_checks": round(med["checked"] * 1e3, 3),
        "ms_per_slide_without_checks": round(med["unchecked"] * 1e3, 3),
        "ratio_with_vs_without": round(pair_ratio, 4),
        "us_per_check_alone": round(check_s * 1e6, 2),
        "check_share_of_slide": round(check_s / med["checked"], 6),
        "ms_per_slide_old_sec2_store": round(med["old_sec2"] * 1e3, 3),
        "ratio_store_vs_old_sec2": round(med["checked"] / med["old_sec2"], 4),
        "h5_file_mb": round(estimate_h5_bytes(args.patches, DIMS.values(), WRITE_BATCH, BATCH) / 1e6, 2),
        "iqr_ms_with_checks": _iqr_ms(times["checked"]),
        "iqr_ms_without_checks": _iqr_ms(times["unchecked"]),
        "output_fs": str(out),
        "machine": machine("h5py", "numpy"),
    }
    return line


if __name__ == "__main__":
    main()
