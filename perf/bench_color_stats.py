"""`color_stats` on CPU: this tree's implementation against an earlier commit's and against the torch ops.

    python perf/bench_color_stats.py [--batch 32] [--patch 224] [--seconds 8] [--baseline-rev 1ea700c]

Two baselines, each on the same drawn-tissue patches, all three alternating in rounds so that load on the shared
machine hits them alike:
- the CPU implementation of an earlier commit (`--baseline-rev`, read from git history into a module of its own):
  histograms and means must be equal bit for bit, standard deviations within 1e-6 (this tree sums in float64
  blocks, which moves the std of a near-constant hue by up to ~2e-7, towards the exact value);
- the torch-ops module, which the package keeps as its CUDA path (`baseline_module`): float32 torch ops over every
  pixel, fed as the runtime fed it (uint8 -> float / 255, NCHW): histograms must be identical, means and stds
  within 1e-5.
The speedup over the earlier commit is the median of the per-round ratios (each round runs both back to back). This
tree runs as the encoder runs it (parts of the batch on torch's intra-op threads) and on one thread.
Prints one JSON line with the rates and ratios; appends it to perf/results/bench_color_stats.jsonl.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np
from common import cpu_flags, machine, write_result  # perf/common.py (scripts run from perf/)


def baseline_module():  # noqa: ANN201
    """The torch-ops module: the previous CPU implementation, kept as the CUDA path (same formulas, float32 over every
    pixel)."""
    from atlaspatch_stream.backends.encoders.color_stats import _module_class

    return _module_class()().eval()


def module_at(rev: str) -> ModuleType:
    """The `color_stats` module as it was at git revision `rev`, imported beside the current one."""
    root = Path(__file__).resolve().parents[1]
    relative = "atlaspatch_stream/backends/encoders/color_stats.py"
    source = subprocess.run(["git", "-C", str(root), "show", f"{rev}:{relative}"], capture_output=True, text=True,
                            check=True).stdout
    name = f"atlaspatch_stream.backends.encoders._color_stats_at_{rev}"
    spec = importlib.util.spec_from_loader(name, loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "atlaspatch_stream.backends.encoders"
    sys.modules[name] = module
    exec(compile(source, f"{rev}:{relative}", "exec"), module.__dict__)  # noqa: S102 - our own history
    return module


def baseline_encode(module, pixels: np.ndarray) -> np.ndarray:  # noqa: ANN001
    """The old runtime path: uint8 (B, H, W, 3) -> float NCHW / 255 -> module -> numpy."""
    import torch

    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float().div_(255.0)
        return module(x).flatten(1).float().cpu().numpy()


def patches(batch: int, size: int) -> np.ndarray:
    """`batch` patches of drawn H&E-like tissue (tissue, edges and background)."""
    from atlaspatch_stream.testing.synthetic import draw_tissue

    image, _ = draw_tissue(size * 8, size * 6, seed=3)
    tiles = [image[y : y + size, x : x + size] for y in range(0, size * 6, size) for x in range(0, size * 8, size)]
    return np.stack((tiles * (batch // len(tiles) + 1))[:batch])


def rate(run, pixels: np.ndarray, seconds: float) -> float:  # noqa: ANN001
    """Patches per second of `run(pixels)` over about `seconds`."""
    run(pixels)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        run(pixels)
        done += len(pixels)
    return done / (time.perf_counter() - started)


def main() -> int:
    """Check agreement, time all three in alternating rounds, print and save one JSON line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--patch", type=int, default=224)
    parser.add_argument("--seconds", type=float, default=8.0, help="per implementation, split over the rounds")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--baseline-rev", default="1ea700c", help="git revision of the earlier CPU implementation")
    args = parser.parse_args()
    import torch

    from atlaspatch_stream.backends.encoders.color_stats import cpu_color_stats
    from atlaspatch_stream.backends.encoders.registry import build_registry

    encoder = build_registry(device="cpu", precision="float32", weights={}, plugins=(), num_workers=0).create(
        "color_stats")
    before, torch_ops = module_at(args.baseline_rev).cpu_color_stats, baseline_module()
    pixels = patches(args.batch, args.patch)
    new_out, before_out, torch_out = encoder.encode(pixels), before(pixels), baseline_encode(torch_ops, pixels)
    equal_before = bool(np.array_equal(new_out[:, 18:], before_out[:, 18:]) and
                        np.array_equal(new_out[:, :9], before_out[:, :9]))
    std_before = float(np.abs(new_out[:, 9:18] - before_out[:, 9:18]).max())
    hist_equal = bool(np.array_equal(new_out[:, 18:], torch_out[:, 18:]))
    moment_diff = float(np.abs(new_out[:, :18] - torch_out[:, :18]).max())
    if not equal_before or std_before > 1e-6 or not hist_equal or moment_diff > 1e-5:
        print(f"outputs differ: histograms and means equal to {args.baseline_rev}={equal_before}, max std difference "
              f"{std_before}; histograms equal to the torch ops={hist_equal}, max mean/std difference {moment_diff}")
        return 1
    runs = {"new": encoder.encode, "new_one_thread": cpu_color_stats, "before": before,
            "torch": lambda p: baseline_encode(torch_ops, p)}
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            rates[name].append(rate(run, pixels, args.seconds / args.rounds))
    median = {name: float(np.median(r)) for name, r in rates.items()}
    paired = [n / b for n, b in zip(rates["new"], rates["before"], strict=True)]
    paired_one = [n / b for n, b in zip(rates["new_one_thread"], rates["before"], strict=True)]
    write_result("bench_color_stats", {
        "bench": "color_stats", "date": time.strftime("%Y-%m-%d"), "batch": args.batch, "patch": args.patch,
        "new_patches_per_s": round(median["new"], 1),
        "before_rev": args.baseline_rev, "before_patches_per_s": round(median["before"], 1),
        "speedup_vs_before": round(float(np.median(paired)), 2),
        "speedups_vs_before_per_round": [round(x, 2) for x in paired],
        "new_one_thread_patches_per_s": round(median["new_one_thread"], 1),
        "one_thread_speedup_vs_before": round(float(np.median(paired_one)), 2),
        "baseline_patches_per_s": round(median["torch"], 1), "speedup": round(median["new"] / median["torch"], 2),
        "histograms_and_means_equal_to_before": equal_before, "max_std_difference_to_before": std_before,
        "histograms_identical": hist_equal, "max_mean_std_difference": moment_diff,
        "cpu_flags": cpu_flags(os.environ),
        "machine": machine("torch", "numpy", "numba", torch_threads=torch.get_num_threads()),
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
