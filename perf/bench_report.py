"""Benchmark: `atlaspatch report` on 1,000 slides — seconds to build the gallery.

Writes `--slides` outputs as `process --qc` leaves them (an H5 with `--patches` coords and one feature set, a
512-px JPEG thumbnail and its mask under qc/thumbs/, the run report's stage and slide events), then, in the same
run, times `qc.check.check_outputs` alone (the floor: every H5 is opened anyway), the first `write_report`
(check + every card drawn + plots + page) and a rebuild with nothing changed (cards kept: what the daemon's timer
pays). Prints ONE JSON line and appends it to
perf/results/bench_report.jsonl. Usage:
    python perf/bench_report.py [--slides 1000] [--patches 400] [--no-append]
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
import orjson
from common import machine, write_result  # perf/common.py (scripts run from perf/)
from PIL import Image

from atlaspatch_stream.qc.check import check_outputs
from atlaspatch_stream.qc.report import write_report

STAGES = ("open", "segment", "plan", "read", "encode")


def write_outputs(out: Path, slides: int, patches: int) -> None:
    """`slides` outputs of a --qc run: H5s, thumbnails, masks and the run report."""
    rng = np.random.default_rng(0)
    (out / "patches").mkdir(parents=True)
    thumbs = out / "qc" / "thumbs"
    thumbs.mkdir(parents=True)
    yy, xx = np.mgrid[0:384, 0:512]
    events = [{"run": "bench", "time": 0.0, "event": "run_start", "command": "process", "settings": {}}]
    for i in range(slides):
        stem, n = f"s{i:05d}", int(rng.integers(patches // 2, patches * 2))
        _write_h5(out / "patches" / f"{stem}.h5", stem, n, rng)
        mask = (xx - 256) ** 2 / 200**2 + (yy - 192) ** 2 / 150**2 < 1.0 + 0.2 * rng.random()
        image = np.where(mask[..., None], np.array([180, 120, 200], np.uint8), np.uint8(245)).astype(np.uint8)
        Image.fromarray(image).save(thumbs / f"{stem}.jpg", quality=85)
        Image.fromarray((mask * 255).astype(np.uint8)).save(thumbs / f"{stem}.mask.png")
        name = f"slides/{stem}.svs"
        events += [{"run": "bench", "time": i * 0.5, "event": "stage", "slide": name, "stage": s,
                    "seconds": float(rng.random())} for s in STAGES]
        events.append({"run": "bench", "time": i * 0.5, "event": "slide", "slide": name, "status": "done",
                       "message": "", "h5": str(out / "patches" / f"{stem}.h5"), "num_patches": n,
                       "seconds": 2.0, "queues": {"patches": int(rng.integers(0, 8))}})
    events.append({"run": "bench", "time": slides * 0.5, "event": "run_end", "status": "completed",
                   "streams": {"patches": {"used": 0, "size": 8}}})
    (out / "atlaspatch-report.jsonl").write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events))


def _write_h5(path: Path, stem: str, n: int, rng: np.random.Generator) -> None:
    coords = np.zeros((n, 5), np.int32)
    coords[:, 0] = rng.integers(0, 40000, n)
    coords[:, 1] = rng.integers(0, 30000, n)
    coords[:, 2:4] = 512
    with h5py.File(path, "w") as f:
        f.create_dataset("coords", data=coords)
        f.create_dataset("passports", data=np.array([b"p"] * n, dtype="S160"))
        f.create_dataset("features/bench", data=rng.random((n, 16), dtype=np.float32))
        f.attrs.update({"patch_size": 256, "patch_size_level0": 512, "level0_magnification": 40,
                        "target_magnification": 20, "overlap": 0, "level0_width": 40960, "level0_height": 30720,
                        "wsi_path": f"slides/{stem}.svs", "filename": f"{stem}.svs", "num_patches": n, "mpp": 0.25})


def _timed(fn, *args) -> float:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started


def main() -> None:
    """Parse flags, write the outputs, time check and report, print the line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slides", type=int, default=1000)
    p.add_argument("--patches", type=int, default=400)
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_report_"))
    try:
        write_outputs(root, args.slides, args.patches)
        check_s = min(_timed(check_outputs, root) for _ in range(2))
        report_s = _timed(write_report, root)
        again_s = _timed(write_report, root)
        page_kb = (root / "qc" / "index.html").stat().st_size / 1e3
    finally:
        shutil.rmtree(root, ignore_errors=True)
    line = {
        "bench": "report", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "slides": args.slides, "patches_per_slide_mean": args.patches * 1.25,
        "check_s": round(check_s, 2), "report_s": round(report_s, 2), "rebuild_s": round(again_s, 2),
        "ratio_report_vs_check": round(report_s / check_s, 2),
        "page_kb": round(page_kb, 1), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3, 1),
        "machine": machine("h5py", "matplotlib", "jinja2"),
    }
    write_result("bench_report", line, append=not args.no_append)


if __name__ == "__main__":
    main()
