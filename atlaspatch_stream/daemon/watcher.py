"""The folder source of `atlaspatch watch`: slides that have fully arrived, each sent downstream exactly once.

Rules (reference `service-and-daemon.md` §1 and §6.2):

- A periodic `os.scandir` rescan is the truth; filesystem events (watchfiles) are hints that make discovery fast.
  `auto` mode polls on network filesystems, where events from other clients never arrive (`choose_mode`).
- The unit of work is a slide group: one file, a DICOM series folder, or an MRXS `.mrxs` plus its data folder.
- Names never taken: hidden files, `*.part`, `*.tmp`, `*.partial`, `~*` and the user's `--ignore` globs, so a file
  written under a temporary name and renamed into place is one job. Symlinks are followed only to regular files
  inside INPUT; FIFOs, sockets and devices are skipped.
- Settle scheduler: a slide must keep one signature (size, mtime, ctime over its members) for `settle_s` and then
  pass its completeness check (`complete.check_slide`) before the ledger marks it `ready`.
- Ready slides go downstream through a bounded send stream, oldest first, one ledger row at a time: while the
  consumer is full, ready rows simply wait in the ledger (memory stays flat however many are waiting).
- `--once` (`run_once`) takes the slides present at start once they settle, waiting at most `settle_s`, and says
  what it left and why (`left`); the service waits for a slide another live worker holds.
- The watcher's tasks live in the one task group `run` opens; other tasks only report results (`slide_done`,
  `slide_failed`, `slide_released`) and set events those tasks wait on.

Every blocking call (scans, stats, completeness checks, event waits) goes through this watcher's own
`CapacityLimiter`, never anyio's default limiter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import functools
import heapq
import logging
import os
import re
import threading
import unicodedata
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import anyio
from anyio.abc import ObjectSendStream, TaskStatus

from ..config import WatchConfig
from ..errors import ConfigError, refused
from ..formats import DICOM_EXTENSIONS, SUPPORTED_EXTENSIONS
from ..items import Failure
from .clock import Clock, SystemClock
from .complete import (
    Signature,
    SlideKind,
    check_slide,
    is_temporary_name,
    members,
    relative_id,
    signature,
    slide_identity,
)
from .ledger.facade import Ledger
from .ledger.states import Change, Observation, Settings, SlideRecord

__all__ = [
    "NETWORK_FILESYSTEMS",
    "EventSource",
    "FolderWatcher",
    "IgnoreRules",
    "ReadySlide",
    "WatchStatistics",
    "WatcherOptions",
    "choose_mode",
    "group_of",
    "probe_writable",
    "scan_tree",
    "watchfiles_events",
]

log = logging.getLogger(__name__)

# Filesystems where inotify does not see writes made by other clients: `auto` polls there.
NETWORK_FILESYSTEMS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "9p",
                                 "afs", "glusterfs"})
EventSource = Callable[[Path, anyio.CapacityLimiter], AsyncIterator[set[str]]]
Mode = Literal["events", "poll"]
T = TypeVar("T")


# ---------------------------------------------------------------------------------------------------------------
# Names, mounts, scanning (plain functions, run in worker threads)


@dataclass(frozen=True)
class IgnoreRules:
    """Which names the watcher never takes: the built-in temporary names plus user globs.

    A user glob matches the entry's name or its path relative to INPUT (`fnmatch`, case-sensitive).
    """

    globs: tuple[str, ...] = ()
    exclude: tuple[Path, ...] = ()  # folders never scanned (the output or state folder, when inside INPUT)

    @functools.cached_property
    def _user(self) -> re.Pattern[str] | None:
        return re.compile("|".join(fnmatch.translate(g) for g in self.globs)) if self.globs else None

    def skips(self, name: str, relative: str) -> bool:
        """True when the entry `name` (at `relative` under INPUT) is never taken."""
        if is_temporary_name(name):
            return True
        user = self._user
        return user is not None and (user.fullmatch(name) is not None or user.fullmatch(relative) is not None)

    def excluded(self, path: Path) -> bool:
        """True for a folder that is, or lies inside, an excluded one."""
        return any(path == x or path.is_relative_to(x) for x in self.exclude)


def choose_mode(mode: str, root: Path, mounts_text: str | None = None) -> tuple[Mode, str | None]:
    """Resolve `--watch-mode`: `auto` polls on network and FUSE filesystems, uses events elsewhere.

    Args:
        mode: "auto", "events" or "poll".
        root: the watched folder.
        mounts_text: `/proc/mounts` content (read when None; no file means "events").

    Returns:
        ("events" | "poll", the filesystem type of the longest mount point holding `root`, or None).
    """
    if mounts_text is None:
        try:
            mounts_text = Path("/proc/mounts").read_text(encoding="utf-8", errors="replace")
        except OSError:
            mounts_text = ""
    resolved = Path(root).resolve()
    fstype: str | None = None
    longest = -1
    for line in mounts_text.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].encode("latin-1").decode("unicode_escape")  # octal escapes such as `\\040`
        if resolved.is_relative_to(point) and len(point) > longest:
            longest, fstype = len(point), parts[2]
    if mode in ("events", "poll"):
        return mode, fstype  # type: ignore[return-value]
    network = fstype is not None and (fstype in NETWORK_FILESYSTEMS or fstype.startswith("fuse"))
    return ("poll" if network else "events"), fstype


def _natural_stem(root: Path, path: Path, kind: SlideKind) -> str:
    """`Path.stem` for files and MRXS, the folder name for a DICOM series (upstream's naming, `discover.stem_for`)."""
    if kind == "dicom":
        return (path if path != root else root.resolve()).name
    return path.stem


def _inside(root_real: Path, path: Path) -> bool:
    try:
        return path.resolve().is_relative_to(root_real)
    except (OSError, RuntimeError):
        return False


def _observe(root: Path, path: Path, kind: SlideKind) -> Observation | None:
    """One slide group found on disk: size and newest mtime over the members (a plain stat each; open+fstat is
    for the settle checks)."""
    files = members(path, kind)
    if not files:
        return None
    try:
        stats = [os.stat(p) for p in files]
    except OSError:
        return None
    relative = os.path.relpath(path, root)
    return Observation(
        slide_id=relative_id(root, path), source=Path(relative).as_posix(), kind=kind,
        size=sum(s.st_size for s in stats), mtime_ns=max(s.st_mtime_ns for s in stats),
        stem=_natural_stem(root, path, kind),
    )


def _kind_of(name: str) -> SlideKind | None:
    suffix = os.path.splitext(name)[1].lower()
    if suffix == ".mrxs":
        return "mrxs"
    if suffix in SUPPORTED_EXTENSIONS and suffix not in DICOM_EXTENSIONS:
        return "file"
    return None


@dataclass
class _Scan:
    root: Path
    rules: IgnoreRules
    root_real: Path
    withhold_paths: bool = False
    found: dict[str, Observation] = field(default_factory=dict)
    warned: set[str] = field(default_factory=set)

    def add(self, found: Observation | None) -> None:
        if found is not None:
            self.found[found.slide_id] = found


def _link_ok(entry: os.DirEntry[str], scan: _Scan) -> bool:
    """A symlink is taken only when it resolves to a regular file inside INPUT (never a folder: no loops)."""
    target = Path(entry.path)
    if _inside(scan.root_real, target) and target.is_file():
        return True
    if entry.path not in scan.warned:
        scan.warned.add(entry.path)
        where = "(path withheld: pseudonymised)" if scan.withhold_paths else entry.path
        log.warning("skipped symlink %s: it points outside the input folder or not to a file", where)
    return False


def _observe_file(entry: os.DirEntry[str], relative: str) -> Observation | None:
    """A single-file slide straight from its directory entry (the per-file cost of every rescan)."""
    try:
        info = entry.stat()
    except OSError:
        return None
    return Observation(slide_id=unicodedata.normalize("NFC", relative), source=relative, kind="file",
                       size=info.st_size, mtime_ns=info.st_mtime_ns, stem=os.path.splitext(entry.name)[0])


def _scan_folder(scan: _Scan, folder: Path, prefix: str) -> list[tuple[Path, str]]:
    """Collect the slides of one folder (`prefix` is its path relative to INPUT, with a trailing `/`); returns
    its sub-folders to scan, with their prefixes."""
    try:
        with os.scandir(folder) as it:
            entries = list(it)
    except OSError as exc:
        log.warning("cannot scan %s: %s", "a folder (path withheld)" if scan.withhold_paths else folder,
                    exc.strerror or exc)
        return []
    mrxs_folders = {os.path.splitext(e.name)[0] for e in entries if e.name.lower().endswith(".mrxs")}
    subfolders: list[tuple[Path, str]] = []
    has_dicom = False
    for entry in entries:
        relative = prefix + entry.name
        if scan.rules.skips(entry.name, relative):
            continue
        if entry.is_symlink():
            if not _link_ok(entry, scan):
                continue
        elif entry.is_dir(follow_symlinks=False):
            path = Path(entry.path)
            if entry.name not in mrxs_folders and not scan.rules.excluded(path):
                subfolders.append((path, relative + "/"))
            continue
        elif not entry.is_file(follow_symlinks=False):
            continue  # FIFO, socket, device
        kind = _kind_of(entry.name)
        if kind == "file":
            scan.add(_observe_file(entry, relative))
        elif kind == "mrxs":
            scan.add(_observe(scan.root, Path(entry.path), kind))
        else:
            has_dicom = has_dicom or os.path.splitext(entry.name)[1].lower() in DICOM_EXTENSIONS
    if has_dicom:
        scan.add(_observe(scan.root, folder, "dicom"))
    return subfolders


def scan_tree(root: Path, rules: IgnoreRules, max_depth: int, *, withhold_paths: bool = False) -> dict[str, Observation]:
    """Every slide group under `root`, by slide ID (blocking: call it in a worker thread).

    Folders are visited once each (a (device, inode) set guards against bind-mount loops), at most `max_depth`
    levels deep; an MRXS data folder is part of its slide, never a folder of slides. With `withhold_paths`
    (pseudonymisation), warnings do not name paths.
    """
    scan = _Scan(Path(root), rules, Path(root).resolve(), withhold_paths)
    visited: set[tuple[int, int]] = set()
    stack = [(scan.root, "", 0)]
    while stack:
        folder, prefix, depth = stack.pop()
        try:
            info = os.stat(folder)
        except OSError:
            continue
        if (info.st_dev, info.st_ino) in visited:
            continue
        visited.add((info.st_dev, info.st_ino))
        for sub, sub_prefix in _scan_folder(scan, folder, prefix):
            if depth < max_depth:
                stack.append((sub, sub_prefix, depth + 1))
    return scan.found


def group_of(root: Path, path: Path, rules: IgnoreRules) -> tuple[Path, SlideKind] | None:
    """The slide group an event path belongs to, or None (ignored name, not a slide, outside INPUT).

    A `.dcm` belongs to its folder's series; any file under `name/` beside `name.mrxs` belongs to that MRXS.
    """
    root, path = Path(root), Path(path)
    try:
        relative = path.relative_to(root)
    except ValueError:
        return None
    parts = relative.parts
    if any(rules.skips(part, Path(*parts[: i + 1]).as_posix()) for i, part in enumerate(parts)):
        return None
    if rules.excluded(path):
        return None
    if path.suffix.lower() in DICOM_EXTENSIONS:
        return path.parent, "dicom"
    folder = path.parent
    if folder != root and folder.with_name(folder.name + ".mrxs").is_file():
        return folder.with_name(folder.name + ".mrxs"), "mrxs"
    kind = _kind_of(path.name)
    return (path, kind) if kind else None


def probe_writable(folder: Path, size: int = 1 << 20) -> str | None:
    """Write, fsync and remove a `size`-byte probe file in `folder`: None on success, else the error in one line."""
    probe = Path(folder) / f".atlaspatch-probe-{os.getpid()}-{threading.get_ident()}"
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"\0" * size)
            os.fsync(fd)
        finally:
            os.close(fd)
        return None
    except OSError as exc:
        return f"{type(exc).__name__}: {exc.strerror or exc}"
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


