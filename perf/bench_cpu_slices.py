"""The CPU forward pass in slices: one batch through the encoder whole, and in slices of fewer patches, side by side.

    python perf/bench_cpu_slices.py [--encoders resnet18,lunit_vit_small_patch16_dino] [--precision float16]
                                    [--batch 32] [--slices 32,16,8,4] [--rounds 6]

For each encoder (seeded random weights, on the CPU, prepared as `process` prepares it), the same uint8 batch goes
through `TorchEncoder.encode` with `cpu_slice` set to each size in turn, the order rotated each round. Prints, per
slice size, the median seconds per batch, the median of its per-round ratio to the whole batch, and the largest
difference of its features from the whole batch's; then the CPU flags. To emulate a CPU without AVX-512, run it under
`ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2` with `--precision float32`. Appends
the line to perf/results/bench_cpu_slices.jsonl.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from common import cpu_flags, machine, write_result  # perf/common.py (scripts run from perf/)


def measure(name: str, precision: str, batch: int, slices: list[int], rounds: int) -> dict:
    """Per slice size: median seconds per batch, paired ratio to the whole batch, largest feature difference."""
    import torch

    from atlaspatch_stream.backends.encoders.registry import get_spec
    from atlaspatch_stream.backends.encoders.runtime import TorchEncoder

    torch.manual_seed(0)
    spec = get_spec(name)
    encoder = TorchEncoder(spec, device="cpu", precision=precision, model=spec.build(), cpu_slice=batch)
    edge = spec.input_size or 224
    pixels = np.random.default_rng(0).integers(0, 256, (batch, edge, edge, 3), dtype=np.uint8)
    whole = encoder.encode(pixels)
    times: dict[int, list[float]] = {size: [] for size in slices}
    differences: dict[int, float] = {}
    for round_ in range(rounds):
        for size in slices[round_ % len(slices):] + slices[: round_ % len(slices)]:
            encoder.cpu_slice = size
            started = time.perf_counter()
            out = encoder.encode(pixels)
            times[size].append(time.perf_counter() - started)
            differences[size] = max(differences.get(size, 0.0), float(np.abs(out - whole).max()))
    return {str(size): {"s_per_batch": round(float(np.median(times[size])), 4),
                        "over_whole_batch": round(float(np.median(np.divide(times[size], times[batch]))), 3),
                        "max_abs_difference": differences[size]} for size in slices}


def main() -> int:
    """Measure each encoder; print and save one JSON line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--encoders", default="resnet18,lunit_vit_small_patch16_dino")
    parser.add_argument("--precision", default="float16", help="as --feature-precision")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--slices", default="32,16,8,4", help="slice sizes; the batch size itself is always measured")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from atlaspatch_stream.backends.encoders.runtime import precision_label

    slices = sorted({args.batch, *(int(s) for s in args.slices.split(","))}, reverse=True)
    write_result("bench_cpu_slices", {
        "bench": "cpu_slices", "date": time.strftime("%Y-%m-%d"), "precision": args.precision,
        "ran_as": precision_label("cpu", args.precision), "batch": args.batch, "rounds": args.rounds,
        "encoders": {name: measure(name, args.precision, args.batch, slices, args.rounds)
                     for name in args.encoders.split(",")},
        "cpu_flags": cpu_flags(os.environ),
        "machine": machine("torch", "timm", torch_threads=torch.get_num_threads()),
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
