"""glibc allocator settings for the command line, chosen by the kind of CPU, and the release of freed memory.

The pipeline allocates many megabyte-sized buffers (decoded tiles, patch chunks, batches, activations) from several
threads. glibc's defaults give each thread its own arena (up to 8 per core) and raise the mmap threshold once large
blocks have been freed, so later large buffers come from the arenas and are kept after `free`: peak RSS grows above
what is in use. Two settings act on that:

- two arenas (`MALLOC_ARENA_MAX=2`) bound how many arenas keep freed blocks; it costs nothing measurable;
- a fixed 1 MiB mmap threshold returns every large buffer at once, but then each of those buffers is an mmap/munmap
  pair plus fresh page faults.

What the threshold costs depends on how fast the rest is. On a CPU without native bf16 (`atlaspatch_stream.cpu`: no
AVX-512 BF16 or AMX, or their use switched off) the forward pass is slow, and the threshold cost a few per cent of the
wall time for about a quarter less peak memory on the CPU measured: the CLI sets both there (`SMALL_FOOTPRINT`). On a
CPU with native bf16 the forward pass is about twice as fast, so the same system time weighs more (up to 1.35× the
wall time in paired runs): the CLI sets only the two arenas there (`TWO_ARENAS`), which was both faster and smaller
than glibc's defaults.

On both, `release_free_memory` (glibc's `malloc_trim`) hands the free pages of every arena back after each slide,
so a long run does not keep its high-water mark between slides (it does not lower the peak itself). Figures:
README "Performance".

glibc's own variables (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_ARENA_MAX`, ...) win over all of this: a setting the
environment names is never changed. The library never changes process-wide settings: only the CLI calls
`tune_allocator`, before heavy imports, and `release_free_memory` between slides.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Mapping
from functools import cache
from typing import Any

from atlaspatch_stream.cpu import has_native_bf16, read_cpu_flags

M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD = 1 << 20
ARENA_MAX = 2
TWO_ARENAS = {"MALLOC_ARENA_MAX": (M_ARENA_MAX, ARENA_MAX)}
SMALL_FOOTPRINT = {"MALLOC_MMAP_THRESHOLD_": (M_MMAP_THRESHOLD, MMAP_THRESHOLD), **TWO_ARENAS}


def choose_settings(flags: set[str], environ: Mapping[str, str]) -> dict[str, tuple[int, int]]:
    """The `mallopt` settings the CLI applies, by the variable glibc reads for each: the small footprint on CPUs
    without native bf16, two arenas on CPUs with it; any setting whose variable the environment names is left out."""
    chosen = TWO_ARENAS if has_native_bf16(flags, environ) else SMALL_FOOTPRINT
    return {name: setting for name, setting in chosen.items() if name not in environ}


def tune_allocator(cpuinfo_path: str = "/proc/cpuinfo", environ: Mapping[str, str] | None = None) -> dict[str, int]:
    """Apply `choose_settings` for this CPU through `mallopt`; returns what was applied ({} where nothing was, or not
    glibc)."""
    libc = _libc()
    if libc is None:
        return {}
    chosen = choose_settings(read_cpu_flags(cpuinfo_path), os.environ if environ is None else environ)
    return {name: value for name, (param, value) in chosen.items() if libc.mallopt(param, value)}


def release_free_memory() -> None:
    """Give the free pages of every glibc arena back to the system (`malloc_trim(0)`); nothing where not glibc."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@cache
def _libc() -> Any:
    """glibc through ctypes, or None (another C library, or none found)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt, libc.malloc_trim  # noqa: B018 - both exist only in glibc
    except (OSError, AttributeError):
        return None
    return libc
