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
gone. The H5 itself is read by `outputs.h5check` (h5py, imported lazily: `import atlaspatch_stream` stays light).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Literal, cast

from ..cpu import usable_cores
from ..errors import describe

Code = Literal["ok", "corrupt", "incomplete", "schema", "geometry_mismatch", "coords_out_of_bounds",
               "missing_features", "nonfinite_features", "slide_changed"]
Orphan = Literal["temp_file", "stale_lock", "slide_gone"]

_TEMP_FILE = re.compile(r"^\.(?P<stem>.+)\.h5\.tmp\.(?:(?P<tag>[0-9a-f]{10}-\d+-\d+)\.[0-9a-f]{12}|[0-9a-f]{32})$")


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
        """The slide's output stem."""
        return stem_of(self.path)

    def to_json(self) -> dict[str, Any]:
        """A plain dict for `--json` and the report."""
        return {"path": str(self.path), "stem": self.stem, "code": self.code, "detail": self.detail,
                "orphan": self.orphan, "num_patches": self.num_patches}


def stem_of(path: Path) -> str:
    """The output stem a file under `<out>/patches` belongs to (`<stem>.h5`, `.<stem>.h5.tmp...`, `<stem>.lock`)."""
    match = _TEMP_FILE.match(path.name)
    return match.group("stem") if match else path.name.rsplit(".", 1)[0]


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
        threads: pool size (default: the usable cores, at most 8).
    """
    expect = expect or Expectations()
    workers = threads or min(8, usable_cores())
    with ThreadPoolExecutor(workers, thread_name_prefix="atlaspatch-check") as pool:
        pending = (pool.submit(check_path, path, expect) for path in candidates(out))
        window = deque(islice(pending, 4 * workers))
        while window:
            found = window.popleft().result()
            window.extend(islice(pending, 1))  # one in, one out: the window stays full until the files run out
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
    from ..outputs.claims import owner_runs

    tag = _TEMP_FILE.match(path.name).group("tag")  # type: ignore[union-attr]
    runs = owner_runs(tag) if tag else False
    if runs:
        return Verdict(path, "incomplete", "temporary file of a run still writing it")
    where = "of another host's run" if runs is None else "left by a run that is gone"
    return Verdict(path, "incomplete", f"temporary file {where}", orphan="temp_file" if runs is False else None)


def _lock_verdict(path: Path) -> Verdict | None:
    from ..outputs.claims import judge

    verdict = judge(path)
    if verdict.state != "stale":
        return None
    return Verdict(path, "incomplete", f"stale lock: {verdict.reason}", orphan="stale_lock")


def check_h5(path: Path, expect: Expectations) -> Verdict:
    """Open one H5 read-only and return the first problem found (or `ok`), with the orphan flag for a gone slide."""
    from ..outputs.h5check import inspect_output

    try:
        found = inspect_output(path, expect.patch_size, expect.target_mag, expect.encoders)
    except (OSError, RuntimeError, KeyError, ValueError, TypeError) as exc:
        return Verdict(path, "corrupt", describe(exc))
    code, detail = cast(Code, found.code), found.detail
    slide = _slide_path(found.attrs, expect)
    if slide is None or not slide.exists():
        return Verdict(path, code, detail, "slide_gone", found.num_patches)
    changed = slide_change(found.attrs, slide) if code == "ok" else ""
    if changed:
        code, detail = "slide_changed", changed
    return Verdict(path, code, detail, None, found.num_patches)


def _slide_path(attrs: Mapping[str, Any], expect: Expectations) -> Path | None:
    if expect.slides is not None and attrs.get("filename"):
        return expect.slides / str(attrs["filename"])
    recorded = attrs.get("wsi_path")
    return Path(str(recorded)) if recorded else None


def slide_change(attrs: Mapping[str, Any], slide: Path) -> str:
    """How the slide at `slide` differs from what the H5 recorded: its file name, then its byte size (our files) or,
    for files without one (upstream's), its level-0 size read from the slide; "" when it matches."""
    if slide.name != str(attrs["filename"]):
        return f"slide {slide} is not {attrs['filename']!r}"
    recorded = attrs.get("source_size")
    if recorded is None:
        return _level0_change(attrs, slide)
    size = slide.stat().st_size if slide.is_file() else int(recorded)
    return "" if size == int(recorded) else f"slide {slide} is {size} bytes, was {int(recorded)} when processed"


def _level0_change(attrs: Mapping[str, Any], slide: Path) -> str:
    from ..backends.slides import open_slide
    from ..errors import SlideError

    try:
        handle = open_slide(slide)
    except SlideError as exc:
        return f"slide {slide} no longer opens: {exc}"
    with contextlib.closing(handle):
        now, was = (handle.info.width, handle.info.height), (int(attrs["level0_width"]), int(attrs["level0_height"]))
    return f"slide {slide} is {now[0]}x{now[1]}, was {was[0]}x{was[1]} when processed" if now != was else ""


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
        from ..daemon.ledger.status import requeue_outputs

        marked = len(requeue_outputs(ledger, sorted({stem_of(p) for p in deleted})))
    return Requeued(tuple(deleted), marked)
