"""Fault injection for output tests: make the k-th OS write (or fsync) under HDF5 fail with ENOSPC, EIO, ...

The fault is injected where a real full or failing disk strikes: in `h5io`'s `OsIO`, the `pwrite`/`fsync` calls that
HDF5's file driver makes for every output H5 (through `OutputFile`, h5py's fileobj driver). Everything above it runs
for real: HDF5's chunk and metadata caches decide when bytes are written (mostly at flush and close, not when rows
are handed over), and the store must notice a failure that HDF5 hit inside a deferred flush. Injecting higher, by
making `SlideH5.write_rows` raise, would skip exactly the deferred-write path that used to crash the process.

    with faults.inject(at=7, errno=errno.ENOSPC):   # the 7th write fails, and every later one (a full disk stays full)
        ...
    with faults.count_writes() as counter:           # size a matrix: counter.count after a clean run
        ...

For whole runs in a subprocess (exit status, stderr, files left), the same faults from the command line:
`python -m atlaspatch_stream.testing.faults --fail-at 7 --errno ENOSPC -- process SLIDES -o OUT ...`, which prints
`FAULTS: ops=<n> failed=<m>` on stderr at exit.
"""

from __future__ import annotations

import argparse
import contextlib
import errno as errno_module
import os
import sys
from collections.abc import Iterator, Sequence

from ..outputs.h5io import OsIO, use_os_io

Op = str  # "write" or "fsync"


class WriteFaults(OsIO):
    """The real OS calls (`h5io.OsIO`), except that the `at`-th counted operation raises `OSError(errno)` (and every
    later one when `sticky`).

    Attributes:
        count: Counted operations so far (`ops` only).
        failed: How many of them were made to fail.
    """

    def __init__(self, at: int, errno: int = errno_module.ENOSPC, *, ops: Sequence[Op] = ("write",),
                 sticky: bool = True) -> None:
        unknown = set(ops) - {"write", "fsync"}
        if unknown:
            raise ValueError(f"unknown fault ops {sorted(unknown)}")
        self.at = at
        self.errno = errno
        self.ops = tuple(ops)
        self.sticky = sticky
        self.count = 0
        self.failed = 0

    def pwrite_all(self, fd: int, data: memoryview, offset: int) -> None:
        """Count, maybe fail, then write."""
        self._maybe_fail("write")
        super().pwrite_all(fd, data, offset)

    def fsync(self, fd: int) -> None:
        """Count, maybe fail, then fsync."""
        self._maybe_fail("fsync")
        super().fsync(fd)

    def _maybe_fail(self, op: Op) -> None:
        if op not in self.ops:
            return
        self.count += 1
        if self.at > 0 and (self.count == self.at or (self.sticky and self.count > self.at)):
            self.failed += 1
            raise OSError(self.errno, os.strerror(self.errno))


@contextlib.contextmanager
def inject(at: int, errno: int = errno_module.ENOSPC, *, ops: Sequence[Op] = ("write",),
           sticky: bool = True) -> Iterator[WriteFaults]:
    """Within the block, output files opened from now on fail their `at`-th write (see `WriteFaults`)."""
    faults = WriteFaults(at, errno, ops=ops, sticky=sticky)
    previous = use_os_io(faults)
    try:
        yield faults
    finally:
        use_os_io(previous)


@contextlib.contextmanager
def count_writes(ops: Sequence[Op] = ("write",)) -> Iterator[WriteFaults]:
    """Count the writes of output files opened within the block, failing none (`at=0`)."""
    with inject(0, ops=ops) as counter:
        yield counter


def main(argv: Sequence[str] | None = None) -> None:
    """Install the fault, run `atlaspatch <rest>` in this process (it exits with the CLI's status), report counts."""
    parser = argparse.ArgumentParser(prog="python -m atlaspatch_stream.testing.faults",
                                     description="Run the atlaspatch CLI with an injected output fault.")
    parser.add_argument("--fail-at", type=int, default=0, help="1-based index of the failing op (0: count only)")
    parser.add_argument("--errno", default="ENOSPC", help="errno name, e.g. ENOSPC, EIO, EDQUOT")
    parser.add_argument("--ops", default="write", help="comma-separated ops to count: write,fsync")
    parser.add_argument("--once", action="store_true", help="fail only that op, not every later one")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    from ..cli import main as cli_main

    sys.argv = ["atlaspatch", *(a for a in rest if a != "--")]
    with inject(args.fail_at, getattr(errno_module, args.errno), ops=args.ops.split(","),
                sticky=not args.once) as faults:
        try:
            cli_main()
        finally:
            print(f"FAULTS: ops={faults.count} failed={faults.failed}", file=sys.stderr)


if __name__ == "__main__":
    main()
