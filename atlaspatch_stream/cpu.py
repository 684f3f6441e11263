"""What this CPU computes natively (decided once, for the CLI's allocator settings and the encoders' precision), and
how many cores this process may use (for every pool sized from the cores).

"Native bf16" means the CPU has AVX-512 BF16 or AMX *and* the math libraries may use them: a limit set with
`ONEDNN_MAX_CPU_ISA` (or its old name `DNNL_MAX_CPU_ISA`) below AVX512_CORE_BF16, or `ATEN_CPU_CAPABILITY` below
avx512, makes bf16 emulated, several times slower than float32, so such a CPU counts as one without.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import cache

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile")
# oneDNN ISA limits under which bf16 is emulated; ATen capabilities without AVX-512 kernels.
_ONEDNN_WITHOUT_BF16 = frozenset({"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE",
                                  "AVX512_CORE_VNNI"})
_ATEN_WITHOUT_AVX512 = frozenset({"default", "avx2"})


def cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags of the first processor in /proc/cpuinfo's text."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def has_native_bf16(flags: set[str], environ: Mapping[str, str]) -> bool:
    """Whether bf16 runs in hardware with these CPU flags under these environment limits (module docstring)."""
    limited = (environ.get("ONEDNN_MAX_CPU_ISA", environ.get("DNNL_MAX_CPU_ISA", "")).upper() in _ONEDNN_WITHOUT_BF16
               or environ.get("ATEN_CPU_CAPABILITY", "").lower() in _ATEN_WITHOUT_AVX512)
    return not limited and any(flag in flags for flag in NATIVE_BF16_FLAGS)


def read_cpu_flags(cpuinfo_path: str = "/proc/cpuinfo") -> set[str]:
    """This machine's CPU flags; empty where /proc/cpuinfo cannot be read (not Linux)."""
    try:
        with open(cpuinfo_path) as fh:
            return cpu_flags(fh.read())
    except OSError:
        return set()


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (`taskset`, a SLURM or container cgroup's cpuset), which
    `os.cpu_count()` ignores; the CPU count where affinity is unknown (not Linux)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@cache
def native_bf16() -> bool:
    """Whether this process's CPU computes bf16 natively (`has_native_bf16` on this machine and environment)."""
    return has_native_bf16(read_cpu_flags(), os.environ)
