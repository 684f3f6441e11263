"""Per-slide lock files on the output filesystem (upstream §2.7: `<out>/patches/<stem>.lock`).

Better than upstream on purpose: a lock held by a dead process on this host is taken over, and a locked slide is
reported, not dropped.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

HOST = socket.gethostname()


@dataclass
class SlideLock:
    """A held lock file; `release()` is idempotent."""

    path: Path
    fd: int | None

    def release(self) -> None:
        """Close and remove the lock file."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.fd = None
        with contextlib.suppress(OSError):
            self.path.unlink()


def _payload(slide: str, phase: str | None) -> bytes:
    text = f"pid={os.getpid()},time={int(time.time())},slide={slide}"
    if phase:
        text += f",phase={phase}"
    return (text + f",host={HOST}").encode("utf-8")


def _parse(text: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if sep and key in {"pid", "time", "host", "phase"}:
            fields[key] = value
    return fields


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_is_stale(path: Path) -> bool:
    """True when the lock was written on this host by a process that no longer exists."""
    try:
        fields = _parse(path.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return False
    if fields.get("host") != HOST or not fields.get("pid", "").isdigit():
        return False
    return not _pid_alive(int(fields["pid"]))


def acquire_lock(path: Path, slide: str, phase: str | None = None) -> SlideLock | None:
    """Take the lock atomically (O_EXCL); None when another live process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _attempt in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if not lock_is_stale(path):
                return None
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        os.write(fd, _payload(slide, phase))
        os.fsync(fd)
        return SlideLock(path, fd)
    return None
