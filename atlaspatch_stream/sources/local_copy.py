"""Node-local staging (`--stage-dir`): each slide is copied to local disk before it is read, and deleted after.

Random tile reads are slow on network filesystems (NFS, Lustre, GPFS); one sequential copy to node-local scratch
followed by local random reads is much faster (TRIDENT's `--wsi_cache` does the same). Copies live in one private
folder per process, `<stage-dir>/atlaspatch-stage.<owner>.<hex>/`, removed when the run ends; a folder left behind
by a killed process of this host is removed by the next one. At most `max_bytes` are staged at once: the copy of the
next slide waits for room and runs while the slides already staged are processed. A slide that cannot be staged (no
room on the local disk, a copy error, a multi-file format other than MRXS or a DICOM folder) is read where it is,
with a warning. Only `SlideJob.read_path` points at the copy: names, H5 attributes, claims and the run report keep
the original path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import outputs
from ..items import SlideJob
from ..outputs import claims

log = logging.getLogger("atlaspatch_stream")

DEFAULT_STAGE_MAX_GB = 20.0
CHUNK = 8 << 20  # bytes per read while copying (the copy checks between chunks whether the run was closed)
RESERVE = 1 << 30  # bytes left free on the local disk
_FOLDER = re.compile(r"^atlaspatch-stage\.(?P<tag>[0-9a-f]{10}-\d+-\d+)\.[0-9a-f]{8}$")
_IN_PLACE_SUFFIXES = {".vms", ".vmu"}  # Hamamatsu VMS/VMU name their image files inside the index: read in place


@dataclass(frozen=True)
class CopyOptions:
    """Where to stage slides, and how many gigabytes (10⁹ bytes) may be staged at once."""

    root: Path
    max_gb: float = DEFAULT_STAGE_MAX_GB

    def __post_init__(self) -> None:
        if not self.max_gb > 0:
            raise ValueError(f"--stage-max-gb must be > 0, got {self.max_gb:g}")

    @property
    def max_bytes(self) -> int:
        """The budget in bytes."""
        return int(self.max_gb * 1e9)


def slide_files(path: Path) -> list[tuple[Path, Path]] | None:
    """(file, destination relative to the copy's folder) for every file of the slide; None when it is read in place.

    A plain file is itself; a DICOM series folder is its files; an MRXS slide is the `.mrxs` file and its data folder
    of the same stem beside it.
    """
    path = Path(path)
    if path.is_dir():
        return [(f, Path(path.name) / f.name) for f in sorted(path.iterdir()) if f.is_file()]
    suffix = path.suffix.lower()
    if suffix in _IN_PLACE_SUFFIXES:
        return None
    files = [(path, Path(path.name))]
    if suffix == ".mrxs":
        data = path.parent / path.stem
        files += [(f, Path(path.stem) / f.name) for f in sorted(data.iterdir()) if f.is_file()] if data.is_dir() else []
    return files


def slide_bytes(path: Path) -> int:
    """Bytes of every file of the slide (0 when it cannot be listed: opening it will say why)."""
    try:
        files = slide_files(path)
        return sum(f.stat().st_size for f, _ in files) if files is not None else Path(path).stat().st_size
    except OSError:
        return 0


def free_to_take(job: SlideJob, output: Path, skip_existing: bool) -> bool:
    """False when the run will not read the slide's pixels anyway: its output exists (with `skip_existing`), or a
    live process holds its claim.

    Only a hint (the claim taken when the slide starts decides); it saves copying, or stealing, slides that are done
    or taken.
    """
    if skip_existing and outputs.h5_path(output, job.stem).exists():
        return False
    try:
        return claims.judge(outputs.lock_path(output, job.stem)).state != "held"
    except OSError:
        return True


@dataclass
class CopyStats:
    """What staging did: slides copied, bytes, the most held at once, slides read in place, time copying/waiting."""

    staged: int = 0
    staged_bytes: int = 0
    peak_bytes: int = 0
    peak_slides: int = 0
    in_place: int = 0
    copy_s: float = 0.0
    wait_s: float = 0.0


class LocalCopier(contextlib.AbstractContextManager["LocalCopier"]):
    """Copies slides into a private folder under `options.root`, within `options.max_bytes`. Thread-safe.

    `copy(job)` (blocking) returns the job with `read_path` set to the copy (or the job unchanged when it is read in
    place); `release(job)` deletes the copy once its result is in; `close()` deletes everything left. Use it as a
    context manager.
    """

    def __init__(self, options: CopyOptions) -> None:
        self.options = options
        root = Path(options.root)
        root.mkdir(parents=True, exist_ok=True)
        _sweep_dead(root)
        self.folder = root / f"atlaspatch-stage.{claims.owner_tag()}.{uuid.uuid4().hex[:8]}"
        self.folder.mkdir(mode=0o700)
        self.stats = CopyStats()
        self._cond = threading.Condition()
        self._used = 0
        self._held: dict[int, tuple[int, Path]] = {}
        self._closed = False

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- staging --------------------------------------------------------------------------------------------------

    def copy(self, job: SlideJob) -> SlideJob:
        """Copy the slide (waiting for room in the budget); the job reading the copy, or `job` to read in place."""
        try:
            files = slide_files(job.path)
            size = sum(f.stat().st_size for f, _ in files) if files is not None else 0
        except OSError:
            return self._in_place(job, "")  # opening the original reports the problem
        if files is None:
            return self._in_place(job, "a multi-file format read in place")
        slot = self.folder / f"{job.slide_id}-{uuid.uuid4().hex[:6]}"
        if not self._reserve(job.slide_id, size, slot):
            return self._in_place(job, "")
        started = time.perf_counter()
        try:
            self._check_room(size)
            for source, relative in files:
                self._copy(source, slot / relative)
        except (OSError, _Closed) as exc:
            self.release(job)
            return self._in_place(job, "" if isinstance(exc, _Closed) else f"cannot stage it ({exc})")
        with self._cond:
            self.stats.staged += 1
            self.stats.staged_bytes += size
            self.stats.copy_s += time.perf_counter() - started
        return dataclasses.replace(job, read_path=slot / job.path.name)

    def copy_for(self, job: SlideJob, output: Path, skip_existing: bool) -> SlideJob:
        """The job reading a local copy when the run will read the slide's pixels (`free_to_take`), else `job`."""
        return self.copy(job) if free_to_take(job, output, skip_existing) else job

    def release(self, job: SlideJob) -> None:
        """Delete the slide's copy (nothing when it has none) and free its room in the budget."""
        with self._cond:
            held = self._held.pop(job.slide_id, None)
            if held is None:
                return
            self._used -= held[0]
            self._cond.notify_all()
        shutil.rmtree(held[1], ignore_errors=True)

    def close(self) -> None:
        """Stop staging (waiting copies give up) and delete the private folder."""
        with self._cond:
            self._closed = True
            self._held.clear()
            self._cond.notify_all()
        shutil.rmtree(self.folder, ignore_errors=True)

    def statistics(self) -> dict[str, Any]:
        """`CopyStats` as a dict, plus the bytes and slides staged now."""
        with self._cond:
            return {**dataclasses.asdict(self.stats), "used_bytes": self._used, "held": len(self._held)}

    # -- internals ------------------------------------------------------------------------------------------------

    def _reserve(self, slide_id: int, size: int, slot: Path) -> bool:
        """Wait until `size` bytes fit in the budget (a slide bigger than the budget goes alone); False once closed."""
        started = time.perf_counter()
        with self._cond:
            while not self._closed and self._used and self._used + size > self.options.max_bytes:
                self._cond.wait(0.5)
            self.stats.wait_s += time.perf_counter() - started
            if self._closed:
                return False
            self._used += size
            self._held[slide_id] = (size, slot)
            self.stats.peak_bytes = max(self.stats.peak_bytes, self._used)
            self.stats.peak_slides = max(self.stats.peak_slides, len(self._held))
            return True

    def _check_room(self, size: int) -> None:
        free = shutil.disk_usage(self.folder).free
        if free < size + RESERVE:
            raise OSError(f"only {free / 1e9:.1f} GB free on {self.options.root}")

    def _copy(self, source: Path, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        buffer = bytearray(CHUNK)
        view = memoryview(buffer)
        with open(source, "rb") as fin, open(target, "wb") as fout:
            while n := fin.readinto(buffer):
                if self._closed:
                    raise _Closed
                fout.write(view[:n])

    def _in_place(self, job: SlideJob, why: str) -> SlideJob:
        with self._cond:
            self.stats.in_place += 1
        if why:
            log.warning("%s: read in place, not staged: %s", job.name, why)
        return job


class _Closed(Exception):
    """The stager was closed while a copy ran."""


def _sweep_dead(root: Path) -> None:
    """Remove staging folders of processes of this host that no longer run (a `kill -9`, a node crash)."""
    with contextlib.suppress(OSError):
        for entry in root.iterdir():
            match = _FOLDER.match(entry.name)
            if match is not None and claims.owner_runs(match.group("tag")) is False:
                log.warning("removing %s, left by a staging process that no longer runs", entry)
                shutil.rmtree(entry, ignore_errors=True)
