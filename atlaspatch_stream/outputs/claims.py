"""Claims: the one exclusive-lock protocol for files on a (possibly shared) output filesystem.

`process` locks `<out>/patches/<stem>.lock` (upstream §2.7's path, which upstream tools respect); the daemon and the
SLURM/Ray shards claim slides through the same functions with their own paths (service reference §2.5).

Publishing is atomic: the holder's payload (host, boot id, pid namespace, pid, process start time, slide, purpose)
is written to a unique temporary file in the same folder and fsynced, then `os.link()`ed to the lock name (EEXIST
means held; an EEXIST whose temporary file nevertheless has two links is a success whose reply NFS lost). So a lock
file carries its holder's full payload or does not exist. Where the filesystem has no hard links (some SMB mounts
answer EPERM/ENOTSUP), the lock is created with O_CREAT|O_EXCL and written in place: still exclusive, but for a moment
the lock exists empty, and a crash or a full disk in that moment leaves an empty lock; the grace rule below makes such
a lock stale after `grace` seconds instead of blocking the slide for ever.

Staleness, judged each time a create finds the lock taken:
- holder on this host (same host name, boot id and pid namespace): stale when its pid no longer runs, or runs with
  another start time (the pid was reused); a different boot id means the host rebooted, so stale too;
- holder on another host (or unknown, as in upstream's host-less locks): stale when the lock's mtime is older than
  `lease`, measured against the mtime of a probe file just created in the same folder, so both times are the file
  server's and client clock skew cancels out. Holders keep their lease fresh with `heartbeat()` every `lease / 3`;
- empty or unreadable payload (older versions, a crash mid-write): stale once older than `grace` (server clock).

Takeover happens under a short-lived guard `<lock>.takeover` (published like a lock): the guard holder checks that
the lock is still the file it judged stale (same inode, mtime and bytes), renames it to `<lock>.stale.<hex>` (atomic;
a file that changed in between is put back), removes it, logs a warning naming the previous holder, and retries the
create. The guard closes the ABA race of a bare rename, in which a contender that judged the old lock stale renames
away the fresh lock of the contender that took over first, and two processes end up holding it. `release()` uses the
same compare-then-remove, so it never removes a lock that is no longer ours.

Better than upstream on purpose: upstream's locks never expire; a slide left locked is reported, not dropped.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from ..errors import output_error

log = logging.getLogger("atlaspatch_stream")

HOST = socket.gethostname()
DEFAULT_LEASE = 15 * 60.0  # seconds without a heartbeat before another host's claim is stale (service ref. §2.5)
DEFAULT_GRACE = 60.0  # seconds before an unreadable lock, or a leftover temporary file, is stale
PAYLOAD_VERSION = 1
_MAX_PAYLOAD = 64 * 1024
# link() answers these where the filesystem has no hard links (SMB/CIFS without unix extensions, some FUSE mounts).
_NO_LINK = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK}
_NO_LINK_DEVS: set[int] = set()
_NO_LINK_LOCK = threading.Lock()  # several claims can meet a link-less filesystem at once: warn once per device
_TAG = re.compile(r"^([0-9a-f]{10})-(\d+)-(\d+)$")


# -- who we are -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Holder:
    """What a lock says about the process holding it (any field may be missing in older or upstream locks)."""

    host: str | None = None
    boot_id: str | None = None
    pidns: str | None = None
    pid: int | None = None
    start: str | None = None  # process start time in clock ticks since boot (/proc/<pid>/stat field 22)
    slide: str | None = None
    purpose: str | None = None
    time: float | None = None
    claim_id: str | None = None

    def describe(self) -> str:
        """`pid 123 on host-a (process of /x/s.svs)`, or what is known of it."""
        who = f"pid {self.pid}" if self.pid is not None else "unknown pid"
        where = f" on {self.host}" if self.host else ""
        what = " ".join(x for x in (self.purpose, f"of {self.slide}" if self.slide else None) if x)
        return f"{who}{where}" + (f" ({what})" if what else "")

    def to_bytes(self) -> bytes:
        """The payload written to the lock: one JSON line."""
        fields = {"v": PAYLOAD_VERSION, **{k: v for k, v in self.__dict__.items() if v is not None}}
        return (json.dumps(fields, sort_keys=True) + "\n").encode("utf-8")


def _read_small(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read(4096).strip()
    except OSError:
        return None


def _stat_fields(pid: int) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name (the state first); empty where /proc cannot tell."""
    text = _read_small(f"/proc/{pid}/stat")
    return text.rsplit(")", 1)[1].split() if text and ")" in text else []


