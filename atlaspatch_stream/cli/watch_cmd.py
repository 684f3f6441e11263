"""`atlaspatch watch` (the daemon over an input folder) and `atlaspatch status` (its ledger, read-only).

Exit statuses of `watch`: 0 after a clean drain (first SIGTERM/SIGINT) or a `--once` run without failures; 1 when a
`--once` run had failures, or on a start-up error; 130/143 when a second signal cancelled the drain.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Any

import anyio
import click
import orjson

from ..config import PipelineConfig
from .runner import SIGNAL_EXIT, one_line_errors, write_line

log = logging.getLogger("atlaspatch_stream")


def setup_daemon_logging(log_format: str, redactor: Any) -> None:
    """One stderr handler: our INFO lines (one per slide transition), third-party warnings; paths redacted when
    pseudonymising."""
    from ..daemon.ops.logs import install_handler

    root = logging.getLogger()
    root.handlers.clear()
    install_handler(log_format, redact=redactor, level=logging.WARNING)
    log.setLevel(logging.INFO)


async def _serve(input_folder: Path, config: PipelineConfig, once: bool, allow_root: bool,
                 retry_quarantined: bool, redactor: Any) -> tuple[int, int | None]:
    """Run the service with signal handling; (failed slides, exit code of a cancelling second signal)."""
    from ..daemon.service import serve_folder

    failed, received = 0, list[int]()
    outer = anyio.CancelScope()
    with outer:
        async with serve_folder(input_folder, config, once=once, allow_root=allow_root, redactor=redactor) as service:
            if retry_quarantined:
                changes = await service.ledger.retry_quarantined()
                log.info("%d quarantined slide(s) get a new set of attempts", len(changes))
                service.scan_now()
            async with anyio.create_task_group() as tg:

                async def signals() -> None:
                    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as stream:
                        async for signum in stream:
                            if signum == signal.SIGHUP:
                                service.scan_now()
                            elif not received:
                                received.append(signum)
                                service.stop(f"{signal.Signals(signum).name} received")
                            else:
                                received.append(signum)
                                outer.cancel()

                tg.start_soon(signals)
                async with service.results() as results:
                    async for outcome in results:
                        failed += outcome.state in ("failed", "quarantined")
                tg.cancel_scope.cancel()
    second = SIGNAL_EXIT.get(signal.Signals(received[0])) if len(received) > 1 else None
    return failed, second


def run_watch(input_folder: Path, config: PipelineConfig, *, once: bool, allow_root: bool,
              retry_quarantined: bool) -> int:
    """`atlaspatch watch`: the exit status (see the module docstring)."""
    from ..daemon.ops.logs import RedactPaths
    from ..sync import run

    os.umask(os.umask(0o022) | 0o022)  # whatever the caller's umask: nothing we create is group/other-writable
    redactor = RedactPaths() if config.watch.pseudonymize else None
    setup_daemon_logging(config.watch.log_format, redactor)
    with one_line_errors("the daemon stopped"):
        failed, second = run(lambda: _serve(input_folder, config, once, allow_root, retry_quarantined, redactor))
    if second is not None:
        return second
    return 1 if once and failed else 0


def run_status(output: Path, state_dir: Path | None, as_json: bool, requeue: tuple[str, ...]) -> int:
    """`atlaspatch status OUTPUT`: counts per state, slides in flight, the last failures and the quarantine list."""
    from ..config import WatchConfig
    from ..daemon.ledger import LEDGER_FILE, read_status, requeue_slides

    state = state_dir or WatchConfig().state_path(output)
    ledger = state / LEDGER_FILE
    if not ledger.exists():
        raise click.ClickException(f"no daemon ledger at {ledger} (is {output} the output of `atlaspatch watch`?)")
    if requeue:
        try:
            changes = requeue_slides(ledger, list(requeue))
        except (ValueError, KeyError) as exc:
            raise click.ClickException(" ".join(str(exc).split())) from exc
        write_line(f"requeued {len(changes)} slide(s); the daemon takes them at its next rescan")
    status = read_status(ledger)
    if as_json:
        write_line(orjson.dumps(status.to_json()).decode())
        return 0
    for line in _status_lines(status.to_json()):
        write_line(line)
    return 0


def _status_lines(data: dict[str, Any]) -> list[str]:
    counts = data["counts"]
    lines = ["slides: " + ", ".join(f"{n} {state}" for state, n in counts.items())]
    if data["in_flight"]:
        lines.append("in flight:")
        lines += [f"  {r['slide']}" for r in data["in_flight"]]
    if data["failures"]:
        lines.append("last failures:")
        lines += [f"  {f['slide_id']} [{f['kind']}] {f['message']}" for f in data["failures"]]
    if data["quarantined"]:
        lines.append("quarantined (gave up after their attempts):")
        lines += [f"  {r['slide']} ({r['attempts']} attempts): {r['error']}" for r in data["quarantined"]]
    if data["deferred"]:
        lines.append("deferred (waiting for the output to recover):")
        lines += [f"  {r['slide']}: {r['error']}" for r in data["deferred"]]
    return lines
