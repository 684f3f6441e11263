"""Per-slide records on disk: output paths, lock files and reuse decisions (upstream §2.1, §2.6, §2.7).

Better than upstream on purpose: a lock held by a dead process on this host is taken over; a reused file must match the
requested geometry or the slide fails with a message suggesting `--force`; a locked slide is reported, not dropped.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

HOST = socket.gethostname()


def h5_path(output: Path, stem: str) -> Path:
    """`<out>/patches/<stem>.h5`."""
    return output / "patches" / f"{stem}.h5"


def lock_path(output: Path, stem: str) -> Path:
    """`<out>/patches/<stem>.lock` (one path for both phases, as upstream)."""
    return output / "patches" / f"{stem}.lock"


def images_dir(output: Path, stem: str) -> Path:
    """`<out>/images/<stem>/`."""
    return output / "images" / stem


def visualization_dir(output: Path) -> Path:
    """`<out>/visualization/`."""
    return output / "visualization"


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


# ----------------------------------------------------------------------------------------------------------------
# Reuse

Action = Literal["new", "skip", "reuse", "mismatch"]


@dataclass(frozen=True)
class ReuseDecision:
    """What to do with a slide whose output may already exist."""

    action: Action
    num_patches: int = 0
    missing: tuple[str, ...] = ()
    reason: str = ""


GEOMETRY_KEYS = ("patch_size", "target_magnification", "overlap")


def geometry_mismatch(attrs: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """Settings of an existing file that differ from the request (our fingerprint first, upstream's attributes else)."""
    theirs = attrs.get("settings_fingerprint")
    if theirs is not None and theirs == wanted.get("settings_fingerprint"):
        return []
    keys = [k for k in (*GEOMETRY_KEYS, "step_size", "tissue_thresh", "fast_mode", "segmenter") if k in attrs]
    diffs = [f"{k}={attrs[k]!r} (requested {wanted[k]!r})" for k in keys if k in wanted and attrs[k] != wanted[k]]
    if not diffs and theirs is not None:
        # The fingerprint also covers settings without their own attribute (filter thresholds, segmenter weights):
        # a differing fingerprint is a mismatch even when no named attribute differs.
        if attrs.get("segmenter_sha256") != wanted.get("segmenter_sha256"):
            diffs.append("segmenter weights differ")
        else:
            diffs.append(f"settings fingerprint {theirs} (requested {wanted.get('settings_fingerprint')})")
    return diffs


def decide_reuse(
    existing: Any | None,
    encoders: Sequence[str],
    wanted: Mapping[str, Any],
) -> ReuseDecision:
    """Upstream's reuse rules (§2.6) plus a geometry check.

    Args:
        existing: an `ExistingH5` (from the store) or None when the file is absent or unreadable.
        encoders: requested encoder names (empty for `segment-and-get-coords`).
        wanted: the attributes this run would write (for the geometry check).
    """
    if existing is None:
        return ReuseDecision("new")
    diffs = geometry_mismatch(existing.attrs, wanted)
    if diffs:
        return ReuseDecision("mismatch", reason="; ".join(diffs))
    if not encoders:
        return ReuseDecision("skip", num_patches=existing.num_patches or 0, reason="output exists")
    num = existing.num_patches
    if num is None or (num <= 0 and "settings_fingerprint" not in existing.attrs):
        return ReuseDecision("new", reason="existing output has no patches")
    missing = tuple(e for e in encoders if existing.features.get(e.lower()) != num)
    if not missing:
        return ReuseDecision("skip", num_patches=num, reason="all features present")
    return ReuseDecision("reuse", num_patches=num, missing=missing)