def process_start(pid: int) -> str | None:
    """The start time of `pid` in clock ticks since boot, or None where /proc cannot tell."""
    fields = _stat_fields(pid)
    return fields[19] if len(fields) > 19 else None


def me() -> Holder:
    """This process as a lock holder (no slide or purpose)."""
    return _identity(os.getpid())[0]


def owner_tag() -> str:
    """`<hostkey>-<pid>-<start>` for names of temporary files, so a sweep can tell whether their writer still runs."""
    return _identity(os.getpid())[1]


@functools.lru_cache(maxsize=1)
def _identity(pid: int) -> tuple[Holder, str]:
    """This process as a holder, and its owner tag; keyed by pid, so a forked child computes its own."""
    pidns = None
    with contextlib.suppress(OSError):
        pidns = os.readlink("/proc/self/ns/pid")
    start = process_start(pid)
    holder = Holder(HOST, _read_small("/proc/sys/kernel/random/boot_id"), pidns, pid, start)
    return holder, f"{_host_key(HOST, pidns)}-{pid}-{start or 0}"


def _host_key(host: str, pidns: str | None) -> str:
    """Ten hex digits naming this host and pid namespace (containers sharing a host name have their own pids)."""
    return hashlib.sha1(f"{host}|{pidns}".encode()).hexdigest()[:10]


def pid_alive(pid: int) -> bool:
    """Whether `pid` names a running (not zombie) process on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _stat_fields(pid)[:1] != ["Z"]


def _runs_here(pid: int, start: str | None) -> bool:
    """Whether the process that wrote a lock or temp name on this host still runs (pid reuse caught by start)."""
    if not pid_alive(pid):
        return False
    return start in (None, "0") or process_start(pid) in (None, start)


# -- reading a lock -------------------------------------------------------------------------------------------------


def parse_payload(data: bytes) -> Holder | None:
    """The holder a lock names: our JSON payload, or the older `pid=…,time=…,slide=…[,host=…]` text; None if neither."""
    text = data.decode("utf-8", errors="replace").strip()
    if text.startswith("{"):
        try:
            fields = json.loads(text)
        except ValueError:
            return None
        if not isinstance(fields, dict) or not isinstance(fields.get("pid"), int):
            return None
        return Holder(**{k: fields[k] for k in Holder.__dataclass_fields__ if k in fields})
    return _holder_from_text(text)


def _holder_from_text(text: str) -> Holder | None:
    """Upstream's and our older payload. The slide path may hold commas, so only known keys are taken."""
    fields: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if sep and key in {"pid", "time", "host", "phase", "slide"} and key not in fields:
            fields[key] = value
    if not fields.get("pid", "").isdigit():
        return None
    stamp = fields.get("time", "")
    return Holder(host=fields.get("host"), pid=int(fields["pid"]), slide=fields.get("slide"),
                  purpose=fields.get("phase"), time=float(stamp) if stamp.isdigit() else None)


@dataclass(frozen=True)
class _Snapshot:
    """One observation of a lock file: identity, mtime and bytes."""

    dev: int
    ino: int
    mtime_ns: int
    data: bytes

    def same_file(self, other: _Snapshot, *, mtime: bool) -> bool:
        same = (self.dev, self.ino, self.data) == (other.dev, other.ino, other.data)
        return same and (not mtime or self.mtime_ns == other.mtime_ns)