# ---------------------------------------------------------------------------------------------------------------
# Event sources


async def watchfiles_events(root: Path, limiter: anyio.CapacityLimiter) -> AsyncIterator[set[str]]:
    """Batches of changed paths under `root` from watchfiles' Rust notifier.

    `watchfiles.awatch` waits in `anyio.to_thread` on the default limiter; this drives the same `RustNotify` through
    our own limiter instead. Each wait returns within half a second, so cancelling the consumer is prompt.
    """
    from watchfiles._rust_notify import RustNotify

    stop = threading.Event()
    with RustNotify([str(root)], False, False, 300, True, True) as notifier:
        try:
            while True:
                raw = await anyio.to_thread.run_sync(notifier.watch, 400, 50, 500, stop, limiter=limiter)
                if raw == "timeout":
                    continue
                if isinstance(raw, str):  # "stop" or "signal"
                    return
                yield {path for _change, path in raw}
        finally:
            stop.set()


# ---------------------------------------------------------------------------------------------------------------
# Options, items, statistics


@dataclass(frozen=True)
class WatcherOptions:
    """What a `FolderWatcher` watches and how.

    Attributes:
        root: INPUT, the watched folder.
        watch: a `WatchConfig` (settle, rescan, mode, ignore, depth, probe interval).
        probe_dir: where a write probe tests recovery from a system failure (the output's patches folder).
        exclude: folders never scanned (the output and state folders, when they lie inside INPUT).
        events: the event source for "events" mode (default: watchfiles); ignored in "poll" mode.
        pseudonym: maps a slide ID to its pseudonym (`Pseudonymizer.pseudonym`) when pseudonymisation is on.
        mounts_text: `/proc/mounts` content for `auto` mode (read from the system when None).
    """

    root: Path
    watch: WatchConfig
    probe_dir: Path
    exclude: tuple[Path, ...] = ()
    events: EventSource | None = None
    pseudonym: Callable[[str], str] | None = None
    mounts_text: str | None = None


