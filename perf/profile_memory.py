"""Where the peak memory of `process` goes: every live allocation at the heap's high-water mark, by the code that made it.

    pip install -e ".[perf]"   (memray)
    python perf/profile_memory.py --work DIR [--encoder resnet18] [--precision float16] [--batch 32]
                                  [--variant read.slides_in_parallel=1,read.chunk_patches=32]

Runs `bench_process.py`'s pipeline child once on the slides of a `bench_process.py --work DIR` folder (its slides and
random weights), under the allocator settings `atlaspatch process` chooses on this CPU, with memray tracing every
native allocation (numpy buffers, torch tensors, decoders, the interpreter). memray keeps the set of allocations
live at the moment the heap was largest; they are grouped by the innermost frame inside this package, and named by
the stage that holds them (`OWNERS`). Beside it: the process's peak RSS, whose excess over the heap's peak is
libraries' mapped code and data and the allocator's free pages. Prints one JSON line and appends it to
perf/results/profile_memory.jsonl. memray slows the run: its wall time is not a benchmark.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench_process import allocators, parse_variant, spawn  # perf/ scripts run from perf/
from common import cpu_flags, machine, write_result

PACKAGE = f"{os.sep}atlaspatch_stream{os.sep}"

# innermost package frame (file:function) -> what the bytes are
OWNERS = {
    "backends/tiles.py:decode_tile": "decoded tiles held by the readers (the chunk being cut, the next one decoding)",
    "buffers.py:_take": "patch chunks and joined batches (pooled): queued between read and encode, being batched",
    "backends/encoders/runtime.py:_plain_forward": "the forward pass (activations of the batch)",
    "backends/encoders/runtime.py:preprocess_batch": "the model input (the normalised float batch)",
    "backends/encoders/runtime.py:model_input": "the model input (the normalised float batch)",
    "backends/encoders/runtime.py:pil_resized_crops": "the model input (Pillow's resized crops)",
    "backends/encoders/runtime.py:_prepared_model": "the model (weights, the channels-last copy)",
    "backends/encoders/torchvision_family.py:build": "the model (weights, the channels-last copy)",
    "backends/encoders/timm_family.py:build": "the model (weights, the channels-last copy)",
}


def owner(stack: list[tuple[str, str, int]]) -> str:
    """What an allocation is, from its stack (innermost first): the `OWNERS` name of its innermost package frame,
    "imports" for module-level code, else `file:function`."""
    for function, filename, _ in stack:
        if PACKAGE in filename:
            key = f"{filename.split(PACKAGE, 1)[1]}:{function}"
            return OWNERS.get(key, "imports (module code, bytecode)" if function == "<module>" else key)
    return "imports and the interpreter (no frame in this package)"


def live_at_peak(trace: Path, top: int) -> tuple[float, dict[str, float]]:
    """The heap's peak (MB) and the MB live there per owner, largest first."""
    from memray import FileReader

    reader = FileReader(trace)
    sizes: Counter[str] = Counter()
    for record in reader.get_high_watermark_allocation_records(merge_threads=True):
        sizes[owner(record.stack_trace(max_stacks=64))] += record.size
    ranked = {name: round(size / 2**20, 1) for name, size in sizes.most_common(top)}
    return round(reader.metadata.peak_memory / 2**20, 1), ranked


def traced_run(args: argparse.Namespace, trace: Path) -> dict:
    """Run `bench_process.py`'s pipeline child under memray with the CLI's allocator settings; its result line."""
    env, trim = allocators({})["cli_default"]
    return spawn(args, Path(args.work), "pipeline", env, out="out_profile", override=args.variant, trim=trim,
                 launcher=("-m", "memray", "run", "--native", "-q", "-o", str(trace)))


def main() -> int:
    """Profile one run; print and save one JSON line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", required=True, help="a bench_process.py --work folder (slides, weights)")
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--precision", default="float16")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--variant", type=parse_variant, default={}, help="SECTION.KEY=VALUE[,...] settings changed")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    # what `spawn` passes on to the child: the CPU, the default decoder, no emulated instruction set
    args.device, args.decoder, args.upstream_workers, args.emulate_no_avx512 = "cpu", "auto", 0, False
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        result = traced_run(args, Path(tmp) / "trace.bin")
        heap_peak, owners = live_at_peak(Path(tmp) / "trace.bin", args.top)
    write_result("profile_memory", {
        "bench": "profile_memory", "date": time.strftime("%Y-%m-%d"), "tool": "memray --native (high-water mark)",
        "encoder": args.encoder, "precision": args.precision, "batch": args.batch, "settings": args.variant or None,
        "slides": len(list((Path(args.work) / "slides").glob("*.svs"))), "patches": result["patches"],
        "wall_s_under_memray": round(time.perf_counter() - started, 1), "heap_peak_mb": heap_peak,
        "live_at_heap_peak_mb": owners, "peak_rss_mb_under_memray": result["peak_rss_mb"],
        "rss_beyond_heap_peak_mb_under_memray": round(result["peak_rss_mb"] - heap_peak, 1),
        "cpu_flags": cpu_flags(os.environ), "machine": machine("torch", "numpy", "memray"),
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
