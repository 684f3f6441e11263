"""Memory flat in the number of slides: `segment-and-get-coords` over many small slides, RSS sampled as they finish.

    python perf/bench_memory.py [--slides 200]

Writes one small synthetic slide and links it under `--slides` names, runs the pipeline (otsu, fast mode) and records
the process RSS after every slide. Prints one JSON line with RSS at 25 %, 50 %, 75 % and 100 % of the slides and the
growth between the first and last quarter (MB per 100 slides; flat ≈ 0). Appends it to perf/results/bench_memory.jsonl.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import anyio
from common import write_result  # perf/common.py (scripts run from perf/)

ROOT = Path(__file__).resolve().parents[1]


def rss_mb() -> float:
    """Current resident set size in MB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


async def run(config, folder: Path) -> list[float]:
    """RSS after each finished slide."""
    from atlaspatch_stream.api import make_jobs, open_pipeline

    samples: list[float] = []
    async with open_pipeline(config, command="bench-memory") as pipeline, anyio.create_task_group() as tg:

        async def feed() -> None:
            for job in make_jobs([folder], config):
                await pipeline.submit(job)
            await pipeline.close_input()

        tg.start_soon(feed)
        async for result in pipeline.results():
            assert result.status == "done", result.message
            samples.append(rss_mb())
    return samples


def main() -> None:
    """Measure and print one JSON line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--slides", type=int, default=200)
    args = parser.parse_args()
    from atlaspatch_stream.config import load_config
    from atlaspatch_stream.testing.synthetic import write_synthetic_slide

    with tempfile.TemporaryDirectory() as tmp:
        base = write_synthetic_slide(Path(tmp) / "base.svs", width=4096, height=3072, seed=5)
        folder = Path(tmp) / "slides"
        folder.mkdir()
        for i in range(args.slides):
            (folder / f"s{i:04d}.svs").symlink_to(base)
        config = load_config({
            "plan": {"patch_size": 256, "target_mag": 20},
            "segment": {"segmenter": "otsu", "device": "cpu"},
            "write": {"output": Path(tmp) / "out"},
        }, environ={})
        started = time.perf_counter()
        samples = anyio.run(run, config, folder)
        wall = time.perf_counter() - started
    n = len(samples)
    quarter = [round(samples[max(0, int(n * q) - 1)], 1) for q in (0.25, 0.5, 0.75, 1.0)]
    growth = (samples[-1] - samples[n // 4 - 1]) / max(1, n - n // 4) * 100
    line = {"bench": "memory", "date": time.strftime("%Y-%m-%d"), "slides": n, "wall_s": round(wall, 1),
            "rss_mb_at_quarters": quarter, "growth_mb_per_100_slides": round(growth, 2),
            "peak_rss_mb": round(max(samples), 1)}
    write_result("bench_memory", line)


if __name__ == "__main__":
    sys.exit(main())