def _snapshot(path: Path) -> _Snapshot | None:
    """Stat and read `path` through one descriptor; None when it does not exist."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        data = os.read(fd, _MAX_PAYLOAD)
    finally:
        os.close(fd)
    return _Snapshot(st.st_dev, st.st_ino, st.st_mtime_ns, data)


def read_holder(path: Path) -> Holder | None:
    """The holder named in the lock at `path`; None when it is absent, empty or unreadable."""
    try:
        snap = _snapshot(path)
    except OSError:
        return None
    return None if snap is None else parse_payload(snap.data)


def server_now(folder: Path) -> float:
    """The file server's current time: the mtime of a probe file created (and removed) in `folder`.

    Falls back to this host's clock when no file can be created there (read-only or full).
    """
    probe = folder / f".probe.{owner_tag()}.{uuid.uuid4().hex[:12]}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return time.time()
    try:
        return os.fstat(fd).st_mtime
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(probe)


State = Literal["free", "held", "stale"]


@dataclass(frozen=True)
class Verdict:
    """What `judge` found at a lock path."""

    state: State
    reason: str
    holder: Holder | None = None
    snapshot: _Snapshot | None = None


def judge(path: Path, *, lease: float = DEFAULT_LEASE, grace: float = DEFAULT_GRACE) -> Verdict:
    """Whether the lock at `path` is free, held by a live holder, or stale (see the module docstring for the rules)."""
    snap = _snapshot(path)
    if snap is None:
        return Verdict("free", "no lock")
    holder = parse_payload(snap.data)
    local = _judge_local(holder) if holder is not None else None
    if local is not None:
        return replace(local, holder=holder, snapshot=snap)
    age = server_now(path.parent) - snap.mtime_ns / 1e9
    if holder is None:
        return Verdict("stale" if age > grace else "held",
                       f"unreadable lock, {age:.0f} s old (stale after {grace:.0f} s)", None, snap)
    return Verdict("stale" if age > lease else "held",
                   f"held by {holder.describe()}, last heartbeat {age:.0f} s ago (lease {lease:.0f} s)", holder, snap)


def _judge_local(holder: Holder) -> Verdict | None:
    """The verdict for a holder on this host, or None when only its lease can tell (another host or pid namespace)."""
    mine = me()
    if holder.host != mine.host or holder.pid is None:
        return None
    if holder.boot_id and mine.boot_id and holder.boot_id != mine.boot_id:
        return Verdict("stale", f"{holder.describe()} ran before this host rebooted")
    if holder.pidns and mine.pidns and holder.pidns != mine.pidns:
        return None
    if not pid_alive(holder.pid):
        return Verdict("stale", f"{holder.describe()} no longer runs")
    if not _runs_here(holder.pid, holder.start):
        return Verdict("stale", f"{holder.describe()} no longer runs (its pid now belongs to another process)")
    return Verdict("held", f"held by {holder.describe()}")


# -- taking and holding a claim -------------------------------------------------------------------------------------


@dataclass(eq=False)
class Claim:
    """A lock this process holds. `heartbeat()` keeps it fresh; `release()` is idempotent.

    Attributes:
        path: The lock file.
        holder: The payload we published.
        lost: True once a heartbeat found the lock gone or someone else's.
    """

    path: Path
    holder: Holder
    published: _Snapshot  # the lock file as we created it (its mtime is not compared)
    lost: bool = False
    released: bool = False
    _mutex: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def held(self) -> bool:
        """Still ours: neither released nor found lost."""
        return not (self.lost or self.released)

    def heartbeat(self) -> bool:
        """Touch the lock (server time) if it is still ours; False, and `lost` set, once it is not.

        Raises:
            OutputError: the output filesystem refused the touch (read-only, gone, I/O error).
        """
        with self._mutex:
            if not self.held:
                return False
            try:
                now = _snapshot(self.path)
                if now is None or not now.same_file(self.published, mtime=False):
                    return self._mark_lost(now)
                os.utime(self.path)  # no explicit times: NFS asks the server to stamp its own clock
            except FileNotFoundError:
                return self._mark_lost(None)
            except OSError as exc:
                raise _translated(exc, self.path) from exc
            return True

    def _mark_lost(self, now: _Snapshot | None) -> bool:
        self.lost = True
        other = parse_payload(now.data) if now is not None else None
        by = f"now held by {other.describe()}" if other else "the lock file is gone"
        log.warning("lost lock %s (%s); another process may now work on %s", self.path, by, self.holder.slide)
        return False

    def release(self) -> None:
        """Remove the lock if it is still ours; a lock someone else took over is left alone."""
        with self._mutex:
            if self.released:
                return
            self.released = True
            if self.lost:
                return
            with contextlib.suppress(OSError):
                if not _remove_if(self.path, self.published, "released", mtime=False):
                    log.warning("lock %s was no longer ours at release; left in place", self.path)


def try_claim(path: Path, *, slide: str = "", purpose: str = "process", lease: float = DEFAULT_LEASE,
              grace: float = DEFAULT_GRACE) -> Claim | None:
    """Take the lock at `path`, taking over a stale one; None when a live holder has it.

    Args:
        path: The lock file (its folder is created).
        slide: The slide the claim is for (recorded in the payload).
        purpose: What the holder does (`process`, `features`, `watch`, ...).
        lease: Seconds after which another host's lock without heartbeat is stale.
        grace: Seconds after which an unreadable lock is stale.

    Raises:
        OutputError: the lock could not be written (disk full, read-only, no permission, ...).
    """
    holder = replace(me(), slide=slide or None, purpose=purpose, time=round(time.time(), 3),
                     claim_id=uuid.uuid4().hex)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for _attempt in range(4):
            published = _publish(path, holder.to_bytes())
            if published is not None:
                return Claim(path, holder, published)
            verdict = judge(path, lease=lease, grace=grace)
            if verdict.state == "held":
                return None
            if verdict.state == "stale" and _take_over(path, verdict, grace):
                log.warning("took over stale lock %s: %s", path, verdict.reason)
    except OSError as exc:
        raise _translated(exc, path) from exc
    return None


def break_claim(path: Path, gone: Callable[[Holder], bool], why: str, *, grace: float = DEFAULT_GRACE) -> bool:
    """Remove the lock at `path` when `gone(holder)` says its holder is known to have stopped; True when removed.

    For a holder that the rules above cannot judge dead yet: a Ray worker that died on another node holding a
    slide's claim would block the slide for a whole lease, although its driver knows it is gone (the driver retries
    a slide only when none of its live workers has it). Removed under the takeover guard, like a stale lock.
    """
    try:
        snap = _snapshot(path)
    except OSError:
        return False  # `try_claim` meets and reports the problem
    holder = parse_payload(snap.data) if snap is not None else None
    if snap is None or holder is None or not gone(holder):
        return False
    if not _take_over(path, Verdict("stale", why, holder, snap), grace):
        return False
    log.warning("took over lock %s: %s (%s)", path, why, holder.describe())
    return True


def _translated(exc: OSError, path: Path) -> Exception:
    return output_error(exc, path) or exc


def _publish(path: Path, payload: bytes) -> _Snapshot | None:
    """Create `path` holding `payload`; the file as created, or None when it already exists."""
    dev = os.stat(path.parent).st_dev
    if dev not in _NO_LINK_DEVS:
        tmp = path.with_name(f".{path.name}.pub.{owner_tag()}.{uuid.uuid4().hex[:12]}")
        try:
            created = _create(tmp, payload)
            linked = _link(tmp, path)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if linked is not None:
            return created if linked else None
        _note_no_links(dev, path.parent)
    # The weaker fallback: exclusive create, then the payload written in place (briefly empty).
    try:
        return _create(path, payload)
    except FileExistsError:
        return None


def _note_no_links(dev: int, folder: Path) -> None:
    """Remember a device without hard links; the warning is printed once per device, whichever claim found it."""
    with _NO_LINK_LOCK:
        first = dev not in _NO_LINK_DEVS
        _NO_LINK_DEVS.add(dev)
    if first:
        log.warning("%s: no hard links on this filesystem; lock files fall back to O_EXCL", folder)


def _create(path: Path, payload: bytes) -> _Snapshot:
    """Create `path` exclusively holding `payload`, fsynced; removed again when writing fails."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)  # ours: we created it exclusively a moment ago
        raise
    os.close(fd)
    return _Snapshot(st.st_dev, st.st_ino, st.st_mtime_ns, payload)


