"""The H5 store under output failures: injected at the OS-write level under HDF5 (testing.faults), on a real full
tmpfs, on a read-only remount, with the folder made unwritable or removed mid-write. Every failure is one
OutputError, leaves no temporary file, and never crashes the interpreter."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest

from atlaspatch_stream.errors import OutputError
from atlaspatch_stream.outputs import SlideAttrs, claims, h5io
from atlaspatch_stream.outputs.h5store import (
    SlideH5,
    check_free_space,
    estimate_h5_bytes,
    inspect_h5,
    read_coords,
)
from atlaspatch_stream.testing import faults
from tests.helpers import mounted_tmpfs

ROOT = Path(__file__).resolve().parents[2]
ATTRS = SlideAttrs(256, 512, 40, 20, 0, 9000, 7000, "slides/s.svs", "s.svs", mpp=0.25, magnification=40)
DIMS = {"a": 16, "b": 48}
CLEAN_STDERR_MARKERS = ("Traceback", "Exception ignored", "Fatal Python error", "Segmentation fault")


def _coords(n: int) -> np.ndarray:
    coords = np.zeros((n, 5), np.int32)
    coords[:, 0] = np.arange(n)
    coords[:, 2:4] = 512
    return coords


def write_slide(final: Path, n: int, dims: dict[str, int], batch: int = 50) -> Path:
    """A whole slide's store life: create (with the sets' widths), begin every set, rows in batches, finalize."""
    store = SlideH5.create(final, ATTRS, _coords(n), final.stem, 64, 32, dims)
    try:
        for name, dim in dims.items():
            store.begin_feature(name, dim)
        for start in range(0, n, batch):
            rows = np.arange(start, min(n, start + batch))
            for name, dim in dims.items():
                store.write_rows(name, rows, np.full((rows.size, dim), start, np.float32))
        return store.finalize()
    except BaseException:
        store.abort()
        raise


def _stage_of_failure(final: Path, n: int, dims: dict[str, int]) -> str:
    """Where the failure surfaced: `create`, `rows` or `finalize` (the store is aborted in every case)."""
    try:
        store = SlideH5.create(final, ATTRS, _coords(n), final.stem, 64, 32, dims)
    except OutputError:
        return "create"
    try:
        for name, dim in dims.items():
            store.begin_feature(name, dim)
        for start in range(0, n, 50):
            rows = np.arange(start, min(n, start + 50))
            for name, dim in dims.items():
                store.write_rows(name, rows, np.ones((rows.size, dim), np.float32))
    except OutputError:
        store.abort()
        return "rows"
    try:
        store.finalize()
    except OutputError:
        store.abort()
        return "finalize"
    return "none"


def _writes_of(scenario_dir: Path, n: int, dims: dict[str, int]) -> int:
    with faults.count_writes() as counter:
        write_slide(scenario_dir / "count.h5", n, dims)
    (scenario_dir / "count.h5").unlink()
    return counter.count


# -- fault injection under HDF5 ---------------------------------------------------------------------------------------


def test_every_failing_write_of_a_two_set_slide_is_one_clean_output_error(tmp_path: Path) -> None:
    """For every k across the whole write sequence of a slide with two feature sets, the k-th OS write (and every
    later one) fails, alternately ENOSPC and EIO: one OutputError of the matching kind, no file left at all, and the
    next slide written after it is complete."""
    total = _writes_of(tmp_path, 300, DIMS)
    assert total > 20
    stages = set()
    for k in range(1, total + 1):
        number = errno.ENOSPC if k % 2 else errno.EIO
        with faults.inject(k, number) as injected:
            stages.add(_stage_of_failure(tmp_path / "s.h5", 300, DIMS))
        assert injected.failed >= 1
        assert list(tmp_path.iterdir()) == [], k
    assert stages == {"create", "finalize"}  # HDF5 defers writes: rows of this size are written at close
    assert inspect_h5(write_slide(tmp_path / "next.h5", 300, DIMS)) is not None


def test_failures_while_rows_are_written_are_caught_where_they_happen(tmp_path: Path) -> None:
    """A set larger than HDF5's chunk cache (8 MiB in HDF5 2.0) is written while rows arrive: failures injected
    across that sequence surface in `write_rows` as OutputError(disk_full), and nothing is left behind."""
    dims = {"a": 16, "b": 1200}
    total = _writes_of(tmp_path, 2000, dims)
    stages = []
    for k in range(1, total + 1, max(1, total // 25)):
        with faults.inject(k, errno.ENOSPC):
            stages.append(_stage_of_failure(tmp_path / "s.h5", 2000, dims))
        assert list(tmp_path.iterdir()) == []
    assert "rows" in stages and "none" not in stages


def test_fsync_failure_at_finalize_leaves_nothing(tmp_path: Path) -> None:
    """NFS reports ENOSPC/EDQUOT late, at fsync: finalize raises OutputError(quota) and no file becomes visible."""
    with faults.inject(1, errno.EDQUOT, ops=("fsync",)), pytest.raises(OutputError) as info:
        write_slide(tmp_path / "s.h5", 100, DIMS)
    assert info.value.kind == "quota" and info.value.systemic
    assert list(tmp_path.iterdir()) == []


def test_failing_writes_while_adding_a_set_to_an_existing_file(tmp_path: Path) -> None:
    """Reuse writes in place: for every k while a set is added to a complete file, the failure is an OutputError,
    no temporary file appears, and the file afterwards reads with its original set, or with the new set complete
    (the failure struck after its rows were durable), or is unreadable, which a rerun rebuilds; it never shows a
    set without its rows."""
    final = write_slide(tmp_path / "s.h5", 200, {"a": 16})
    pristine = final.read_bytes()
    with faults.count_writes() as counter:
        _add_set(final)
    total = counter.count
    outcomes = []
    for k in range(1, total + 1):
        final.write_bytes(pristine)
        with faults.inject(k, errno.ENOSPC), pytest.raises(OutputError):
            _add_set(final)
        assert [p.name for p in tmp_path.iterdir()] == ["s.h5"]
        existing = inspect_h5(final)
        outcomes.append("unreadable" if existing is None else ",".join(sorted(existing.features)))
        if existing is not None and "b" in existing.features:
            with h5py.File(final, "r") as f:
                np.testing.assert_array_equal(f["features/b"][...], np.ones((200, 300), np.float32))
        assert existing is None or existing.features in ({"a": 200}, {"a": 200, "b": 200})
    assert "a" in outcomes


def _add_set(final: Path) -> None:
    store = SlideH5.open_existing(final, 200)
    try:
        store.begin_feature("b", 300)
        store.write_rows("b", np.arange(200), np.ones((200, 300), np.float32))
        store.finalize()
    except BaseException:
        store.abort()
        raise


MATRIX_CHILD = textwrap.dedent("""
    import errno, sys
    from pathlib import Path
    import numpy as np
    sys.path.insert(0, sys.argv[2])
    from tests.outputs.test_h5_faults import DIMS, write_slide, _coords, ATTRS
    from atlaspatch_stream.outputs.h5store import SlideH5
    from atlaspatch_stream.errors import OutputError
    from atlaspatch_stream.testing import faults
    out, total = Path(sys.argv[1]), int(sys.argv[3])
    kept = []
    for k in range(1, total + 1):
        with faults.inject(k, errno.ENOSPC if k % 2 else errno.EIO):
            if k % 3 == 0:  # a library user who drops the store without abort: the exit hook must clean up
                try:
                    store = SlideH5.create(out / f"s{k}.h5", ATTRS, _coords(300), "s", 64, 32, DIMS)
                except OutputError:
                    continue
                kept.append(store)
                try:
                    for name, dim in DIMS.items():
                        store.begin_feature(name, dim)
                        store.write_rows(name, np.arange(300), np.ones((300, dim), np.float32))
                except OutputError:
                    pass
            else:
                try:
                    write_slide(out / f"s{k}.h5", 300, DIMS)
                except OutputError as exc:
                    print(exc.one_line())
    print("END", flush=True)
