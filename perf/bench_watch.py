"""The daemon's costs: arrival-to-H5 latency, idle CPU over a big ledger, memory over many slides.

    python perf/bench_watch.py [--latency-slides 5] [--ledger-slides 10000] [--idle-s 120] [--memory-slides 1000]

1. **Latency**: a running `atlaspatch watch` (events mode, `--settle-s 2`) gets slides renamed into place one at a
   time; the time from the rename to the finished H5 is compared, in the same run, with `atlaspatch process` on the
   same slide (its processing time from the run report: start-up and model loading excluded). Overhead = latency - settle - processing (goal < 2 s).
2. **Idle CPU**: a ledger holding `--ledger-slides` done slides (and their files in INPUT), a daemon on it with a
   60 s rescan: CPU seconds per wall second over `--idle-s`, against the same daemon over an empty folder
   (goal < 1 % of a core).
3. **Memory**: `--memory-slides` small slides through one daemon (`--once`, coordinates only); RSS at each quarter,
   growth in MB per 100 slides (flat ≈ 0).

Prints one JSON line per part and appends them to perf/results/bench_watch.jsonl.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
from common import machine, write_result  # perf/common.py (scripts run from perf/)

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "from atlaspatch_stream.cli import main; main()"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
GEOMETRY = ["--patch-size", "256", "--target-mag", "20", "--segmenter", "otsu", "--device", "cpu"]


def _watch(folder: Path, out: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([*CLI, "watch", str(folder), "-o", str(out), *GEOMETRY, "--allow-root", *extra],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def latency(work: Path, n: int, settle_s: float) -> dict[str, float]:
    """Median arrival-to-H5 latency of the daemon and processing time of `process`, on the same slides."""
    from atlaspatch_stream.testing.synthetic import write_synthetic_slide

    staging, folder, out = work / "staging", work / "in", work / "out"
    folder.mkdir(parents=True)
    slides = [write_synthetic_slide(staging / f"s{i}.svs", width=4096, height=3072, seed=i) for i in range(n)]
    processing = []
    for slide in slides:  # the baseline: the same work through `process`, its own per-slide seconds (start-up apart)
        subprocess.run([*CLI, "process", str(slide), "-o", str(work / "ref"), *GEOMETRY, "--feature-extractors",
                        "color_stats", "--force"], env=ENV, check=True, capture_output=True)
        processing.append(_report_seconds(work / "ref" / "atlaspatch-report.jsonl", str(slide)))
    proc = _watch(folder, out, "--feature-extractors", "color_stats", "--settle-s", str(settle_s),
                  "--watch-mode", "events", "--rescan-s", "60")
    time.sleep(15)  # models loaded, first scan done
    latencies = []
    try:
        for slide in slides:
            arrived = time.perf_counter()
            os.rename(slide, folder / slide.name)
            h5 = out / "patches" / f"{slide.stem}.h5"
            while not h5.exists():
                time.sleep(0.02)
            latencies.append(time.perf_counter() - arrived)
    finally:
        _stop(proc)
    latencies.sort()
    work_s = sorted(processing)[len(processing) // 2]
    median = latencies[len(latencies) // 2]
    return {"latency_s": round(median, 3), "settle_s": settle_s, "processing_s": round(work_s, 3),
            "overhead_s": round(median - settle_s - work_s, 3), "goal_overhead_s": 2.0}


def _report_seconds(report: Path, name: str) -> float:
    """The processing seconds of the last slide record named `name` (the path as given) in a run report."""
    import json

    records = [json.loads(line) for line in report.read_text().splitlines()]
    return next(r["seconds"] for r in reversed(records) if r.get("event") == "slide" and r.get("slide") == name)


def idle_cpu(work: Path, slides: int, window_s: float) -> dict[str, float]:
    """CPU share of an idle daemon over a ledger of `slides` done slides vs over an empty folder."""
    big, empty = work / "big", work / "empty"
    _fill_done_ledger(big, slides)
    (empty / "in").mkdir(parents=True)
    return {"slides_in_ledger": slides, "idle_cpu_pct": _idle(big, window_s),
            "baseline_empty_cpu_pct": _idle(empty, window_s), "goal_pct": 1.0}


def _idle(work: Path, window_s: float) -> float:
    proc = _watch(work / "in", work / "out", "--rescan-s", "60", "--watch-mode", "auto", "--settle-s", "30")
    try:
        time.sleep(30)  # start-up and the first scan are not idle time
        before, started = _cpu_s(proc.pid), time.perf_counter()
        time.sleep(window_s)
        used = _cpu_s(proc.pid) - before
        return round(100 * used / (time.perf_counter() - started), 3)
    finally:
        _stop(proc)


def _fill_done_ledger(work: Path, n: int) -> None:
    """`n` small files in INPUT, each recorded `done` in a ledger with the settings the daemon will use."""
    from atlaspatch_stream.config import geometry_fingerprint, load_config
    from atlaspatch_stream.daemon.complete import members, quick_fingerprint
    from atlaspatch_stream.daemon.ledger.facade import Ledger
    from atlaspatch_stream.daemon.ledger.states import Settings
    from atlaspatch_stream.daemon.ledger.store import LEDGER_FILE
    from atlaspatch_stream.daemon.watcher import IgnoreRules, scan_tree

    folder = work / "in"
    folder.mkdir(parents=True)
    for i in range(n):
        (folder / f"slide{i:05d}.svs").write_bytes(b"II*\x00" + i.to_bytes(4, "little"))
    config = load_config({"plan": {"patch_size": 256, "target_mag": 20}, "segment": {"segmenter": "otsu"},
                          "write": {"output": work / "out"}})
    settings = Settings(geometry_fingerprint(config, None), tuple(config.encode.extractors))
    state = config.watch.state_path(work / "out")
    state.mkdir(parents=True)

    async def fill() -> None:
        async with Ledger.open(state / LEDGER_FILE) as ledger:
            found = scan_tree(folder.resolve(), IgnoreRules((), ()), 1)
            await ledger.reconcile(found, startup=True, settings=settings)
            for name, c in found.items():
                fingerprint = quick_fingerprint(members(folder / c.source, c.kind), folder)
                await ledger.mark_ready(name, c.size, c.mtime_ns, fingerprint)
            while (taken := await ledger.take_next()) is not None:
                await ledger.finish_done(taken.after.slide_id, taken.after.version, "x.h5", settings)

    anyio.run(fill)


def memory(work: Path, n: int) -> dict[str, float]:
    """RSS of a `--once` daemon at each quarter of `n` small slides (coordinates only)."""
    from atlaspatch_stream.testing.synthetic import write_synthetic_slide

    folder, out = work / "in", work / "out"
    one = write_synthetic_slide(work / "one.svs", width=1024, height=768)
    folder.mkdir()
    for i in range(n):
        os.link(one, folder / f"s{i:05d}.svs")
    old = time.time() - 3600
    for path in folder.iterdir():
        os.utime(path, (old, old))
    proc = _watch(folder, out, "--once", "--settle-s", "1", "--watch-mode", "poll")
    marks, samples = [n // 4, n // 2, 3 * n // 4, n], {}
    try:
        while proc.poll() is None:
            done = len(list((out / "patches").glob("*.h5"))) if (out / "patches").exists() else 0
            for mark in marks:
                if done >= mark and mark not in samples:
                    samples[mark] = _rss_mb(proc.pid)
            time.sleep(0.2)
    finally:
        _stop(proc)
    first, last = samples.get(marks[0], 0.0), samples.get(marks[-2], 0.0)
    growth = (last - first) / max(1, (marks[-2] - marks[0]) / 100)
    return {"slides": n, "rss_mb": {str(k): round(v, 1) for k, v in sorted(samples.items())},
            "growth_mb_per_100_slides": round(growth, 2)}


def main() -> None:
    """Run the three parts and write one result line for each."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency-slides", type=int, default=5)
    parser.add_argument("--settle-s", type=float, default=2.0)
    parser.add_argument("--ledger-slides", type=int, default=10000)
    parser.add_argument("--idle-s", type=float, default=120.0)
    parser.add_argument("--memory-slides", type=int, default=1000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-watch-"))
    ENV["XDG_STATE_HOME"] = str(work / "state")  # the daemons' default state folders, inside the scratch folder
    os.environ["XDG_STATE_HOME"] = ENV["XDG_STATE_HOME"]  # and this process's view of them (`state_path`)
    try:
        notes = machine("atlaspatch-stream", "watchfiles")
        write_result("bench_watch", {"part": "latency", **latency(work / "lat", args.latency_slides, args.settle_s),
                                     "machine": notes})
        write_result("bench_watch", {"part": "idle", **idle_cpu(work / "idle", args.ledger_slides, args.idle_s),
                                     "machine": notes})
        write_result("bench_watch", {"part": "memory", **memory(work / "mem", args.memory_slides), "machine": notes})
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
