"""The daemon's QC gallery: `<out>/qc/index.html` rebuilt on a timer while slides keep finishing."""

from __future__ import annotations

import logging
from pathlib import Path

import anyio

from ..errors import MissingExtraError, import_extra
from ..report import REPORT_NAME

log = logging.getLogger(__name__)


async def refresh_gallery(output: Path, interval_s: float) -> None:
    """Every `interval_s` seconds, rebuild the gallery if the run report changed since the last build (in a worker
    thread; a failure is a warning and the next round tries again). Without the `qc` extra it logs once and ends."""
    try:
        import_extra("jinja2", "qc", "the QC gallery needs Jinja2")
        import_extra("matplotlib", "qc", "the QC gallery needs matplotlib")
    except MissingExtraError as exc:
        log.info("QC gallery not refreshed: %s", exc)
        return
    from .report import write_report

    built: tuple[int, int] | None = None
    limiter = anyio.CapacityLimiter(1)
    while True:
        await anyio.sleep(interval_s)
        seen = _stamp(output / REPORT_NAME)
        if seen is None or seen == built:
            continue
        try:
            await anyio.to_thread.run_sync(write_report, output, limiter=limiter)
            built = seen
        except Exception as exc:  # noqa: BLE001 - the gallery never stops the daemon
            log.warning("QC gallery not rebuilt: %s", exc)


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_size, st.st_mtime_ns
