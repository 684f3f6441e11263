"""The CLI's glibc allocator settings: large freed buffers go back to the system (peak RSS stays near use)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import sys
    import numpy as np
    from atlaspatch_stream.cli.allocator import tune_allocator

    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    tuned = sys.argv[1] == "tuned" and tune_allocator()
    big = np.ones(16 << 20, np.uint8)   # mmapped; freeing it raises glibc's dynamic mmap threshold to 16 MB
    del big
    buffer = np.ones(8 << 20, np.uint8)
    held = rss_mb()
    del buffer
    print(tuned, round(held - rss_mb()))
""")


def _released(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout
    tuned, released = out.split()
    return tuned, int(released)


def test_freed_large_buffers_are_returned_to_the_system() -> None:
    """After a 16 MB buffer is freed, an 8 MB one freed later is kept by glibc's defaults (the dynamic mmap
    threshold grew, so it came from the heap) but returned at once with the CLI's settings."""
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    tuned, released = _released("tuned")
    assert tuned == "True" and released >= 7
    _, released_by_default = _released("plain")
    assert released_by_default < 2
