"""Shared by the benchmark scripts: machine notes and result files (absolute rates are noise without them)."""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import orjson

RESULTS = Path(__file__).resolve().parent / "results"


def machine(*packages: str, **extra: Any) -> dict[str, Any]:
    """CPU model, cores, 1-minute load, Python, GPU and the versions of `packages`."""
    cpu = platform.processor()
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as fh:
        cpu = next(ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name"))
    notes: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "note": "shared machine; compare the ratio, not the rates",
    }
    for name in packages:
        with contextlib.suppress(PackageNotFoundError):
            notes[name] = version(name)
    return {**notes, **extra}


# torch, oneDNN and MKL kept to AVX2: a CPU without AVX-512 as far as the forward pass goes (`--emulate-no-avx512`)
WITHOUT_AVX512 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def cpu_flags(environ: Mapping[str, str]) -> dict[str, Any]:
    """Which of the CPU flags that decide precision and allocator settings this CPU has, whether bf16 is native under
    `environ` (the measurements' environment), and the instruction-set limits it sets (an emulated CPU)."""
    from atlaspatch_stream.cpu import NATIVE_BF16_FLAGS, has_native_bf16, read_cpu_flags

    flags = read_cpu_flags()
    limits = {name: environ[name] for name in WITHOUT_AVX512 if name in environ}
    return {**{name: name in flags for name in ("avx512f", *NATIVE_BF16_FLAGS)},
            "native_bf16": has_native_bf16(flags, environ), "isa_limits": limits or None}


def write_result(bench: str, line: dict[str, Any], append: bool = True) -> str:
    """Print `line` as one JSON line and append it to perf/results/<bench>.jsonl."""
    text = orjson.dumps(line).decode()
    print(text)
    if append:
        RESULTS.mkdir(parents=True, exist_ok=True)
        with open(RESULTS / f"{bench}.jsonl", "a") as fh:
            fh.write(text + "\n")
    return text