def _link(tmp: Path, path: Path) -> bool | None:
    """Hard-link `tmp` to `path`: True when linked, False when `path` exists, None where there are no hard links."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        # NFS may retransmit a LINK whose reply was lost: the link exists and the retry says EEXIST.
        return os.stat(tmp).st_nlink == 2
    except OSError as exc:
        if exc.errno in _NO_LINK:
            return None
        raise
    return True


def _take_over(path: Path, verdict: Verdict, grace: float) -> bool:
    """Remove the stale lock `verdict` judged, under the lock's takeover guard; True when removed.

    Without the guard, a contender that judged the old lock stale could rename away the fresh lock another
    contender had just published after its own takeover (ABA), and two processes would both hold the lock. The
    guard (`<lock>.takeover`, published like a lock and held for milliseconds) lets one contender at a time compare
    the lock with what it judged and remove it; the others retry and find the winner's fresh lock. A guard left by
    a crash is stale once its holder is dead here, or after `grace` seconds.
    """
    if verdict.snapshot is None:
        return False
    guard = path.with_name(path.name + ".takeover")
    published = _publish(guard, replace(me(), purpose="takeover", claim_id=uuid.uuid4().hex).to_bytes())
    if published is None:
        stale_guard = judge(guard, lease=grace, grace=grace)
        if stale_guard.state == "stale" and stale_guard.snapshot is not None:
            _remove_if(guard, stale_guard.snapshot, "stale", mtime=True)
        return False
    try:
        # Look before moving: a fresh lock published after someone else's takeover is never even renamed.
        now = _snapshot(path)
        if now is None or not now.same_file(verdict.snapshot, mtime=True):
            return False
        return _remove_if(path, verdict.snapshot, "stale", mtime=True)
    finally:
        _remove_if(guard, published, "released", mtime=False)


def _remove_if(path: Path, expected: _Snapshot, why: str, *, mtime: bool) -> bool:
    """Remove `path` only if it is still the file `expected` describes; True when removed.

    The file is first renamed aside (atomic: of several contenders one wins), then compared; a file that changed in
    between (someone's fresh lock or heartbeat) is put back.
    """
    side = path.with_name(f"{path.name}.{why}.{uuid.uuid4().hex[:12]}")
    try:
        os.rename(path, side)
    except FileNotFoundError:
        return False
    moved = _snapshot(side)
    if moved is not None and moved.same_file(expected, mtime=mtime):
        os.unlink(side)
        return True
    _put_back(side, path)
    return False


def _put_back(side: Path, path: Path) -> None:
    try:
        os.link(side, path)
    except FileExistsError:
        log.warning("lock %s was replaced while being put back; its former holder will find it lost", path)
    except OSError:
        if not path.exists():  # no hard links here: a plain rename, which could only clobber a lock born this instant
            os.rename(side, path)
            return
    with contextlib.suppress(OSError):
        os.unlink(side)


# -- orphans --------------------------------------------------------------------------------------------------------


def owned_temp_path(final: Path) -> Path:
    """A unique temporary name beside `final` that names its writer: `.<name>.tmp.<hostkey>-<pid>-<start>.<hex>`."""
    return final.with_name(f".{final.name}.tmp.{owner_tag()}.{uuid.uuid4().hex[:12]}")


_OWNED_TEMP = re.compile(r"^\.(?P<final>.+)\.tmp\.(?P<tag>[0-9a-f]{10}-\d+-\d+)\.[0-9a-f]{12}$")
_OLD_TEMP = re.compile(r"^\.(?P<final>.+)\.tmp\.[0-9a-f]{32}$")  # before owners were named: no writer known
# Lock publish temps `.<lock>.pub.<owner>.<hex>` and clock probes `.probe.<owner>.<hex>` live for milliseconds.
_PUB_TEMP = re.compile(r"^\.(?:.+\.pub|probe)\.(?P<tag>[0-9a-f]{10}-\d+-\d+)\.[0-9a-f]{12}$")
_SIDE = re.compile(r"^(?P<lock>.+)\.(stale|released)\.[0-9a-f]{12}$")


@dataclass
class SweepSummary:
    """What `sweep_orphans` removed and what it left (with why)."""

    removed_temps: list[Path] = field(default_factory=list)
    removed_locks: list[Path] = field(default_factory=list)
    kept: list[tuple[Path, str]] = field(default_factory=list)

    def one_line(self) -> str:
        """`swept 2 temporary files and 1 stale lock` (or `nothing to sweep`)."""
        if not (self.removed_temps or self.removed_locks):
            return "nothing to sweep"
        temps, locks = len(self.removed_temps), len(self.removed_locks)
        return f"swept {temps} temporary file{'s' * (temps != 1)} and {locks} stale lock{'s' * (locks != 1)}"


def owner_runs(tag: str) -> bool | None:
    """Whether the process an `owner_tag()` names still runs: True or False on this host, None for another host's."""
    match = _TAG.match(tag)
    if match is None or match.group(1) != owner_tag().split("-", 1)[0]:
        return None
    return _runs_here(int(match.group(2)), match.group(3))


def _sweep_lock(path: Path, lease: float, grace: float, summary: SweepSummary) -> None:
    verdict = judge(path, lease=lease, grace=grace)
    if verdict.state == "stale" and _take_over(path, verdict, grace):
        log.warning("removed stale lock %s: %s", path, verdict.reason)
        summary.removed_locks.append(path)
    elif verdict.state == "held":
        summary.kept.append((path, verdict.reason))


def _sweep_leftover(path: Path, now: float, grace: float, summary: SweepSummary) -> None:
    """A publish temp or takeover side file: gone when its writer is dead here, or older than `grace` anywhere."""
    match = _PUB_TEMP.match(path.name)
    dead_here = match is not None and owner_runs(match.group("tag")) is False
    if dead_here or _age(path, now) > grace:
        _unlink(path, summary.removed_temps)


def sweep_orphans(output_root: Path, *, lease: float = DEFAULT_LEASE, grace: float = DEFAULT_GRACE) -> SweepSummary:
    """At start-up: remove what killed runs left in `<output_root>/patches` (one implementation for every entry point).

    - stale `<stem>.lock` files and leftover lock publish/takeover files;
    - temporary H5 files `.<stem>.h5.tmp.<owner>.<hex>` whose writer no longer runs on this host, or, when written on
      another host, whose `<stem>.lock` is no longer held and which have not changed for `lease` seconds;
    - temporary H5 files in the older naming `.<stem>.h5.tmp.<32hex>` (no owner known) older than `grace` whose stem
      no live lock holds.

    Files of live processes (this one included) are never touched.
    """
    return sweep_folder(output_root / "patches", lease=lease, grace=grace)


def sweep_folder(folder: Path, *, lease: float = DEFAULT_LEASE, grace: float = DEFAULT_GRACE) -> SweepSummary:
    """`sweep_orphans` for one folder of `<name>.lock` files and `.<name>.h5.tmp.*` files (also patient files).

    Args:
        folder: Where the locks and temporary files live (`<out>/patches`, a patient folder).
        lease: As in `try_claim`.
        grace: As in `try_claim`; also the age after which leftover publish and takeover files go.
    """
    summary = SweepSummary()
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except FileNotFoundError:
        return summary
    now = server_now(folder)
    for entry in entries:
        path, name = Path(entry.path), entry.name
        if name.endswith(".lock") and not name.startswith("."):
            _sweep_lock(path, lease, grace, summary)
        elif name.endswith(".lock.takeover"):
            _sweep_lock(path, grace, grace, summary)
        elif _PUB_TEMP.match(name) or _SIDE.match(name):
            _sweep_leftover(path, now, grace, summary)
        elif name.startswith(".") and ".tmp." in name:
            _sweep_temp(path, now, lease, grace, summary)
    if summary.removed_temps or summary.removed_locks:
        log.warning("%s: %s", folder, summary.one_line())
    return summary


def _sweep_temp(path: Path, now: float, lease: float, grace: float, summary: SweepSummary) -> None:
    owned, old = _OWNED_TEMP.match(path.name), _OLD_TEMP.match(path.name)
    if owned is None and old is None:
        return
    final = (owned or old).group("final")  # type: ignore[union-attr]
    runs = owner_runs(owned.group("tag")) if owned is not None else None
    if runs is True:
        summary.kept.append((path, "its writer still runs"))
        return
    if runs is None:  # another host's, or no owner: only when no live lock covers the stem and it is old enough
        lock = path.with_name(Path(final).stem + ".lock")
        verdict = judge(lock, lease=lease, grace=grace)
        limit = lease if owned is not None else grace
        if verdict.state == "held" or _age(path, now) <= limit:
            summary.kept.append((path, verdict.reason if verdict.state == "held" else "recently written"))
            return
    _unlink(path, summary.removed_temps)


def _age(path: Path, now: float) -> float:
    try:
        return now - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _unlink(path: Path, removed: list[Path]) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        return
    removed.append(path)
