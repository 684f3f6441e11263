"""The distributed path's cost and gain: the same slides through the local pipeline, then through the Ray engine
with 1 and with 2 local workers, in one run.

    python perf/bench_scale.py [--slides 8] [--size 6144] [--encoder color_stats]

Starts a private local Ray cluster (as `--ray-address local`). Prints one JSON line: wall seconds of each run, with
and without start-up (the local pipeline's models and stages; the Ray workers' placement, imports and models), the
throughput ratio of 2 workers over 1, and the per-slide overhead of the distributed path (Ray with 1 worker minus the
local pipeline, per slide, start-up excluded). Appends the line
to perf/results/bench_scale.jsonl. On a 2-core machine the two workers share the cores the local pipeline already
keeps busy, so the ratio shows what scheduling costs there; on a cluster each worker brings its own GPU.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import machine, write_result  # perf/common.py (scripts run from perf/)


def write_slides(folder: Path, n: int, size: int) -> list[Path]:
    """`n` synthetic 40× slides of about size × 0.75·size pixels."""
    from atlaspatch_stream.testing.synthetic import write_synthetic_slide

    return [write_synthetic_slide(folder / f"bench_{i}.svs", width=size, height=int(size * 0.75), seed=20 + i,
                                  levels=(1, 4, 16)) for i in range(n)]


def make_config(out: Path, encoder: str):
    """otsu, `encoder` on CPU, 224-pixel patches at 20×."""
    from atlaspatch_stream.config import load_config

    return load_config({"plan": {"patch_size": 224, "target_mag": 20},
                        "segment": {"segmenter": "otsu", "device": "cpu"},
                        "encode": {"extractors": (encoder,), "device": "cpu"},
                        "write": {"output": out}}, environ={})


def local_run(slides: Path, out: Path, encoder: str) -> tuple[float, float, int]:
    """Wall seconds, start-up seconds (models loaded, stages ready) and patches of the local pipeline."""
    import anyio

    from atlaspatch_stream import api, sync

    config = make_config(out, encoder)
    jobs = api.make_jobs([slides], config)

    async def run() -> tuple[float, int]:
        opened = time.perf_counter()
        async with api.open_pipeline(config) as pipeline:
            start = time.perf_counter() - opened
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: _feed(pipeline, jobs))
                patches = 0
                async with pipeline.results() as results:
                    async for result in results:
                        assert result.status == "done", result.message
                        patches += result.num_patches or 0
        return start, patches

    started = time.perf_counter()
    start, patches = sync.run(run)
    return time.perf_counter() - started, start, patches


async def _feed(pipeline, jobs) -> None:
    for job in jobs:
        await pipeline.submit(job)
    await pipeline.close_input()


def ray_run(slides: Path, out: Path, encoder: str, workers: int) -> tuple[float, float, int]:
    """Wall seconds, workers' start-up seconds and patches of the Ray engine with `workers` CPU workers."""
    from atlaspatch_stream import api, sync
    from atlaspatch_stream.distributed.ray_engine import RayEngine, RayOptions

    config = make_config(out, encoder)
    engine = RayEngine(config, options=RayOptions(workers=workers))
    jobs = api.make_jobs([slides], config)
    started = time.perf_counter()
    summary = sync.run(lambda: engine.process_slides(jobs))
    wall = time.perf_counter() - started
    assert summary.ok, [r.message for r in summary.failed]
    return wall, engine.start_s, sum(r.num_patches or 0 for r in summary.results)


def main() -> None:
    """Run the three measurements and print one JSON line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--slides", type=int, default=8)
    parser.add_argument("--size", type=int, default=6144)
    parser.add_argument("--encoder", default="color_stats")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_slides(folder / "slides", args.slides, args.size)
        local_s, local_start, patches = local_run(folder / "slides", folder / "local", args.encoder)
        ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, logging_level=logging.WARNING)
        try:
            runs = {}
            for workers in (1, 2):
                out = folder / f"ray{workers}"
                wall, start, ray_patches = ray_run(folder / "slides", out, args.encoder, workers)
                assert ray_patches == patches
                runs[workers] = (wall, start)
                shutil.rmtree(out)
        finally:
            ray.shutdown()
    work = {w: wall - start for w, (wall, start) in runs.items()}
    local_work = local_s - local_start
    line = {
        "bench": "scale", "date": time.strftime("%Y-%m-%d"), "encoder": args.encoder, "slides": args.slides,
        "slide_px": [args.size, int(args.size * 0.75)], "patches": patches,
        "local_wall_s": round(local_s, 2), "local_start_s": round(local_start, 2),
        "local_work_s": round(local_work, 2),
        "ray_wall_s": {str(w): round(wall, 2) for w, (wall, _) in runs.items()},
        "ray_workers_start_s": {str(w): round(start, 2) for w, (_, start) in runs.items()},
        "ray_work_s": {str(w): round(s, 2) for w, s in work.items()},
        "throughput_ratio_2_over_1_workers": round(work[1] / work[2], 3),
        "per_slide_overhead_s": round((work[1] - local_work) / args.slides, 3),
        "slides_per_h": {"local": round(args.slides / local_work * 3600, 1),
                         **{f"ray_{w}": round(args.slides / s * 3600, 1) for w, s in work.items()}},
        "machine": machine("ray", "torch", "anyio"),
    }
    write_result("bench_scale", line)


if __name__ == "__main__":
    sys.exit(main())