""")


def test_failure_matrix_in_a_subprocess_exits_without_crash_or_traceback(tmp_path: Path) -> None:
    """The whole failure matrix runs in a fresh interpreter, a third of the failed stores abandoned without abort:
    the interpreter exits 0, stderr holds no traceback, ignored exception or fatal error, and at exit no temporary
    file is left (the exit hook aborted the abandoned stores on the H5 thread)."""
    out = tmp_path / "out"
    out.mkdir()
    total = _writes_of(tmp_path, 300, DIMS)
    done = subprocess.run([sys.executable, "-c", MATRIX_CHILD, str(out), str(ROOT), str(total)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not any(marker in done.stderr for marker in CLEAN_STDERR_MARKERS), done.stderr[-3000:]
    assert done.stdout.splitlines()[-1] == "END"
    assert any(line.startswith("output disk full") for line in done.stdout.splitlines())
    assert [p.name for p in out.iterdir() if ".tmp." in p.name] == []


# -- real filesystems -----------------------------------------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (root only; skipped where it cannot be mounted)."""
    with mounted_tmpfs(tmp_path / "mnt", "2m") as where:
        yield where


def test_tmpfs_too_small_fails_before_writing_with_the_figures(tmpfs: Path) -> None:
    """A slide whose estimate exceeds the free space fails at create with `needs ~X MB, Y MB free on <folder>`,
    before any file exists; a second store is refused while the first's reservation is still unwritten."""
    final = tmpfs / "patches" / "big.h5"
    with pytest.raises(OutputError) as info:
        SlideH5.create(final, ATTRS, _coords(4000), "big", 64, 32, {"a": 512})
    assert info.value.kind == "disk_full"
    assert f"needs ~9.2 MB, 2.1 MB free on {final.parent})" in info.value.one_line()
    assert list(final.parent.iterdir()) == []
    first = SlideH5.create(tmpfs / "patches" / "a.h5", ATTRS, _coords(1000), "a", 1024, 32, {"a": 256})
    try:
        with pytest.raises(OutputError, match="output disk full"):
            SlideH5.create(tmpfs / "patches" / "b.h5", ATTRS, _coords(1000), "b", 1024, 32, {"a": 256})
    finally:
        first.abort()
    assert list(final.parent.iterdir()) == []


