"""`OutputFile`: the file object HDF5 writes through (h5py `driver="fileobj"`), which never lets an OS error reach HDF5.

The first failing OS call (write, read, truncate, fsync) is recorded in `error`; from then on the file is *poisoned*:
writes report success without touching the disk and are kept in memory (`_shadow`) so that HDF5 reads back exactly
what it believes it wrote. HDF5's state therefore stays consistent, every later HDF5 call (including the close) runs
its normal, successful path, and the store, which checks `error` after each operation, fails the slide and discards
the file. Why this matters is explained in `h5store`.

All OS calls go through one replaceable `OsIO` object (`use_os_io`; a subclass can fail on purpose), the seam `atlaspatch_stream.testing.faults`
uses to make the k-th write fail exactly where a full disk would make it fail: under HDF5, at `pwrite`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


class OsIO:
    """The OS calls an `OutputFile` makes: the real ones (a seam for fault injection: subclass and `use_os_io`)."""

    def pwrite_all(self, fd: int, data: memoryview, offset: int) -> None:
        """Write all of `data` at `offset` (retrying short writes)."""
        while data:
            done = os.pwrite(fd, data, offset)
            data, offset = data[done:], offset + done

    def pread_into(self, fd: int, buf: memoryview, offset: int) -> int:
        """Read into `buf` from `offset`; the byte count (short at the end of the file)."""
        return os.preadv(fd, [buf], offset)

    def ftruncate(self, fd: int, size: int) -> None:
        """Set the file's size."""
        os.ftruncate(fd, size)

    def fsync(self, fd: int) -> None:
        """Flush the file to stable storage (NFS reports delayed ENOSPC/EDQUOT here)."""
        os.fsync(fd)


_IO: list[OsIO] = [OsIO()]


def use_os_io(io: OsIO) -> OsIO:
    """Make every `OutputFile` opened from now on use `io`; returns the previous one."""
    previous, _IO[0] = _IO[0], io
    return previous


class OutputFile:
    """A raw, unbuffered file object over one descriptor, for h5py's fileobj driver.

    Attributes:
        path: The file.
        error: The first OS error met (the file is poisoned from then on), or None.
        size: The logical size HDF5 sees (including poisoned writes past the end on disk).
    """

    def __init__(self, path: Path, *, create: bool) -> None:
        flags = os.O_RDWR | getattr(os, "O_CLOEXEC", 0) | (os.O_CREAT | os.O_EXCL if create else 0)
        self.path = path
        self.fd: int | None = os.open(path, flags, 0o666)  # as h5py creates files: the umask decides
        self.io = _IO[0]
        self.pos = 0
        self.size = os.fstat(self.fd).st_size
        self.error: OSError | None = None
        self._shadow: list[tuple[int, bytes]] = []

    # -- the file-object protocol h5py's fileobj driver uses ------------------------------------------------------

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        """Move the position (SEEK_END counts from the logical size)."""
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.size}[whence]
        self.pos = base + offset
        return self.pos

    def tell(self) -> int:
        """The position."""
        return self.pos

    def write(self, data: Any) -> int:
        """Write at the position; after a failure, keep the bytes in memory instead and still report success."""
        view = memoryview(data).cast("B")
        self._unless_poisoned(self.io.pwrite_all, view, self.pos)
        if self.error is not None:
            self._shadow.append((self.pos, bytes(view)))
        self.pos += view.nbytes
        self.size = max(self.size, self.pos)
        return view.nbytes

    def readinto(self, buf: Any) -> int:
        """Fill `buf` from the position: disk bytes, zeros past the end, and bytes written after a failure."""
        view = memoryview(buf).cast("B")
        got = 0
        try:
            got = self.io.pread_into(self._fd(), view, self.pos)
        except OSError as exc:
            self.error = self.error or exc
        view[got:] = bytes(view.nbytes - got)
        self._overlay(view, self.pos)
        self.pos += view.nbytes
        return view.nbytes

    def read(self, size: int = -1) -> bytes:
        """Read `size` bytes from the position (used only when `readinto` is missing; kept for the protocol)."""
        buf = bytearray(max(0, self.size - self.pos) if size < 0 else size)
        self.readinto(buf)
        return bytes(buf)

    def truncate(self, size: int | None = None) -> int:
        """Set the size (HDF5 trims the file to its end-of-allocation on close)."""
        size = self.pos if size is None else size
        self._unless_poisoned(self.io.ftruncate, size)
        self.size = size
        return size

    def flush(self) -> None:
        """Nothing is buffered here; durability is `sync()`."""

    # -- ours -----------------------------------------------------------------------------------------------------

    def sync(self) -> None:
        """fsync (skipped once poisoned); a failure is recorded in `error`."""
        self._unless_poisoned(self.io.fsync)

    def close(self) -> None:
        """Close the descriptor (idempotent); a failure (NFS reports some write errors here) is recorded."""
        fd, self.fd = self.fd, None
        self._shadow = []
        if fd is None:
            return
        try:
            os.close(fd)
        except OSError as exc:
            self.error = self.error or exc

    def _unless_poisoned(self, call: Callable[..., None], *args: Any) -> None:
        """`call(fd, *args)` unless the file is already poisoned; an OS error it raises poisons it."""
        if self.error is None:
            try:
                call(self._fd(), *args)
            except OSError as exc:
                self.error = exc

    def _fd(self) -> int:
        if self.fd is None:
            raise ValueError(f"{self.path}: file already closed")
        return self.fd

    def _overlay(self, view: memoryview, pos: int) -> None:
        """Apply bytes written after the failure to a read of `view` at `pos` (later writes win)."""
        end = pos + view.nbytes
        for start, blob in self._shadow:
            lo, hi = max(start, pos), min(start + len(blob), end)
            if lo < hi:
                view[lo - pos : hi - pos] = blob[lo - start : hi - start]
