"""The machine-readable run report: JSON lines under the output folder, one event per slide and stage."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import orjson

from . import __version__
from .cpu import usable_cores
from .items import EngineStatistics, SlideResult

REPORT_NAME = "atlaspatch-report.jsonl"
RunStatus = Literal["completed", "interrupted", "failed"]


def machine() -> dict[str, Any]:
    """The machine a run ran on: CPU model, cores (and those this process may use), OS and Python (for the QC
    report)."""
    cpu = platform.processor()
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as fh:
        cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable_cores(), "os": platform.platform(),
            "python": platform.python_version()}


class RunReport:
    """Appends events to `<out>/atlaspatch-report.jsonl`; each line carries this run's id. Thread-safe.

    Nothing is written (and no folder created) until `open()`: a run that fails before it starts leaves no report.
    Slides are named by `SlideJob.recorded_path` (the pseudonym when there is one); `redact` (e.g. the daemon's
    path redactor) is applied to every slide name and message. With `output=None` nothing is ever written (a Ray
    worker's pipeline: the driver keeps the run's one report).
    """

    def __init__(self, output: Path | None, command: str, redact: Callable[[str], str] | None = None) -> None:
        self.path = output / REPORT_NAME if output is not None else None
        self._redact = redact or (lambda text: text)
        self.run_id = uuid.uuid4().hex[:12]
        self.command = command
        self._lock = threading.Lock()
        self._file: Any = None
        self._settings: dict[str, Any] = {}
        self.opened = False

    def _write(self, event: dict[str, Any]) -> None:
        if self.path is None:
            return
        line = orjson.dumps({"run": self.run_id, "time": time.time(), **event}, default=str) + b"\n"
        with self._lock:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "ab")  # noqa: SIM115 - kept open for the run
            self._file.write(line)
            self._file.flush()

    def begin(self, settings: dict[str, Any]) -> None:
        """Remember the run's settings for its first line (written by `open`)."""
        self._settings = settings

    def open(self) -> None:
        """The run has started (models loaded): write its first line (command, version, host and settings)."""
        self.opened = True
        self._write({"event": "run_start", "command": self.command, "version": __version__,
                     "host": socket.gethostname(), "pid": os.getpid(), "machine": machine(),
                     "settings": self._settings})

    def slide(self, result: SlideResult, queues: dict[str, int] | None = None) -> None:
        """One line per stage with its busy seconds, then one line with the slide's outcome (and, when given, the
        items in each queue as the slide finished: occupancy over time, sampled per slide)."""
        name = self._redact(result.job.recorded_path)
        for stage, seconds in result.timings.items():
            if stage != "total":
                self._write({"event": "stage", "slide": name, "stage": stage, "seconds": round(seconds, 6)})
        self._write({
            "event": "slide", "slide": name, "status": result.status, "message": self._redact(result.message),
            "h5": str(result.h5_path) if result.h5_path else None, "num_patches": result.num_patches,
            "features": list(result.features), "seconds": round(result.timings.get("total", 0.0), 6),
            **_failure_fields(result), **{k: v for k, v in result.notes.items() if k != "num_patches"},
            **({"queues": queues} if queues is not None else {}),
        })

    def end(self, statistics: EngineStatistics, status: RunStatus, reason: str | None = None) -> None:
        """The run's last line (only for a run that started): status, reason and the engine's statistics; then
        close."""
        if self.opened:
            self._write({"event": "run_end", "status": status, "reason": reason, **flat_statistics(statistics)})
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def _failure_fields(result: SlideResult) -> dict[str, object]:
    """The failure's stage, kind, retry class and systemic flag, and the attempts when there was more than one."""
    fields: dict[str, object] = {"attempts": result.attempts} if result.attempts > 1 else {}
    if result.failure is not None:
        fields |= {"stage": result.failure.stage, "error_kind": result.failure.kind, "retry": result.failure.retry,
                   "systemic": result.failure.systemic}
    return fields


def flat_statistics(statistics: EngineStatistics) -> dict[str, object]:
    """The engine's statistics as one flat mapping: the totals' fields (`finished`, `by_status`...) beside the rest."""
    fields = dataclasses.asdict(statistics)
    return {**fields.pop("totals"), **fields}
