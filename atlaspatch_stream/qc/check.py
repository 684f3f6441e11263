"""`atlaspatch check`: one verdict per output file under `<out>/patches`, with a reason code. Read only.

Files are checked on a thread pool through a bounded window (memory stays flat in the file count); each H5 is opened
read-only without HDF5 file locking and its arrays are read in blocks. One verdict per file, the first problem found:

    corrupt               the file does not open, or a read fails (truncated)
    incomplete            a temporary name, a leftover temporary feature set, or fewer rows than `num_patches`
    schema                a missing dataset or attribute, a wrong dtype or shape
    geometry_mismatch     `patch_size` / `target_magnification` differ from what was asked
    coords_out_of_bounds  a patch corner outside the level-0 image, a negative level or read size
    missing_features      an asked-for encoder has no feature set
    nonfinite_features    a feature row holds NaN or Inf
    slide_changed         the source slide (when still there) has another byte size or file name than recorded

Orphans are reported beside the verdict: temporary files whose writer is gone, stale locks, and H5s whose slide is
gone. h5py is imported lazily (`import atlaspatch_stream` stays light).
"""

from __future__ import annotations

import os
import re
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from ..errors import describe

Code = Literal["ok", "corrupt", "incomplete", "schema", "geometry_mismatch", "coords_out_of_bounds",
               "missing_features", "nonfinite_features", "slide_changed"]
CODES: tuple[str, ...] = get_args(Code)
Orphan = Literal["temp_file", "stale_lock", "slide_gone"]

REQUIRED_ATTRS = ("patch_size", "patch_size_level0", "level0_magnification", "target_magnification", "overlap",
                  "level0_width", "level0_height", "wsi_path", "filename")
TMP_SET_PREFIX = "__tmp_"  # a feature set still being written (upstream and ours)
_TEMP_FILE = re.compile(r"^\.(?P<stem>.+)\.h5\.tmp\.(?:(?P<tag>[0-9a-f]{10}-\d+-\d+)\.[0-9a-f]{12}|[0-9a-f]{32})$")
_BLOCK_BYTES = 4 << 20  # features are scanned for NaN/Inf this many bytes at a time


@dataclass(frozen=True)
class Verdict:
    """The check of one file: its reason code, a one-line detail, and whether it is an orphan (and of what kind)."""

    path: Path
    code: Code
    detail: str = ""
    orphan: Orphan | None = None
    num_patches: int | None = None

    @property
    def ok(self) -> bool:
        """True when the file passed every check (an H5 whose slide is gone can still be ok)."""
        return self.code == "ok"

    @property
    def stem(self) -> str:
        """The slide's output stem (`<stem>.h5`, `.<stem>.h5.tmp...`, `<stem>.lock`)."""
        match = _TEMP_FILE.match(self.path.name)
        return match.group("stem") if match else self.path.name.rsplit(".", 1)[0]

    def to_json(self) -> dict[str, Any]:
        """A plain dict for `--json` and the report."""
        return {"path": str(self.path), "stem": self.stem, "code": self.code, "detail": self.detail,
                "orphan": self.orphan, "num_patches": self.num_patches}


@dataclass(frozen=True)
class Expectations:
    """What the outputs should match, when known.

    Attributes:
        patch_size: `--patch-size`; None: not checked.
        target_mag: `--target-mag`; None: not checked.
        encoders: feature sets every file must have.
        slides: a folder to find each slide in by its recorded file name (else the recorded `wsi_path`).
    """

    patch_size: int | None = None
    target_mag: int | None = None
    encoders: tuple[str, ...] = ()
    slides: Path | None = None


def check_outputs(out: Path, expect: Expectations | None = None, *, threads: int | None = None) -> list[Verdict]:
    """Every verdict for `<out>/patches`, in directory order (blocking; see `iter_verdicts`)."""
    return list(iter_verdicts(out, expect, threads=threads))


def iter_verdicts(out: Path, expect: Expectations | None = None, *,
                  threads: int | None = None) -> Iterator[Verdict]:
    """Verdicts as files are checked, on `threads` workers, at most 4 per worker in flight (flat memory).

    Args:
        out: the output folder (its `patches/` is checked).
        expect: what outputs should match; default: only their own consistency.
        threads: pool size (default: CPU count, at most 8).
    """
    expect = expect or Expectations()
    workers = threads or min(8, os.cpu_count() or 1)
    window: deque[Future[Verdict | None]] = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="atlaspatch-check") as pool:
        for path in candidates(out):
            window.append(pool.submit(check_path, path, expect))
            while len(window) >= 4 * workers:
                found = window.popleft().result()
                if found is not None:
                    yield found
        while window:
            found = window.popleft().result()
            if found is not None:
                yield found


