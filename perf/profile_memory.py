"""Where the peak memory of `process` goes: host buffers by the code that allocated them, the model, activations.

    python perf/profile_memory.py --work DIR [--encoder resnet18] [--precision float16] [--batch 32]

Runs the pipeline once on the slides of a `bench_process.py --work DIR` folder (its slides and random weights) with
tracemalloc on (numpy reports its data buffers to it). A sampler thread snapshots the traced allocations whenever
their total reaches a new high, so the last snapshot is the peak; the live bytes at that moment are grouped by the
first frame inside this package (decoded tiles, patch chunks, batches, H5 writing ...). After the run: the RSS
a second copy of the loaded model adds, and torch's profiler's largest per-op CPU memory of one forward pass (torch's
CPU tensors are not seen by tracemalloc). Prints one JSON line and appends it to perf/results/profile_memory.jsonl.
tracemalloc slows the run several times: the wall time here is not a benchmark.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import anyio
from bench_process import make_config, peak_rss_mb, run_pipeline  # perf/ scripts run from perf/
from common import machine, write_result

PACKAGE = f"{os.sep}atlaspatch_stream{os.sep}"


def owner(trace: tracemalloc.Trace) -> str:
    """`module:function line` of the innermost frame in this package (else the innermost frame's file)."""
    for frame in trace.traceback:  # most recent first
        if PACKAGE in frame.filename:
            return f"{frame.filename.split(PACKAGE, 1)[1]}:{frame.lineno}"
    return Path(trace.traceback[0].filename).name if len(trace.traceback) else "?"


class PeakSampler:
    """Snapshots the traced allocations each time their total passes the previous high (checked every `every` s)."""

    def __init__(self, every: float = 0.2) -> None:
        self.every, self.high, self.snapshot = every, 0, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            current, _ = tracemalloc.get_traced_memory()
            if current > self.high * 1.05:
                self.high, self.snapshot = current, tracemalloc.take_snapshot()


def by_owner(snapshot: tracemalloc.Snapshot, top: int) -> dict[str, float]:
    """MB live per owning line at the snapshot, largest first."""
    sizes: dict[str, int] = {}
    for trace in snapshot.traces:
        key = owner(trace)
        sizes[key] = sizes.get(key, 0) + trace.size
    ranked = sorted(sizes.items(), key=lambda kv: -kv[1])
    return {k: round(v / 2**20, 1) for k, v in ranked[:top]}


def preload(config) -> None:  # noqa: ANN001
    """Import what the run imports and build its encoder once, so the trace holds the run's own buffers."""
    from atlaspatch_stream.assembly import RealBackends

    [encoder] = RealBackends(config).make_encoders().encoders
    encoder.warm_up()
    encoder.close()


def rss_mb() -> float:
    """Current resident set size (MB)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def model_and_activations(config) -> dict[str, float]:  # noqa: ANN001
    """RSS added by building and loading the encoder, and the profiler's peak CPU memory of one forward pass."""
    import numpy as np
    from torch.profiler import ProfilerActivity, profile

    from atlaspatch_stream.assembly import RealBackends

    before = rss_mb()
    [encoder] = RealBackends(config).make_encoders().encoders
    encoder.warm_up()
    loaded = rss_mb()
    size, batch = config.plan.patch_size, config.encode.batch_size
    pixels = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        encoder.encode(pixels)
    events = prof.key_averages()
    peak = max((e.cpu_memory_usage for e in events), default=0)
    return {"model_rss_mb": round(loaded - before, 1), "forward_top_op_cpu_memory_mb": round(peak / 2**20, 1),
            "batch_uint8_mb": round(pixels.nbytes / 2**20, 1)}


def main() -> int:
    """Profile one run; print and save one JSON line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", required=True, help="a bench_process.py --work folder (slides, weights)")
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--precision", default="float16")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--frames", type=int, default=12)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = Path(args.work)
    args.device, args.decoder, args.override = "cpu", "auto", "{}"
    config = make_config(args, folder, folder / f"{args.encoder}.safetensors", "out_profile")
    slides = sorted((folder / "slides").glob("*.svs"))
    preload(config)  # imports and the first model load outside the trace (tracing them takes minutes)
    tracemalloc.start(args.frames)
    started = time.perf_counter()
    with PeakSampler() as sampler:
        _, busy, _, results = anyio.run(run_pipeline, config, slides)
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert sampler.snapshot is not None
    pipeline_peak_rss = peak_rss_mb()
    model = model_and_activations(config)  # after the run: a second model here does not inflate its peak
    write_result("profile_memory", {
        "bench": "profile_memory", "date": time.strftime("%Y-%m-%d"), "encoder": args.encoder,
        "precision": args.precision, "batch": args.batch, "slides": len(slides),
        "patches": sum(r.num_patches or 0 for r in results), "wall_s_under_tracemalloc": round(
            time.perf_counter() - started, 1),
        "traced_peak_mb": round(traced_peak / 2**20, 1), "peak_snapshot_mb": round(sampler.high / 2**20, 1),
        "peak_rss_mb": pipeline_peak_rss, "live_at_peak_by_owner_mb": by_owner(sampler.snapshot, args.top),
        **model, "machine": machine("torch", "numpy"),
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
