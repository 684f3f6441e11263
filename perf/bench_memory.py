"""Memory flat in the number of slides: RSS sampled as many small slides stream through the pipeline.

    python perf/bench_memory.py [--slides 200]
    python perf/bench_memory.py --process resnet18 [--slides 200] [--against 20]

Writes one small synthetic slide and links it under `--slides` names. Without `--process`: runs the pipeline
(`segment-and-get-coords`: otsu, fast mode) in this process and records its RSS after every slide; the JSON line has
RSS at 25 %, 50 %, 75 % and 100 % of the slides and the growth between the first and last quarter (MB per 100 slides;
flat ≈ 0). With `--process ENCODER`: runs `atlaspatch process` (otsu, that encoder with seeded random local weights,
the CLI's own allocator settings and trimming) as a child on `--against` slides and then on `--slides` slides,
sampling the child's RSS every 0.2 s; the line has each run's peak RSS, RSS at the quarters of its wall time, and the
peak ratio (flat ≈ 1.0). Appends the line to perf/results/bench_memory.jsonl.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import anyio
from common import machine, write_result  # perf/common.py (scripts run from perf/)

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


def linked_slides(base: Path, folder: Path, n: int) -> Path:
    """`folder` holding `n` symbolic links to the slide `base`."""
    folder.mkdir()
    for i in range(n):
        (folder / f"s{i:04d}.svs").symlink_to(base)
    return folder


def cli_rss(command: list[str]) -> tuple[float, list[float], float]:
    """Run `command` and sample its RSS every 0.2 s: (peak RSS MB from the kernel's high-water mark, the samples,
    wall seconds)."""
    import subprocess

    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    samples, peak = [], 0.0
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as fh:
                fields = dict(line.split(":", 1) for line in fh if ":" in line)
            samples.append(int(fields["VmRSS"].split()[0]) / 1024)
            peak = max(peak, int(fields["VmHWM"].split()[0]) / 1024)
        except (OSError, KeyError, ValueError):
            pass
        time.sleep(0.2)
    if proc.returncode:
        raise SystemExit(f"process failed ({proc.returncode}):\n{proc.stderr.read()[-2000:]}")
    return round(peak, 1), samples, time.perf_counter() - started


def process_flat(args: argparse.Namespace) -> dict:
    """`atlaspatch process` with an encoder on `--against` and on `--slides` slides: peak RSS of each and its ratio."""
    import torch
    from safetensors.torch import save_file

    from atlaspatch_stream.backends.encoders.registry import get_spec
    from atlaspatch_stream.testing.synthetic import write_synthetic_slide

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = write_synthetic_slide(Path(tmp) / "base.svs", width=4096, height=3072, seed=5)
        torch.manual_seed(0)
        weights = Path(tmp) / f"{args.process}.safetensors"
        save_file({k: v.contiguous() for k, v in get_spec(args.process).build().state_dict().items()}, str(weights))
        for n in (args.against, args.slides):
            folder = linked_slides(base, Path(tmp) / f"slides{n}", n)
            command = [str(Path(sys.executable).with_name("atlaspatch")), "process", str(folder), "-o",
                       str(Path(tmp) / f"out{n}"), "--segmenter", "otsu", "--device", "cpu", "--patch-size", "224",
                       "--target-mag", "20", "--feature-extractors", args.process,
                       "--weights", f"{args.process}={weights}"]
            peak, samples, wall = cli_rss(command)
            quarters = [round(samples[max(0, int(len(samples) * q) - 1)], 1) for q in (0.25, 0.5, 0.75, 1.0)]
            runs[n] = {"peak_rss_mb": peak, "rss_mb_at_quarters_of_wall": quarters, "wall_s": round(wall, 1)}
    return {"bench": "memory", "date": time.strftime("%Y-%m-%d"), "job": f"process --feature-extractors {args.process}",
            "slide_px": [4096, 3072], "runs": {str(n): r for n, r in runs.items()},
            "peak_ratio": round(runs[args.slides]["peak_rss_mb"] / runs[args.against]["peak_rss_mb"], 3),
            "machine": machine("torch")}


def main() -> None:
    """Measure and print one JSON line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--slides", type=int, default=200)
    parser.add_argument("--process", metavar="ENCODER", help="measure `atlaspatch process` with this encoder")
    parser.add_argument("--against", type=int, default=20, help="with --process: the smaller slide count")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.process:
        write_result("bench_memory", process_flat(args))
        return
    from atlaspatch_stream.config import load_config
    from atlaspatch_stream.testing.synthetic import write_synthetic_slide

    with tempfile.TemporaryDirectory() as tmp:
        base = write_synthetic_slide(Path(tmp) / "base.svs", width=4096, height=3072, seed=5)
        folder = linked_slides(base, Path(tmp) / "slides", args.slides)
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
