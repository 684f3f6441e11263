"""`atlaspatch watch` (the daemon over an input folder) and `atlaspatch status` (its ledger, read-only).

Exit statuses of `watch`: 0 after a clean drain (first SIGTERM/SIGINT) or a `--once` run without failures (slides
another worker finished while this one waited count as done); 1 when a `--once` run had failures, or on a start-up
error (a state folder a live daemon holds, too); 130/143 when a second signal cancelled the drain. A `--once` run
ends with one summary line on stdout: done, failed, and the slides it left unsettled, with why.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import click
import orjson

from ..config import PipelineConfig
from .runner import Signals, ignore_late_signals, one_line_errors, write_line

if TYPE_CHECKING:
    from ..daemon.service import FolderResult

log = logging.getLogger("atlaspatch_stream")


@dataclass
class _Tally:
    """What a `watch` run did with the slides it took (and, `--once`, the slides it left and why)."""

    done: int = 0
    elsewhere: int = 0  # done by another worker while this one waited (`--once`)
    failed: int = 0
    left: dict[str, str] = field(default_factory=dict)

    def count(self, outcome: FolderResult) -> None:
        """One slide's outcome."""
        self.done += outcome.state == "done"
        self.elsewhere += outcome.state == "done" and outcome.result.status == "locked"
        self.failed += outcome.state in ("failed", "quarantined")

    def once_line(self, settle_s: float) -> str:
        """The `--once` summary: done, failed, and what it left unsettled, with why."""
        line = f"watch --once: {self.done} done"
        line += f" ({self.elsewhere} by another worker)" if self.elsewhere else ""
        line += f", {self.failed} failed"
        if self.left:
            reasons = "; ".join(f"{name} ({why})" for name, why in sorted(self.left.items()))
            line += f"; left {len(self.left)} slide(s) that did not settle within {settle_s:g} s: {reasons}"
        return line


async def _serve(input_folder: Path, config: PipelineConfig, once: bool, allow_root: bool,
                 retry_quarantined: bool, redactor: Any, signals: Signals) -> _Tally:
    """Run the service: SIGHUP rescans, the first SIGTERM/SIGINT drains, a second cancels the drain."""
    from ..daemon.service import serve_folder

    tally = _Tally()
    outer = anyio.CancelScope()
    with outer:
        async with serve_folder(input_folder, config, once=once, allow_root=allow_root, redactor=redactor) as service:
            if retry_quarantined:
                changes = await service.ledger.retry_quarantined()
                log.info("%d quarantined slide(s) get a new set of attempts", len(changes))
                service.scan_now()

            def act(sig: signal.Signals) -> None:
                if sig == signal.SIGHUP:
                    service.scan_now()
                elif len(signals.received) == 1:
                    service.stop(f"{sig.name} received")
                else:
                    outer.cancel()

            with signals.relayed(act):
                async with service.results() as results:
                    async for outcome in results:
                        tally.count(outcome)
            tally.left = dict(service.watcher.left)
    return tally


def run_watch(input_folder: Path, config: PipelineConfig, *, once: bool, allow_root: bool,
              retry_quarantined: bool) -> int:
    """`atlaspatch watch`: the exit status (see the module docstring)."""
    from ..daemon.ops.logs import RedactPaths, install_handler
    from ..sync import run

    os.umask(os.umask(0o022) | 0o022)  # whatever the caller's umask: nothing we create is group/other-writable
    redactor = RedactPaths() if config.watch.pseudonymize else None
    # One stderr handler: our INFO lines (one per slide transition), third-party warnings; paths redacted when
    # pseudonymising.
    logging.getLogger().handlers.clear()
    install_handler(config.watch.log_format, redact=redactor, level=logging.WARNING)
    log.setLevel(logging.INFO)
    signals = Signals(also=(signal.SIGHUP,))
    with one_line_errors("the daemon stopped"):
        tally = run(lambda: _serve(input_folder, config, once, allow_root, retry_quarantined, redactor, signals))
    ignore_late_signals()
    if len(signals.received) > 1:  # a second signal cancelled the drain
        return signals.exit_status or 1
    if once:
        write_line(tally.once_line(config.watch.settle_s))
    return 1 if once and tally.failed else 0


def run_status(output: Path, state_dir: Path | None, as_json: bool, requeue: tuple[str, ...]) -> int:
    """`atlaspatch status OUTPUT`: counts per state, slides in flight, the last failures and the quarantine list."""
    from ..config import WatchConfig
    from ..daemon.ledger.status import read_status, requeue_slides
    from ..daemon.ledger.store import LEDGER_FILE

    state = state_dir or WatchConfig().state_path(output)
    ledger = state / LEDGER_FILE
    if not ledger.exists():
        raise click.ClickException(f"no daemon ledger at {ledger} (is {output} the output of `atlaspatch watch` "
                                   f"on this host? pass the daemon's --state if it had one)")
    if requeue:
        try:
            changes = requeue_slides(ledger, list(requeue))
        except (ValueError, KeyError) as exc:
            raise click.ClickException(" ".join(str(exc).split())) from exc
        write_line(f"requeued {len(changes)} slide(s); the daemon takes them at its next rescan")
    data = read_status(ledger).to_json()
    for line in [orjson.dumps(data).decode()] if as_json else _status_lines(data):
        write_line(line)
    return 0


# The sections of `atlaspatch status` after the counts: (key in the status, heading, one line per record).
_STATUS_SECTIONS = (
    ("in_flight", "in flight:", "  {slide}"),
    ("failures", "last failures:", "  {slide_id} [{kind}] {message}"),
    ("quarantined", "quarantined (gave up after their attempts):", "  {slide} ({attempts} attempts): {error}"),
    ("deferred", "deferred (waiting for the output to recover):", "  {slide}: {error}"),
)


def _status_lines(data: dict[str, Any]) -> list[str]:
    lines = ["slides: " + ", ".join(f"{n} {state}" for state, n in data["counts"].items())]
    for key, heading, line in _STATUS_SECTIONS:
        if data[key]:
            lines.append(heading)
            lines += [line.format(**record) for record in data[key]]
    return lines
