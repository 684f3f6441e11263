"""The daemon's live state, one board for everything that reports it, and `status.json` replaced atomically.

`StatusBoard` is the single source of truth: the watcher and the pipeline wiring update it, `write_status` turns
it into `state/status.json` every few seconds, and `metrics.BoardCollector` reads it at scrape time. Readers of the
status file never see a torn file: it is written to a temporary name in the same folder, fsynced, then renamed.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import anyio
import orjson
from anyio.abc import TaskStatus

from ..clock import Clock, SystemClock

__all__ = ["STATUS_FILE", "StatusBoard", "run_status_file", "write_status"]

STATUS_FILE = "status.json"  # inside the state folder
FILE_MODE = 0o640  # never group- or world-writable, never world-readable
_WINDOW_S = 300.0  # throughput is averaged over the last five minutes


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


@dataclass
class StatusBoard:
    """What the daemon is doing now; cumulative counters and current gauges, no paths.

    Attributes:
        version: the package version (build info).
        config_fp: the settings fingerprint (build info).
        started_at: when the daemon started (seconds since the epoch).
    """

    version: str = ""
    config_fp: str = ""
    started_at: float = 0.0
    states: dict[str, int] = field(default_factory=dict)
    queue_fill: dict[str, float] = field(default_factory=dict)
    stage_busy_s: dict[str, float] = field(default_factory=dict)
    patches_total: dict[str, int] = field(default_factory=dict)
    completed_total: dict[str, int] = field(default_factory=dict)
    last_success_at: float | None = None
    last_scan_at: float | None = None
    events_total: int = 0
    paused_because: str | None = None
    draining: bool = False
    _recent: deque[tuple[float, int]] = field(default_factory=deque, repr=False)

    def set_states(self, counts: Mapping[str, int]) -> None:
        """Ledger counts per state."""
        self.states = dict(counts)

    def set_queue_fill(self, fill: Mapping[str, float]) -> None:
        """Fill ratio (0-1) of each bounded edge, by edge name."""
        self.queue_fill = {k: float(v) for k, v in fill.items()}

    def add_stage_busy(self, stage: str, seconds: float) -> None:
        """Busy time spent by one stage."""
        self.stage_busy_s[stage] = self.stage_busy_s.get(stage, 0.0) + seconds

    def slide_finished(self, outcome: str, now: float, patches: Mapping[str, int] | None = None) -> None:
        """One slide left the pipeline: `outcome` is done, failed, quarantined, deferred or skipped.

        Args:
            outcome: the slide's new state.
            now: the time it finished.
            patches: patches written per encoder ("coords" for coordinates only), for patches/s.
        """
        self.completed_total[outcome] = self.completed_total.get(outcome, 0) + 1
        if outcome != "done":
            return
        self.last_success_at = now
        written = 0
        for encoder, count in (patches or {}).items():
            self.patches_total[encoder] = self.patches_total.get(encoder, 0) + int(count)
            written = max(written, int(count))
        self._recent.append((now, written))

    def throughput(self, now: float) -> dict[str, float]:
        """Slides per hour and patches per second over the last five minutes."""
        while self._recent and self._recent[0][0] < now - _WINDOW_S:
            self._recent.popleft()
        span = min(_WINDOW_S, max(1.0, now - self.started_at)) if self.started_at else _WINDOW_S
        slides = len(self._recent)
        patches = sum(p for _, p in self._recent)
        return {"slides_per_hour": round(slides * 3600.0 / span, 3), "patches_per_s": round(patches / span, 3)}

    def snapshot(self, now: float) -> dict[str, Any]:
        """The status file's content."""
        return {
            "schema": 1,
            "updated_at": _iso(now),
            "started_at": _iso(self.started_at or None),
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "version": self.version,
            "config_fp": self.config_fp,
            "states": dict(self.states),
            "throughput": self.throughput(now),
            "queue_fill": dict(self.queue_fill),
            "last_success_at": _iso(self.last_success_at),
            "last_scan_at": _iso(self.last_scan_at),
            "paused_because": self.paused_because,
            "draining": self.draining,
        }


def write_status(path: Path, data: Mapping[str, Any]) -> None:
    """Replace `path` atomically with `data` as JSON (mode 0640; temp file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as handle:
            handle.write(orjson.dumps(dict(data), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


async def run_status_file(
    path: Path,
    snapshot: Callable[[float], Mapping[str, Any]],
    *,
    interval_s: float,
    clock: Clock | None = None,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Write `snapshot(now)` to `path` now and every `interval_s`, and once more when cancelled.

    Args:
        path: the status file (`<state>/status.json`).
        snapshot: builds the content (e.g. `board.snapshot`).
        interval_s: seconds between writes.
        clock: time source.

    The writes run in a worker thread of a private limiter of one token (never anyio's default limiter).
    """
    clock = clock or SystemClock()
    limiter = anyio.CapacityLimiter(1)

    async def write() -> None:
        await anyio.to_thread.run_sync(write_status, path, snapshot(clock.now()), limiter=limiter)

    await write()
    task_status.started()
    try:
        while True:
            await clock.sleep_until(clock.now() + interval_s)
            await write()
    finally:
        with anyio.move_on_after(5, shield=True):
            await write()