REAL_ENOSPC_CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    import numpy as np
    sys.path.insert(0, sys.argv[2])
    from tests.outputs.test_h5_faults import ATTRS, _coords
    from atlaspatch_stream.outputs.h5store import SlideH5
    from atlaspatch_stream.errors import OutputError
    out = Path(sys.argv[1])
    store = SlideH5.create(out / "s.h5", ATTRS, _coords(1000), "s", 64, 32, {"a": 256})
    store.begin_feature("a", 256)
    with open(out / "filler", "wb", buffering=0) as fh:  # another writer fills the disk meanwhile
        try:
            while True:
                fh.write(bytes(65536))
        except OSError:
            pass
    try:
        store.write_rows("a", np.arange(1000), np.ones((1000, 256), np.float32))
        store.finalize()
    except OutputError as exc:
        print(exc.kind, exc.one_line(), flush=True)
        store.abort()
""")


def test_real_enospc_mid_write_on_tmpfs_fails_cleanly(tmpfs: Path) -> None:
    """On a real 2 MiB tmpfs, another writer fills the disk after the slide started: the store fails with
    OutputError(disk_full) naming the free space, the temporary file is removed, and the interpreter exits 0 with a
    clean stderr (HDF5 never saw the error, so nothing is closed in an error state)."""
    out = tmpfs / "patches"
    out.mkdir()
    done = subprocess.run([sys.executable, "-c", REAL_ENOSPC_CHILD, str(out), str(ROOT)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not any(marker in done.stderr for marker in CLEAN_STDERR_MARKERS), done.stderr[-3000:]
    assert done.stdout.startswith("disk_full output disk full (0.0 MB free on ")
    assert sorted(p.name for p in out.iterdir()) == ["filler"]


def test_read_only_remount_between_slides(tmpfs: Path) -> None:
    """After the output filesystem is remounted read-only, a new slide's create, a reuse open and a lock each fail
    with OutputError(read_only), systemic; finished files stay readable."""
    done = write_slide(tmpfs / "patches" / "done.h5", 50, {"a": 8})
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    try:
        for attempt in (
            lambda: SlideH5.create(tmpfs / "patches" / "new.h5", ATTRS, _coords(5), "new", 64, 32, {"a": 8}),
            lambda: SlideH5.open_existing(done, 50),
            lambda: claims.try_claim(tmpfs / "patches" / "new.lock"),
        ):
            with pytest.raises(OutputError) as info:
                attempt()
            assert info.value.kind == "read_only" and info.value.systemic
            assert info.value.one_line() == f"output filesystem is read-only ({tmpfs / 'patches'})"
        assert read_coords(done).shape == (50, 5)
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], check=True)


CHMOD_CHILD = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    import numpy as np
    sys.path.insert(0, sys.argv[2])
    from tests.outputs.test_h5_faults import ATTRS, _coords
    from atlaspatch_stream.outputs.h5store import SlideH5
    from atlaspatch_stream.errors import OutputError
    if os.geteuid() == 0:  # root ignores permissions: write as an ordinary user (after the imports, which need root)
        os.setgid(65534)
        os.setuid(65534)
    out = Path(sys.argv[1])
    store = SlideH5.create(out / "s.h5", ATTRS, _coords(100), "s", 64, 32, {"a": 8})
    store.begin_feature("a", 8)
    store.write_rows("a", np.arange(100), np.ones((100, 8), np.float32))
    out.chmod(0o555)  # the folder becomes read-only while the file is open
    try:
        store.finalize()
    except OutputError as exc:
        print(exc.kind, exc.systemic, exc.one_line(), flush=True)
        store.abort()
""")


