"""The CLI's glibc allocator settings: chosen by the kind of CPU, overridden by glibc's own variables, and the
release of freed memory between slides. The effects are measured on the real allocator, in fresh processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from atlaspatch_stream.cli.allocator import SMALL_FOOTPRINT, TWO_ARENAS, choose_settings
from atlaspatch_stream.cpu import cpu_flags, has_native_bf16

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")

ZEN4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_bf16 avx512_vnni\n\nprocessor\t: 1\n"
SAPPHIRE_RAPIDS = "flags\t\t: fpu avx2 avx512f amx_bf16 amx_tile amx_int8\n"
ZEN2 = "flags\t\t: fpu sse2 avx avx2 fma\n"

PROBE = textwrap.dedent("""
    import sys
    import numpy as np
    from atlaspatch_stream.cli.allocator import release_free_memory, tune_allocator

    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    applied = tune_allocator(cpuinfo_path=sys.argv[1])
    if sys.argv[2] == "large":
        big = np.ones(16 << 20, np.uint8)   # mmapped; freeing it raises glibc's dynamic mmap threshold to 16 MB
        del big
        buffer = np.ones(8 << 20, np.uint8)
        held = rss_mb()
        del buffer
    else:  # many small heap blocks, freed: kept by glibc until trimmed
        blocks = [np.ones(200_000, np.uint8) for _ in range(400)]
        del blocks[:-1]
        held = rss_mb()
        release_free_memory()
    print(",".join(sorted(applied)), round(held - rss_mb()))
""")


def _probe(tmp_path: Path, cpuinfo: str, what: str, env: dict[str, str] | None = None) -> tuple[str, int]:
    info = tmp_path / "cpuinfo"
    info.write_text(cpuinfo)
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | (env or {})
    out = subprocess.run([sys.executable, "-c", PROBE, str(info), what], capture_output=True, text=True, check=True,
                         env=run_env).stdout.split()
    return (out[0], int(out[1])) if len(out) == 2 else ("", int(out[0]))


def test_cpu_kind_from_cpuinfo_flags() -> None:
    """AVX-512 BF16 or AMX count as native bf16; AVX2 alone does not; a text without flags has none."""
    assert has_native_bf16(cpu_flags(ZEN4), {}) and has_native_bf16(cpu_flags(SAPPHIRE_RAPIDS), {})
    assert not has_native_bf16(cpu_flags(ZEN2), {}) and cpu_flags("processor : 0\n") == set()


@pytest.mark.parametrize("limit", [{"ONEDNN_MAX_CPU_ISA": "AVX2"}, {"DNNL_MAX_CPU_ISA": "avx512_core"},
                                   {"ATEN_CPU_CAPABILITY": "avx2"}, {"ATEN_CPU_CAPABILITY": "default"}])
def test_an_isa_limit_below_bf16_counts_as_a_cpu_without_it(limit: dict[str, str]) -> None:
    """Where the math libraries may not use AVX-512 BF16, bf16 is emulated: the CPU counts as one without native bf16,
    for the allocator and for precision alike; limits at or above bf16 change nothing."""
    assert not has_native_bf16(cpu_flags(ZEN4), limit)
    assert choose_settings(cpu_flags(ZEN4), limit) == SMALL_FOOTPRINT
    assert has_native_bf16(cpu_flags(ZEN4), {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16", "ATEN_CPU_CAPABILITY": "avx512"})


def test_small_footprint_only_without_native_bf16_and_the_environment_wins() -> None:
    """Without native bf16: the fixed 1 MiB mmap threshold and two arenas; with it: two arenas only. A setting whose
    glibc variable is in the environment is never ours."""
    assert choose_settings(cpu_flags(ZEN2), {}) == SMALL_FOOTPRINT
    assert choose_settings(cpu_flags(ZEN4), {}) == TWO_ARENAS == choose_settings(cpu_flags(SAPPHIRE_RAPIDS), {})
    assert choose_settings(cpu_flags(ZEN4), {"MALLOC_ARENA_MAX": "8"}) == {}
    only_arenas = choose_settings(cpu_flags(ZEN2), {"MALLOC_MMAP_THRESHOLD_": "33554432"})
    assert only_arenas == {"MALLOC_ARENA_MAX": SMALL_FOOTPRINT["MALLOC_ARENA_MAX"]}


def test_freed_large_buffers_return_at_once_with_the_small_footprint_only(tmp_path: Path) -> None:
    """After a 16 MB buffer is freed, an 8 MB one freed later goes back to the system at once under the small
    footprint (a CPU without native bf16), but is kept under glibc's dynamic threshold (a bf16 CPU: two arenas only).
    Where the environment sets glibc's threshold, only the arena limit is ours."""
    applied, released = _probe(tmp_path, ZEN2, "large")
    assert applied == "MALLOC_ARENA_MAX,MALLOC_MMAP_THRESHOLD_" and released >= 7
    applied, released = _probe(tmp_path, ZEN4, "large")
    assert applied == "MALLOC_ARENA_MAX" and released < 2
    applied, _ = _probe(tmp_path, ZEN2, "large", {"MALLOC_MMAP_THRESHOLD_": "33554432"})
    assert applied == "MALLOC_ARENA_MAX"


def test_release_between_slides_gives_back_freed_heap_memory(tmp_path: Path) -> None:
    """80 MB of small heap blocks, freed: `release_free_memory` hands (most of) it back to the system."""
    _, released = _probe(tmp_path, ZEN4, "small")
    assert released >= 40
