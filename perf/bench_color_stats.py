"""`color_stats` on CPU: the table/histogram implementation against the torch-ops implementation it replaced.

    python perf/bench_color_stats.py [--batch 32] [--patch 224] [--seconds 8]

The baseline is the previous implementation, which the module keeps as its CUDA path (`baseline_module`): float32
torch ops over every pixel, fed as the runtime fed it (uint8 -> float / 255, NCHW). Both run on the same drawn-tissue patches, alternating
in rounds so that load on the shared machine hits both alike. Checks that the outputs agree (histograms exactly,
means and stds to 1e-5) and prints one JSON line with both rates and their ratio; appends it to
perf/results/bench_color_stats.jsonl.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from common import machine, write_result  # perf/common.py (scripts run from perf/)


def baseline_module():  # noqa: ANN201
    """The torch-ops module: the previous CPU implementation, kept as the CUDA path (same formulas, float32 over every
    pixel)."""
    from atlaspatch_stream.backends.encoders.color_stats import _module_class

    return _module_class()().eval()


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
    """Check agreement, time both in alternating rounds, print and save one JSON line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--patch", type=int, default=224)
    parser.add_argument("--seconds", type=float, default=8.0, help="per implementation, split over 4 rounds")
    args = parser.parse_args()
    import torch

    from atlaspatch_stream.backends.encoders.registry import build_registry

    encoder = build_registry(device="cpu", precision="float32", weights={}, plugins=(), num_workers=0).create(
        "color_stats")
    old = baseline_module()
    pixels = patches(args.batch, args.patch)
    new_out, old_out = encoder.encode(pixels), baseline_encode(old, pixels)
    hist_equal = bool(np.array_equal(new_out[:, 18:], old_out[:, 18:]))
    moment_diff = float(np.abs(new_out[:, :18] - old_out[:, :18]).max())
    if not hist_equal or moment_diff > 1e-5:
        print(f"outputs differ: histograms equal={hist_equal}, max mean/std difference {moment_diff}")
        return 1
    rounds, new_rates, old_rates = 4, [], []
    for _ in range(rounds):
        new_rates.append(rate(encoder.encode, pixels, args.seconds / rounds))
        old_rates.append(rate(lambda p: baseline_encode(old, p), pixels, args.seconds / rounds))
    new_rate, old_rate = float(np.median(new_rates)), float(np.median(old_rates))
    write_result("bench_color_stats", {
        "bench": "color_stats", "date": time.strftime("%Y-%m-%d"), "batch": args.batch, "patch": args.patch,
        "new_patches_per_s": round(new_rate, 1), "baseline_patches_per_s": round(old_rate, 1),
        "speedup": round(new_rate / old_rate, 2), "histograms_identical": hist_equal,
        "max_mean_std_difference": moment_diff,
        "machine": machine("torch", "numpy", "opencv-python-headless", torch_threads=torch.get_num_threads()),
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
