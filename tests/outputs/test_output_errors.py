"""OutputError and the translation of OS / h5py failures into it (errors.py)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import h5py
import pytest

from atlaspatch_stream.errors import (
    AtlasPatchError,
    OutputError,
    disk_full_before,
    errno_of,
    free_bytes,
    output_error,
)

# Exactly what h5py 3.16 / HDF5 2.0 raised in the reproduced full-disk run (issue 13).
H5_CREATE_ENOSPC = (
    "[Errno 28] Unable to synchronously create file (file write failed: time = Tue Dec  1 08:58:03 2026\n, "
    "filename = '/out/patches/.s4.h5.tmp.d68', file descriptor = 33, errno = 28, error message = 'No space left "
    "on device', buf = 0x7f039018c0e8, total write size = 96, bytes this sub-write = 96, offset = 0)"
)
H5_DEALLOC_ENOSPC = (
    "Can't decrement id ref count (file write failed: time = Tue Dec  1 08:58:28 2026\n, filename = "
    "'/out/patches/.s1.h5.tmp.c22', file descriptor = 23, errno = 28, error message = 'No space left on device', "
    "buf = 0x7f03a8682050, total write size = 11256, bytes this sub-write = 11256, offset = 1490944)"
)


@pytest.mark.parametrize(
    ("number", "kind"),
    [(errno.ENOSPC, "disk_full"), (errno.EDQUOT, "quota"), (errno.EROFS, "read_only"), (errno.EIO, "output_io"),
     (errno.EACCES, "permission")],
)
def test_os_errors_map_to_kinds_with_one_line_messages(tmp_path: Path, number: int, kind: str) -> None:
    """Each OSError errno becomes its kind; the message is one line naming the folder (and free space when full)."""
    err = output_error(OSError(number, os.strerror(number)), tmp_path / "s.h5", slide="s.svs")
    assert err is not None and isinstance(err, AtlasPatchError)
    assert err.kind == kind and err.errno == number
    line = err.one_line()
    assert "\n" not in line and line.startswith("s.svs: ") and str(tmp_path) in line
    if kind == "disk_full":
        assert line.startswith("s.svs: output disk full (") and "MB free on" in line


def test_h5py_messages_carry_errno_in_their_text(tmp_path: Path) -> None:
    """h5py's OSError (errno set) and its destructor's RuntimeError (errno only inside HDF5's text), and errors
    chained to them, all translate to disk_full; an error with no OS cause is not an output error."""
    oserr = OSError(errno.ENOSPC, H5_CREATE_ENOSPC)
    runtime = RuntimeError(H5_DEALLOC_ENOSPC)
    assert errno_of(oserr) == errno.ENOSPC and errno_of(runtime) == errno.ENOSPC
    chained = ValueError("wrapper")
    chained.__cause__ = runtime
    for exc in (oserr, runtime, chained):
        err = output_error(exc, tmp_path / "s.h5")
        assert err is not None and err.kind == "disk_full"
    assert output_error(ValueError("bad width"), tmp_path / "s.h5") is None
    assert output_error(RuntimeError("Unable to open object (object 'x' doesn't exist)"), tmp_path) is None


def test_real_h5py_error_on_a_vanished_folder_is_missing_and_systemic(tmp_path: Path) -> None:
    """h5py creating a file in a folder that no longer exists raises FileNotFoundError; translated it says the
    output folder is missing, systemic. A file that vanished from a folder that still exists is not systemic."""
    with pytest.raises(OSError) as info:
        h5py.File(tmp_path / "gone" / "s.h5", "w")
    err = output_error(info.value, tmp_path / "gone" / "s.h5")
    assert err is not None and err.kind == "output_missing" and err.systemic
    assert err.one_line() == f"output folder is missing ({tmp_path / 'gone'})"
    single = output_error(FileNotFoundError(errno.ENOENT, "No such file"), tmp_path / "s.h5")
    assert single is not None and single.kind == "output_missing" and not single.systemic


def test_permission_is_systemic_only_when_the_folder_refuses_writes(tmp_path: Path) -> None:
    """EACCES on one file in a writable folder (someone else's H5) fails that slide only; when the folder itself is
    not writable every slide would fail, so it is systemic."""
    err = output_error(PermissionError(errno.EACCES, "Permission denied"), tmp_path / "s.h5")
    assert err is not None and err.kind == "permission" and err.systemic is (not os.access(tmp_path, os.W_OK))


def test_disk_full_before_gives_the_figures(tmp_path: Path) -> None:
    """The pre-flight failure names what is needed and what is free, in MB, and the folder."""
    err = disk_full_before(3_200_000, 1_050_000, tmp_path, slide="s.svs")
    assert err.kind == "disk_full" and err.systemic
    assert err.one_line() == f"s.svs: output disk full (needs ~3.2 MB, 1.1 MB free on {tmp_path})"


def test_free_bytes_matches_statvfs(tmp_path: Path) -> None:
    """free_bytes is statvfs's f_bavail × f_frsize; None for a path that does not exist."""
    st = os.statvfs(tmp_path)
    assert free_bytes(tmp_path) == st.f_bavail * st.f_frsize
    assert free_bytes(tmp_path / "nope") is None
    assert isinstance(output_error(OutputError("x", kind="output_io"), tmp_path), OutputError)