def test_folder_made_read_only_mid_write() -> None:
    """The output folder loses write permission while a slide is open (as an ordinary user: root ignores
    permissions, so as root the writer drops to uid 65534): finalize cannot rename and fails with
    OutputError(permission), systemic; nothing looks complete; the temporary file cannot be removed while the folder
    is unwritable (logged), and the next start-up sweep removes it once it is writable again."""
    base = Path(tempfile.mkdtemp(prefix="atlaspatch-ro-"))  # pytest's own tmp root is private to root
    try:
        base.chmod(0o755)
        out = base / "patches"
        out.mkdir()
        if os.geteuid() == 0:
            os.chown(out, 65534, 65534)
        done = subprocess.run([sys.executable, "-c", CHMOD_CHILD, str(out), str(ROOT)], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        assert not any(marker in done.stderr for marker in ("Traceback", "Exception ignored", "Fatal Python error"))
        assert done.stdout.startswith(f"permission True no permission to write the output ({out / 's.h5'})")
        assert "the next start-up sweep removes it" in done.stderr
        names = [p.name for p in out.iterdir()]
        assert "s.h5" not in names and len(names) == 1 and names[0].startswith(".s.h5.tmp.")
        out.chmod(0o755)
        assert claims.sweep_orphans(base).one_line() == "swept 1 temporary file and 0 stale locks"
        assert list(out.iterdir()) == []
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_output_folder_removed_mid_write(tmp_path: Path) -> None:
    """The output folder is deleted while a slide is open: finalize fails with OutputError(missing), systemic,
    naming the folder; abort does not raise."""
    out = tmp_path / "patches"
    store = SlideH5.create(out / "s.h5", ATTRS, _coords(100), "s", 64, 32, {"a": 8})
    store.begin_feature("a", 8)
    store.write_rows("a", np.arange(100), np.ones((100, 8), np.float32))
    shutil.rmtree(out)
    with pytest.raises(OutputError) as info:
        store.finalize()
    assert info.value.kind == "output_missing" and info.value.systemic
    assert info.value.one_line() == f"output folder is missing ({out})"
    store.abort()
    assert not out.exists()


# -- one thread, estimates ------------------------------------------------------------------------------------------


class _ThreadRecorder(h5io.OsIO):
    def __init__(self) -> None:
        self.threads: set[str] = set()

    def pwrite_all(self, fd: int, data: memoryview, offset: int) -> None:
        self.threads.add(threading.current_thread().name)
        super().pwrite_all(fd, data, offset)

    def pread_into(self, fd: int, buf: memoryview, offset: int) -> int:
        self.threads.add(threading.current_thread().name)
        return super().pread_into(fd, buf, offset)


def test_all_hdf5_io_runs_on_the_one_h5_thread(tmp_path: Path) -> None:
    """Six threads write slides and two read existing ones concurrently: every OS call HDF5 makes for our files
    comes from the `atlaspatch-h5` thread, and every file is complete and correct."""
    recorder = _ThreadRecorder()
    previous = h5io.use_os_io(recorder)
    try:
        existing = write_slide(tmp_path / "existing.h5", 40, {"a": 4})
        errors: list[BaseException] = []

        def work(i: int) -> None:
            try:
                if i < 6:
                    write_slide(tmp_path / f"s{i}.h5", 120 + i, DIMS, batch=7)
                else:
                    for _ in range(20):
                        assert inspect_h5(existing) is not None and read_coords(existing).shape == (40, 5)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert errors == []
    finally:
        h5io.use_os_io(previous)
    assert recorder.threads == {"atlaspatch-h5"}
    for i in range(6):
        with h5py.File(tmp_path / f"s{i}.h5", "r") as f:
            assert f["features/b"].shape == (120 + i, 48)
            np.testing.assert_array_equal(f["features/a"][:, 0], np.repeat(np.arange(0, 120 + i, 7), 7)[: 120 + i])


@pytest.mark.parametrize(("n", "dims", "write_batch", "chunk"), [
    (0, {}, 8192, 32), (1, {"a": 512}, 8192, 32), (7, {"a": 1536}, 256, 64), (1000, {"a": 3, "b": 1024}, 8192, 32),
    (8193, {"a": 768}, 8192, 32), (20000, {"a": 512, "b": 9}, 256, 64),
])
def test_estimate_is_an_upper_bound_close_to_the_real_size(
    tmp_path: Path, n: int, dims: dict[str, int], write_batch: int, chunk: int
) -> None:
    """The size estimate is never below the size of the real finished file and at most 5 % + 96 KB above it."""
    final = tmp_path / "s.h5"
    store = SlideH5.create(final, ATTRS, _coords(n), "s", write_batch, chunk, dims)
    for name, dim in dims.items():
        store.begin_feature(name, dim)
        if n:
            store.write_rows(name, np.arange(n), np.ones((n, dim), np.float32))
    store.finalize()
    real, estimate = final.stat().st_size, estimate_h5_bytes(n, dims.values(), write_batch, chunk)
    assert real <= estimate <= real * 1.05 + 96_000


def test_check_free_space_counts_reservations(tmp_path: Path) -> None:
    """check_free_space passes what fits and refuses, with the figures, what does not once others' reservations are
    subtracted."""
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    check_free_space(tmp_path, 1024)
    with pytest.raises(OutputError, match=r"output disk full \(needs ~0\.0 MB, 0\.0 MB free on "):
        check_free_space(tmp_path, 1024, reserved=free)
