"""Reading the run report (`<out>/atlaspatch-report.jsonl`) back: slides, stage times, the last run's timeline."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from ..report import REPORT_NAME


@dataclass
class RunLog:
    """What the run report says.

    Attributes:
        slides: the latest `slide` event of each slide (by slide name), with its `stages` (busy seconds) added; a
            `skipped` event never hides an earlier outcome.
        start: the last run's `run_start` event (command, version, host, machine, settings); {} without one.
        end: the last run's `run_end` event (status, queue sizes, totals); {} when it has not ended.
        timeline: the last run's `slide` events in order (time, patches, queue occupancy) for the run plots.
        runs: how many runs the report holds.
    """

    slides: dict[str, dict[str, Any]] = field(default_factory=dict)
    start: dict[str, Any] = field(default_factory=dict)
    end: dict[str, Any] = field(default_factory=dict)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    runs: int = 0

    def stage_busy(self) -> dict[str, float]:
        """Seconds each stage was busy over the last run's slides."""
        busy: dict[str, float] = defaultdict(float)
        for event in self.timeline:
            for stage, seconds in event.get("stages", {}).items():
                busy[stage] += seconds
        return dict(busy)


def read_run_log(out: Path) -> RunLog:
    """Read `<out>/atlaspatch-report.jsonl` in one pass (an empty log when there is none)."""
    log = RunLog()
    stages: dict[str, dict[str, float]] = defaultdict(dict)
    for event in _events(Path(out) / REPORT_NAME):
        kind = event.get("event")
        if kind == "run_start":
            log.start, log.end, log.timeline, log.runs = event, {}, [], log.runs + 1
        elif kind == "stage":
            stages[event["slide"]][event["stage"]] = float(event["seconds"])
        elif kind == "slide":
            _add_slide(log, {**event, "stages": stages.pop(event["slide"], {})})
        elif kind == "run_end":
            log.end = event
    return log


def _add_slide(log: RunLog, event: dict[str, Any]) -> None:
    log.timeline.append(event)
    if event.get("status") != "skipped" or event["slide"] not in log.slides:
        log.slides[event["slide"]] = event


def _events(path: Path) -> Iterator[dict[str, Any]]:
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return
    with fh:
        for line in fh:
            try:
                yield orjson.loads(line)
            except orjson.JSONDecodeError:
                continue  # a line cut short by a killed run