def candidates(out: Path) -> Iterator[Path]:
    """The files `check` looks at under `<out>/patches`: H5s, temporary H5s and locks, lazily."""
    folder = Path(out) / "patches"
    try:
        entries = os.scandir(folder)
    except FileNotFoundError:
        return
    with entries:
        for entry in entries:
            name = entry.name
            if name.endswith((".h5", ".lock")) and not name.startswith(".") or _TEMP_FILE.match(name):
                yield Path(entry.path)


def count_candidates(out: Path) -> int:
    """How many files `iter_verdicts` will check (one directory pass, for progress)."""
    return sum(1 for _ in candidates(out))


def check_path(path: Path, expect: Expectations) -> Verdict | None:
    """The verdict of one file (None for a lock held by a live run: nothing to say about it)."""
    if _TEMP_FILE.match(path.name):
        return _temp_verdict(path)
    if path.suffix == ".lock":
        return _lock_verdict(path)
    return check_h5(path, expect)


def _temp_verdict(path: Path) -> Verdict:
    from ..sources.claims import owner_runs

    tag = _TEMP_FILE.match(path.name).group("tag")  # type: ignore[union-attr]
    runs = owner_runs(tag) if tag else False
    if runs:
        return Verdict(path, "incomplete", "temporary file of a run still writing it")
    where = "of another host's run" if runs is None else "left by a run that is gone"
    return Verdict(path, "incomplete", f"temporary file {where}", orphan="temp_file" if runs is False else None)


def _lock_verdict(path: Path) -> Verdict | None:
    from ..sources.claims import judge

    verdict = judge(path)
    if verdict.state != "stale":
        return None
    return Verdict(path, "incomplete", f"stale lock: {verdict.reason}", orphan="stale_lock")


def check_h5(path: Path, expect: Expectations) -> Verdict:
    """Open one H5 read-only and return the first problem found (or `ok`), with the orphan flag for a gone slide."""
    import h5py

    try:
        with h5py.File(path, "r", locking=False) as f:
            opened = _Opened.read(f)
            code, detail, num = _content_verdict(opened, expect)
    except (OSError, RuntimeError, KeyError, ValueError, TypeError) as exc:
        return Verdict(path, "corrupt", describe(exc))
    slide = _slide_path(opened.attrs, expect)
    if slide is None or not slide.exists():
        return Verdict(path, code, detail, "slide_gone", num)
    if code == "ok":
        changed = slide_change(opened.attrs, slide)
        if changed:
            return Verdict(path, "slide_changed", changed, None, num)
    return Verdict(path, code, detail, None, num)


@dataclass(frozen=True)
class _Opened:
    """An open H5's attributes and datasets, each looked up once (h5py lookups dominate on small files)."""

    attrs: dict[str, Any]
    coords: Any
    passports: Any
    sets: dict[str, Any]  # every features/ dataset, temporary ones included

    @classmethod
    def read(cls, f: Any) -> _Opened:
        group = f.get("features")
        sets = {n: group[n] for n in group} if group is not None and hasattr(group, "keys") else {}
        return cls({k: _plain(v) for k, v in f.attrs.items()}, f.get("coords"), f.get("passports"), sets)

    def final_sets(self) -> dict[str, Any]:
        """The feature sets under their final names."""
        return {n: ds for n, ds in self.sets.items() if not n.startswith(TMP_SET_PREFIX)}


def _content_verdict(f: _Opened, expect: Expectations) -> tuple[Code, str, int | None]:
    problem = _schema_problem(f)
    if problem:
        return "schema", problem, None
    num = int(f.attrs.get("num_patches", f.coords.shape[0]))
    checks: list[tuple[Code, Any]] = [
        ("incomplete", lambda: _incomplete(f, num)),
        ("geometry_mismatch", lambda: _geometry(f.attrs, expect)),
        ("coords_out_of_bounds", lambda: _out_of_bounds(f.coords, f.attrs)),
        ("missing_features", lambda: _missing(f, expect.encoders)),
        ("nonfinite_features", lambda: _nonfinite(f)),
    ]
    for code, check in checks:
        detail = check()
        if detail:
            return code, detail, num
    return "ok", "", num


def _schema_problem(f: _Opened) -> str:
    missing = [k for k in REQUIRED_ATTRS if k not in f.attrs]
    if missing:
        return "missing attribute(s) " + ", ".join(missing)
    for name, ds in (("coords", f.coords), ("passports", f.passports)):
        if ds is None or not hasattr(ds, "dtype"):
            return f"missing dataset {name}"
    coords, passports = f.coords, f.passports
    if coords.dtype != np.int32 or coords.ndim != 2 or coords.shape[1] != 5:
        return f"coords is {coords.dtype} {coords.shape}, expected int32 (N, 5)"
    if passports.dtype.kind != "S" or passports.ndim != 1:
        return f"passports is {passports.dtype} {passports.shape}, expected fixed bytes (N,)"
    for name, ds in f.final_sets().items():
        if ds.dtype != np.float32 or ds.ndim != 2:
            return f"features/{name} is {ds.dtype} {ds.shape}, expected float32 (N, D)"
    return ""


