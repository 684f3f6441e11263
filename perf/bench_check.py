"""Benchmark: `atlaspatch check` on many small H5s — files/s and memory as the file count grows.

Writes `--files` small outputs (upstream's schema plus one feature set; `--patches` rows each) into a temporary
folder, then, in the same run:
- baseline: a plain serial h5py loop that opens each file and reads its attributes, coords and features (what a
  hand-written checker does, with none of our checks);
- ours: `qc.check.iter_verdicts` on 1 thread and on the default pool.
Files/s for each and their ratio; resident memory (RSS) after 10 % and after 100 % of the files of our default pool
(flat memory: the two stay close), and the process's peak RSS.

Prints ONE JSON line and appends it to perf/results/bench_check.jsonl. Usage:
    python perf/bench_check.py [--files 10000] [--patches 64] [--dim 32] [--no-append]
"""

from __future__ import annotations

import argparse
import datetime as dt
import resource
import shutil
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
from common import machine, write_result  # perf/common.py (scripts run from perf/)

from atlaspatch_stream.qc.check import iter_verdicts


def write_outputs(out: Path, files: int, patches: int, dim: int) -> None:
    """`files` complete H5s under `out/patches`, upstream's schema plus `features/bench` (dim `dim`)."""
    folder = out / "patches"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    coords = np.zeros((patches, 5), np.int32)
    coords[:, :2] = rng.integers(0, 8000, size=(patches, 2))
    coords[:, 2:4] = 512
    features = rng.random((patches, dim), dtype=np.float32)
    passports = np.array([b"p"] * patches, dtype="S160")
    for i in range(files):
        with h5py.File(folder / f"s{i:06d}.h5", "w") as f:
            f.create_dataset("coords", data=coords)
            f.create_dataset("passports", data=passports)
            f.create_dataset("features/bench", data=features)
            f.attrs.update({"patch_size": 256, "patch_size_level0": 512, "level0_magnification": 40,
                            "target_magnification": 20, "overlap": 0, "level0_width": 8192, "level0_height": 8192,
                            "wsi_path": f"/gone/s{i:06d}.svs", "filename": f"s{i:06d}.svs", "num_patches": patches})


def baseline(out: Path) -> int:
    """Open every H5 and read what a checker must read, serially, checking nothing."""
    n = 0
    for path in sorted((out / "patches").glob("*.h5")):
        with h5py.File(path, "r") as f:
            dict(f.attrs)
            f["coords"][...]
            f["features/bench"][...]
        n += 1
    return n


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 1e6


def ours(out: Path, threads: int | None, total: int) -> tuple[int, list[float]]:
    """Every verdict (all must be ok); RSS sampled after 10 % and 100 % of the files."""
    n, rss = 0, []
    for verdict in iter_verdicts(out, threads=threads):
        assert verdict.code == "ok", verdict
        n += 1
        if n == max(1, total // 10):
            rss.append(_rss_mb())
    rss.append(_rss_mb())
    return n, rss


def _timed(fn, *args):  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - started


def main() -> None:
    """Parse flags, write the files, time baseline and ours, print the line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=10_000)
    p.add_argument("--patches", type=int, default=64)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_check_"))
    try:
        write_outputs(root, args.files, args.patches, args.dim)
        base_n, base_s = _timed(baseline, root)
        (one_n, _), one_s = _timed(ours, root, 1, args.files)
        (pool_n, rss), pool_s = _timed(ours, root, None, args.files)
        assert base_n == one_n == pool_n == args.files
    finally:
        shutil.rmtree(root, ignore_errors=True)
    line = {
        "bench": "check", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "files": args.files, "patches_per_file": args.patches, "dim": args.dim,
        "baseline_files_per_s": round(base_n / base_s, 1),
        "ours_1_thread_files_per_s": round(one_n / one_s, 1),
        "ours_pool_files_per_s": round(pool_n / pool_s, 1),
        "ratio_pool_vs_baseline": round(base_s / pool_s, 3),
        "rss_mb_after_10pct": round(rss[0], 1), "rss_mb_after_100pct": round(rss[-1], 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3, 1),
        "machine": machine("h5py", "numpy"),
    }
    write_result("bench_check", line, append=not args.no_append)


if __name__ == "__main__":
    main()