@dataclass(frozen=True)
class ReadySlide:
    """A slide that has fully arrived, sent downstream once per ledger version.

    Attributes:
        slide_id: the path relative to INPUT (the ledger key).
        version: the ledger version; report results with it (a result for an older version is ignored).
        path: what to open: the file, the `.mrxs`, or the DICOM series folder.
        kind: "file", "dicom" or "mrxs".
        stem: the collision-free output stem (`<out>/patches/<stem>.h5`).
        attempts: slide errors so far.
        pseudonym: the keyed hash of `slide_id` when pseudonymisation is on.
        row_id: the ledger's integer key (usable as `SlideJob.slide_id`).
    """

    slide_id: str
    version: int
    path: Path
    kind: SlideKind
    stem: str
    attempts: int = 0
    pseudonym: str | None = None
    row_id: int = 0

    @property
    def display(self) -> str:
        """The name for logs and metrics: the pseudonym when there is one."""
        return self.pseudonym or self.slide_id


@dataclass(frozen=True)
class WatchStatistics:
    """What the watcher is doing (for the status file and metrics)."""

    mode: str
    filesystem: str | None
    settling: int
    in_flight: int
    scans: int
    last_scan_at: float | None
    events: int
    paused_because: str | None


@dataclass
class _Settling:
    """A `seen` slide being watched until it is quiet and complete."""

    slide_id: str
    version: int
    path: Path
    kind: SlideKind
    display: str
    signature: Signature | None = None
    stable_since: float = 0.0
    waiting: str = "not looked at yet"  # why it is not ready yet (what `--once` reports when it leaves the slide)