def _incomplete(f: _Opened, num: int) -> str:
    rows, passports = f.coords.shape[0], f.passports.shape[0]
    if rows != num or passports != num:
        return f"coords has {rows} rows, passports {passports}, num_patches is {num}"
    for name, ds in f.sets.items():
        if name.startswith(TMP_SET_PREFIX):
            return f"features/{name} is a feature set still being written"
        if ds.shape[0] != num:
            return f"features/{name} has {ds.shape[0]} rows, num_patches is {num}"
    return ""


def _geometry(attrs: Mapping[str, Any], expect: Expectations) -> str:
    wanted = {"patch_size": expect.patch_size, "target_magnification": expect.target_mag}
    diffs = [f"{k}={attrs[k]} (expected {v})" for k, v in wanted.items() if v is not None and int(attrs[k]) != v]
    return "; ".join(diffs)


def _out_of_bounds(coords: Any, attrs: Mapping[str, Any]) -> str:
    width, height = int(attrs["level0_width"]), int(attrs["level0_height"])
    for start, block in _blocks(coords):
        bad = ((block[:, 0] < 0) | (block[:, 0] >= width) | (block[:, 1] < 0) | (block[:, 1] >= height)
               | (block[:, 2] <= 0) | (block[:, 3] <= 0) | (block[:, 4] < 0))
        if bad.any():
            row = start + int(np.argmax(bad))
            return f"row {row}: {block[row - start].tolist()} outside the {width}x{height} slide"
    return ""


def _missing(f: _Opened, encoders: tuple[str, ...]) -> str:
    have = {n.lower() for n in f.final_sets()}
    lacking = [e for e in encoders if e.lower() not in have]
    return ("no features/" + ", features/".join(lacking)) if lacking else ""


def _nonfinite(f: _Opened) -> str:
    found = []
    for name, ds in f.final_sets().items():
        bad = sum(int((~np.isfinite(block).all(axis=1)).sum()) for _, block in _blocks(ds))
        if bad:
            found.append(f"features/{name}: {bad} of {ds.shape[0]} rows with NaN or Inf")
    return "; ".join(found)


def _blocks(ds: Any) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, rows) blocks of about `_BLOCK_BYTES` each (flat memory whatever the slide's size)."""
    row_bytes = max(1, int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize)
    step = max(1, _BLOCK_BYTES // row_bytes)
    for start in range(0, ds.shape[0], step):
        yield start, ds[start : start + step]


def _slide_path(attrs: Mapping[str, Any], expect: Expectations) -> Path | None:
    if expect.slides is not None:
        return expect.slides / str(attrs["filename"])
    recorded = attrs.get("wsi_path")
    return Path(str(recorded)) if recorded else None


def slide_change(attrs: Mapping[str, Any], slide: Path) -> str:
    """How the slide at `slide` differs from what the H5 recorded (file name, byte size); "" when it matches."""
    if slide.name != str(attrs["filename"]):
        return f"slide {slide} is not {attrs['filename']!r}"
    recorded = attrs.get("source_size")
    if recorded is not None and slide.is_file() and slide.stat().st_size != int(recorded):
        return f"slide {slide} is {slide.stat().st_size} bytes, was {int(recorded)} when processed"
    return ""


def read_summary(path: Path) -> tuple[dict[str, Any], np.ndarray]:
    """An H5's root attributes and its coords (int32 (N, 5)), for the report's cards."""
    import h5py

    with h5py.File(path, "r", locking=False) as f:
        return {k: _plain(v) for k, v in f.attrs.items()}, np.asarray(f["coords"][...], dtype=np.int32)


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    return value


@dataclass(frozen=True)
class Requeued:
    """What `requeue` did: files deleted and daemon ledger records marked for retry."""

    deleted: tuple[Path, ...]
    ledger_records: int


def needs_rebuild(verdict: Verdict) -> bool:
    """Whether `process` would skip this file although it is not ok (so it must go for a rebuild).

    A missing feature set is added by `process` itself; a stale lock is taken over by it; a temporary file of a live
    run is left alone. Everything else that is not ok is deleted.
    """
    if verdict.ok or verdict.code == "missing_features" or verdict.orphan == "stale_lock":
        return False
    return not (_TEMP_FILE.match(verdict.path.name) and verdict.orphan != "temp_file")


def requeue(verdicts: list[Verdict], ledger: Path | None) -> Requeued:
    """Delete every file `needs_rebuild` names; with a daemon `ledger`, mark those slides for retry too."""
    deleted = []
    for verdict in verdicts:
        if needs_rebuild(verdict):
            try:
                verdict.path.unlink()
            except FileNotFoundError:
                continue
            deleted.append(verdict.path)
    marked = 0
    if ledger is not None and ledger.exists() and deleted:
        from ..sources.ledger import requeue_outputs

        marked = len(requeue_outputs(ledger, sorted({Verdict(p, "ok").stem for p in deleted})))
    return Requeued(tuple(deleted), marked)
