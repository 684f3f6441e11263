"""One call on a GPU machine: run the GPU tests and the GPU-side benchmarks, save everything under perf/results/.

    python perf/gpu_smoke.py          (about 5 minutes on one GPU; needs the project's .venv)

Runs `pytest tests/gpu`, `perf/bench_segment.py --device cuda` and `perf/bench_process.py --device cuda`, and appends
one JSON line per step (exit status, seconds, the last output lines) to perf/results/gpu_smoke.jsonl.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from common import machine, write_result  # perf/common.py (scripts run from perf/)

ROOT = Path(__file__).resolve().parents[1]
STEPS = {
    "gpu_tests": [sys.executable, "-m", "pytest", "-q", "tests/gpu"],
    "bench_segment": [sys.executable, "perf/bench_segment.py", "--device", "cuda", "--images", "16",
                      "--batch-size", "8"],
    "bench_process": [sys.executable, "perf/bench_process.py", "--device", "cuda", "--slides", "4",
                      "--size", "16000", "--no-upstream"],
}


def main() -> int:
    """Run every step, record each, and return non-zero if any failed."""
    failed = 0
    for name, command in STEPS.items():
        started = time.perf_counter()
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        failed += proc.returncode != 0
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-8:]
        write_result("gpu_smoke", {"step": name, "rc": proc.returncode,
                                   "seconds": round(time.perf_counter() - started, 1), "tail": tail,
                                   "machine": machine("torch")})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