# ---------------------------------------------------------------------------------------------------------------
# The watcher


class FolderWatcher:
    """Watches INPUT and sends each fully arrived slide downstream once; see the module docstring for the rules.

    `run` (or `run_once`) opens the watcher's one task group and is the only task that starts tasks in it; other
    tasks (the service collecting results) only report through `slide_done`, `slide_failed`, `slide_released` and
    `scan_now`, which update the ledger and set events the watcher's own tasks wait on.

    Args:
        options: what to watch and how (`WatcherOptions`).
        ledger: the open ledger (this watcher is its only user inside the process).
        settings: the output-shaping settings of this run (start-up re-queues what they need).
        clock: time source (tests inject a manual one).

    Every blocking call of the watcher runs on its own limiter of 4 tokens (`limiter`).
    """

    def __init__(self, options: WatcherOptions, ledger: Ledger, settings: Settings, *,
                 clock: Clock | None = None) -> None:
        self.root = Path(options.root).resolve()  # excluded folders and symlink targets are compared resolved
        self.options = options
        self.ledger = ledger
        self.settings = settings
        self.config = options.watch
        self.clock = clock or SystemClock()
        self.limiter = anyio.CapacityLimiter(4)
        self.paused_because: str | None = None  # a system failure paused intake until a write probe succeeds
        self.rules = IgnoreRules(tuple(options.watch.ignore), tuple(Path(p).resolve() for p in options.exclude))
        self.mode: Mode = "poll"
        self.filesystem: str | None = None
        self._settling: dict[str, _Settling] = {}
        self._heap: list[tuple[float, str]] = []  # (when, slide ID): when to look at a settling slide next
        self.in_flight: dict[int, ReadySlide] = {}  # sent and not reported back yet, by row ID (`SlideJob.slide_id`)
        self._settle_wake = anyio.Event()
        self._ready_wake = anyio.Event()
        self._scan_event = anyio.Event()
        self._scans = 0
        self._events = 0
        self._last_scan_at: float | None = None
        self.once = False  # set by `run_once`
        self.left: dict[str, str] = {}  # `--once`: the slides it left unsettled, and why

    # -- public API

    async def run(self, send: ObjectSendStream[ReadySlide], *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Watch until cancelled (or until the consumer closes its end), sending ready slides into `send`.

        Subscribes to events first, then scans and reconciles the ledger (start-up rules), then reports started:
        a slide that arrives during the first scan is neither missed nor sent twice. Closes `send` on exit.

        Raises:
            ConfigError: INPUT is not a folder.
        """
        async with send:
            if not await self._thread(self.root.is_dir):
                raise ConfigError(f"Input folder does not exist: {self.root}")
            self.mode, self.filesystem = await self._thread(choose_mode, self.config.watch_mode, self.root,
                                                            self.options.mounts_text)
            log.info("watching %s (%s mode, filesystem %s)", self.root, self.mode, self.filesystem or "unknown",
                     extra={"event": "watch_started", "mode": self.mode, "filesystem": self.filesystem})
            async with anyio.create_task_group() as tg:
                if self.mode == "events":
                    tg.start_soon(self._events_loop)
                await self._rescan(startup=True)
                task_status.started()
                tg.start_soon(self._rescan_loop)
                tg.start_soon(self._settle_loop)
                await self._dispatch_loop(send)
                tg.cancel_scope.cancel()  # the consumer is gone: nothing more to watch for

    async def run_once(self, send: ObjectSendStream[ReadySlide]) -> None:
        """`--once`: send every slide present now once it has settled, then close `send`.

        A slide is sent when it is already `ready` in the ledger, or once it is quiet for `settle_s` (judged by its
        mtime age, so a slide copied long ago is taken at once) and complete. Slides still changing or incomplete
        are waited for, at most `settle_s` in all; what is left then stays `seen` for the next run, and `left` says
        why, by slide.
        """
        self.once = True
        async with send:
            await self._rescan(startup=True)
            deadline = self.clock.now() + self.config.settle_s
            while True:
                for entry in list(self._settling.values()):
                    await self._check(entry, judge_by_mtime=True)
                while (taken := await self.ledger.take_next()) is not None:
                    await self._send(send, taken)
                if not self._settling or self.clock.now() >= deadline:
                    break
                await self.clock.sleep_until(min(deadline, self.clock.now() + self.recheck_s))
        self.left = {entry.display: entry.waiting for entry in self._settling.values()}
        if self.left:
            log.warning("--once: left %d slide(s) that did not settle within %g s: %s", len(self.left),
                        self.config.settle_s, ", ".join(f"{name} ({why})" for name, why in sorted(self.left.items())),
                        extra={"event": "once_left", "left": len(self.left)})

    async def slide_done(self, slide: ReadySlide, output_h5: Path | str) -> None:
        """The pipeline wrote the slide's H5 (with this watcher's settings)."""
        self.in_flight.pop(slide.row_id, None)
        self._changed(await self.ledger.finish_done(slide.slide_id, slide.version, str(output_h5), self.settings))
        self._settle_wake.set()

    async def slide_failed(self, slide: ReadySlide, failure: Failure, message: str) -> None:
        """The pipeline failed the slide; a system failure also pauses intake until a write probe succeeds."""
        self.in_flight.pop(slide.row_id, None)
        self._changed(await self.ledger.finish_error(slide.slide_id, slide.version, failure, message))
        if failure.systemic and self.paused_because is None:
            self.paused_because = message
            log.error("intake paused: %s", message, extra={"event": "intake_paused", "reason": message})
            self._ready_wake.set()  # the dispatcher now probes the output until a write succeeds
        self._settle_wake.set()

    async def slide_released(self, slide: ReadySlide) -> None:
        """The slide was taken but not processed (a cancelled run): back to `ready`, uncharged."""
        self.in_flight.pop(slide.row_id, None)
        self._changed(await self.ledger.release(slide.slide_id))
        self._ready_wake.set()

    def scan_now(self) -> None:
        """Ask for a rescan at once (SIGHUP)."""
        self._scan_event.set()

    def statistics(self) -> WatchStatistics:
        """Counters and the current pause."""
        return WatchStatistics(self.mode, self.filesystem, len(self._settling), len(self.in_flight), self._scans,
                               self._last_scan_at, self._events, self.paused_because)

    async def _thread(self, func: Callable[..., T], *args: Any) -> T:
        """`func(*args)` in a worker thread on this watcher's own limiter (every blocking call of the watcher)."""
        return await anyio.to_thread.run_sync(func, *args, limiter=self.limiter)

    # -- ledger changes

    def _changed(self, change: Change | None) -> None:
        if change is None:
            return
        after = change.after  # one log line per transition (path-free when the slide has a pseudonym)
        log.info(
            "%s: %s -> %s (%s)", after.display, change.from_state or "new", after.state, change.reason,
            extra={"event": "slide_transition", "slide": after.display, "state_from": change.from_state,
                   "state_to": after.state, "version": after.version, "error_kind": after.error_kind},
        )
        if after.state == "seen":
            self._track(after)
        elif after.slide_id in self._settling:
            del self._settling[after.slide_id]
        if after.state == "ready":
            self._ready_wake.set()

    def _apply(self, changes: Iterable[Change]) -> None:
        for change in changes:
            self._changed(change)

    def _track(self, record: SlideRecord) -> None:
        entry = self._settling.get(record.slide_id)
        if entry is None or entry.version != record.version:
            entry = _Settling(record.slide_id, record.version, self.root / record.source, record.kind, record.display)
            self._settling[record.slide_id] = entry
        self._schedule(entry.slide_id, self.clock.now())

    def _schedule(self, slide_id: str, at: float) -> None:
        heapq.heappush(self._heap, (at, slide_id))
        self._settle_wake.set()

    # -- scanning

    def _pseudonymised(self, obs: Observation) -> Observation:
        pseudonym = self.options.pseudonym
        return dataclasses.replace(obs, pseudonym=pseudonym(obs.slide_id)) if pseudonym is not None else obs

    async def _rescan(self, *, startup: bool = False) -> None:
        found = await self._thread(functools.partial(scan_tree, withhold_paths=self.options.pseudonym is not None),
                                   self.root, self.rules, self.config.max_depth)
        scanned = {slide_id: self._pseudonymised(obs) for slide_id, obs in found.items()}
        await self._fingerprint_touched(scanned)
        self._apply(await self.ledger.reconcile(scanned, startup=startup, settings=self.settings if startup else None))
        self._apply(await self.ledger.promote_due())
        # Rows put back to `seen` from outside (`atlaspatch status --requeue`) or left by a previous run.
        for record in await self.ledger.in_state("seen"):
            if record.slide_id not in self._settling:
                self._track(record)
        self._scans += 1
        self._last_scan_at = self.clock.now()
        self._ready_wake.set()

    async def _fingerprint_touched(self, scanned: dict[str, Observation]) -> None:
        """A done slide with its size but a new mtime (touched, or copied again without -p) gets its quick
        fingerprint, so the ledger can tell "same content" from a rescan under the same name."""
        known = await self.ledger.identities()
        for slide_id, obs in scanned.items():
            state, size, mtime_ns = known.get(slide_id, ("", -1, -1))
            if state == "done" and size == obs.size and mtime_ns != obs.mtime_ns:
                with contextlib.suppress(OSError):
                    identity = await self._thread(slide_identity, self.root, self.root / obs.source, obs.kind)
                    scanned[slide_id] = dataclasses.replace(obs, fingerprint=identity.fingerprint)

    async def _rescan_loop(self) -> None:
        while True:
            event = self._scan_event
            await self.clock.wait_until(self.clock.now() + self.config.rescan_s, event)
            if event.is_set():
                self._scan_event = anyio.Event()
            await self._rescan()

    async def _events_loop(self) -> None:
        try:
            async for batch in (self.options.events or watchfiles_events)(self.root, self.limiter):
                self._events += len(batch)
                await self._hint(batch)
        except OSError as exc:
            # e.g. the inotify watch limit: rescans still find everything, only later.
            log.warning("filesystem events unavailable (%s); relying on rescans every %ss "
                        "(raise fs.inotify.max_user_watches, or use --watch-mode poll)", exc, self.config.rescan_s)

    async def _hint(self, paths: Iterable[str]) -> None:
        """Events name paths; each names a slide group to look at now (discovery, or restarting its quiet period)."""
        groups = {g for g in (group_of(self.root, Path(p), self.rules) for p in paths) if g is not None}
        for path, kind in groups:
            slide_id = relative_id(self.root, path)
            if slide_id in self._settling:
                self._schedule(slide_id, self.clock.now())
                continue
            if not _inside(self.root, path):
                continue
            found = await self._thread(_observe, self.root, path, kind)
            if found is not None:
                self._changed(await self.ledger.observe(self._pseudonymised(found)))

    # -- settling

    async def _settle_loop(self) -> None:
        while True:
            wake = self._settle_wake
            now = self.clock.now()
            while self._heap and self._heap[0][0] <= now:
                entry = self._settling.get(heapq.heappop(self._heap)[1])
                if entry is not None:
                    await self._check(entry)
            next_retry = await self.ledger.next_due()
            if next_retry is not None and next_retry <= self.clock.now():
                self._apply(await self.ledger.promote_due())
                continue
            deadlines = [now + self.config.rescan_s, next_retry, self._heap[0][0] if self._heap else None]
            if not wake.is_set():
                await self.clock.wait_until(min(d for d in deadlines if d is not None), wake)
            if wake.is_set():
                self._settle_wake = anyio.Event()

    @property
    def recheck_s(self) -> float:
        """How soon a slide that is not ready yet is looked at again."""
        return max(self.config.settle_s / 3.0, 0.05)

    async def _check(self, entry: _Settling, *, judge_by_mtime: bool = False) -> None:
        """One look at a settling slide: restart its quiet period, wait, or run the completeness check."""
        now = self.clock.now()
        if not _inside(self.root, entry.path):
            log.warning("%s: now resolves outside the input folder; not taken", entry.display)
            del self._settling[entry.slide_id]
            return
        try:
            current = await self._thread(signature, entry.path, entry.kind)
        except OSError as exc:
            entry.waiting = f"unreadable now: {exc.strerror or exc}"
            self._schedule(entry.slide_id, now + max(self.config.settle_s, self.recheck_s))
            return  # vanished or unreadable for now; a rescan marks a deleted slide missing
        if current != entry.signature:
            entry.signature, entry.stable_since = current, now
        if judge_by_mtime:
            # --once cannot watch for a quiet period, so the mtime says how long the slide has been quiet (a bulk
            # copy just before a cron run leaves every ctime fresh); pre-sized copies are the completeness check's.
            entry.stable_since = min(entry.stable_since, current.mtime_ns / 1e9)
        if now - entry.stable_since < self.config.settle_s:
            entry.waiting = f"still changing: not quiet for {self.config.settle_s:g} s"
            if not judge_by_mtime:
                self._schedule(entry.slide_id, min(entry.stable_since + self.config.settle_s, now + self.recheck_s))
            return
        await self._complete(entry, current, now)

    async def _complete(self, entry: _Settling, current: Signature, now: float) -> None:
        readiness = await self._thread(check_slide, entry.path, entry.kind)
        if readiness.state == "broken":
            self._changed(await self.ledger.finish_error(entry.slide_id, entry.version,
                                                         refused("check", "unreadable"),
                                                         f"{entry.display}: {readiness.reason}"))
            return
        if not readiness.ready:
            if now - entry.stable_since >= self.config.settle_max_wait_s:
                message = f"{entry.display}: never completed ({readiness.reason})"
                self._changed(await self.ledger.finish_error(entry.slide_id, entry.version,
                                                             refused("check", "incomplete"), message))
            else:
                entry.waiting = f"quiet but not complete: {readiness.reason}"
                log.debug("%s: quiet but not complete yet (%s)", entry.display, readiness.reason)
                self._schedule(entry.slide_id, now + max(self.config.settle_s, 4 * self.recheck_s))
            return
        if any(s.slide_id == entry.slide_id for s in self.in_flight.values()):
            self._schedule(entry.slide_id, now + self.recheck_s)  # the previous version is still being processed
            return
        try:
            identity = await self._thread(slide_identity, self.root, entry.path, entry.kind)
        except OSError:
            identity = None  # vanished between the check and the fingerprint
        if identity is None or identity.size != current.size:
            entry.signature = None  # it changed while we looked: start over
            self._schedule(entry.slide_id, now + self.recheck_s)
            return
        self._changed(await self.ledger.mark_ready(entry.slide_id, identity.size, identity.mtime_ns,
                                                   identity.fingerprint))

    # -- dispatching

    async def _send(self, send: ObjectSendStream[ReadySlide], taken: Change) -> None:
        """A ready row just taken (now `running`) downstream; released again when the send fails."""
        self._changed(taken)
        record = taken.after
        slide = ReadySlide(record.slide_id, record.version, self.root / record.source, record.kind,
                           record.output_stem or record.stem, record.attempts, record.pseudonym, record.row_id or 0)
        self.in_flight[slide.row_id] = slide
        try:
            await send.send(slide)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.slide_released(slide)
            raise

    async def _dispatch_loop(self, send: ObjectSendStream[ReadySlide]) -> None:
        """Oldest ready row first, one at a time: backpressure leaves the others in the ledger. While intake is
        paused, nothing is taken: the dispatcher probes the output instead."""
        while True:
            if self.paused_because is not None:
                await self._probe_until_writable()
            wake = self._ready_wake
            taken = await self.ledger.take_next()
            if taken is None:
                await self.clock.wait_until(self.clock.now() + self.config.rescan_s, wake)
                if wake.is_set():
                    self._ready_wake = anyio.Event()
                continue
            try:
                await self._send(send, taken)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                return

    async def _probe_until_writable(self) -> None:
        """Intake is paused: probe the output every `probe_s`; on the first good write resume intake."""
        while True:
            await self.clock.sleep_until(self.clock.now() + self.config.probe_s)
            failure = await self._thread(probe_writable, self.options.probe_dir)
            if failure is None:
                break
            log.warning("output still not writable: %s", failure, extra={"event": "probe_failed"})
        self._apply(await self.ledger.resume_deferred())
        self.paused_because = None
        log.warning("intake resumed: the output is writable again", extra={"event": "intake_resumed"})
