"""Shared by the benchmark scripts: machine notes and result files (absolute rates are noise without them)."""

from __future__ import annotations

import contextlib
import os
import platform
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


def write_result(bench: str, line: dict[str, Any], append: bool = True) -> str:
    """Print `line` as one JSON line and append it to perf/results/<bench>.jsonl."""
    text = orjson.dumps(line).decode()
    print(text)
    if append:
        RESULTS.mkdir(parents=True, exist_ok=True)
        with open(RESULTS / f"{bench}.jsonl", "a") as fh:
            fh.write(text + "\n")
    return text
