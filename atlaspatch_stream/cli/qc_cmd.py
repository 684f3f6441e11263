"""`atlaspatch check OUT` and `atlaspatch report OUT`: quality control of an output folder."""

from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import click
import orjson

from .options import parse_feature_list
from .runner import PLAIN_PROGRESS_EVERY_S, exit_with, quiet_slide_libraries, write_line


@click.command("check")
@click.argument("output", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per file, then a summary line (JSON lines).")
@click.option("--requeue", is_flag=True,
              help="Delete what `process` would skip although it is not ok, so the next run rebuilds it; "
                   "for the daemon, also mark its ledger records for retry.")
@click.option("--patch-size", type=int, default=None, help="Expected patch size (geometry_mismatch otherwise).")
@click.option("--target-mag", type=int, default=None, help="Expected target magnification.")
@click.option("--feature-extractors", default=None, help="Feature sets every file must have (missing_features).")
@click.option("--slides", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder to find the slides in by file name [the recorded wsi_path].")
@click.option("--state", "state_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The daemon's state folder, if not OUTPUT/.atlaspatch (for --requeue).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Files checked at once [CPUs, ≤ 8].")
def check(output: Path, as_json: bool, requeue: bool, patch_size: int | None, target_mag: int | None,
          feature_extractors: str | None, slides: Path | None, state_dir: Path | None, threads: int | None) -> None:
    """Validate every H5 under OUTPUT/patches (read only): one verdict per file with a reason code; exit 1 if any
    file is not ok. Orphans (temporary files, stale locks, H5s whose slide is gone) are listed too."""
    from ..qc.check import Expectations

    encoders = parse_feature_list(feature_extractors) if feature_extractors else ()
    expect = Expectations(patch_size, target_mag, encoders, slides)
    exit_with(run_check(output, expect, as_json=as_json, requeue=requeue, state_dir=state_dir, threads=threads))


def run_check(output: Path, expect: Any, *, as_json: bool, requeue: bool, state_dir: Path | None,
              threads: int | None) -> int:
    """Stream verdicts to stdout (problems as table rows, or every file as JSON), count them, requeue if asked."""
    from ..qc.check import count_candidates, iter_verdicts

    quiet_slide_libraries(False)  # a slide that no longer opens gets its verdict; tifffile's own line is noise
    counts: Counter[str] = Counter()
    orphans: Counter[str] = Counter()
    rebuild = []
    progress = _CheckProgress(count_candidates(output))
    started = time.perf_counter()
    for verdict in iter_verdicts(output, expect, threads=threads):
        counts[verdict.code] += 1
        orphans.update([verdict.orphan] if verdict.orphan else [])
        if requeue and not verdict.ok:
            rebuild.append(verdict)
        if as_json:
            write_line(orjson.dumps(verdict.to_json()).decode())
        elif not verdict.ok or verdict.orphan:
            progress.message(_row(verdict))
        progress.advance()
    progress.close()
    seconds = time.perf_counter() - started
    summary: dict[str, Any] = {"files": sum(counts.values()), "by_code": dict(counts), "orphans": dict(orphans),
                               "seconds": round(seconds, 3)}
    if requeue:
        summary["requeue"] = _requeue(output, rebuild, state_dir)
    _print_summary(summary, as_json)
    return 0 if set(counts) <= {"ok"} else 1


def _row(verdict: Any) -> str:
    orphan = f" [orphan: {verdict.orphan}]" if verdict.orphan else ""
    return f"{verdict.code:<21} {verdict.path.name}  {verdict.detail}{orphan}"


def _requeue(output: Path, rebuild: list[Any], state_dir: Path | None) -> dict[str, int]:
    from ..config import WatchConfig
    from ..daemon.ledger.store import LEDGER_FILE
    from ..qc.check import requeue

    ledger = (state_dir or WatchConfig().state_path(output)) / LEDGER_FILE
    done = requeue(rebuild, ledger if ledger.exists() else None)
    return {"deleted": len(done.deleted), "ledger_records": done.ledger_records}


def _print_summary(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        write_line(orjson.dumps({"summary": summary}).decode())
        return
    codes = ", ".join(f"{n} {code}" for code, n in sorted(summary["by_code"].items())) or "no files"
    orphans = ", ".join(f"{n} {kind}" for kind, n in sorted(summary["orphans"].items()))
    write_line(f"checked {summary['files']} file(s) in {summary['seconds']:.1f} s: {codes}"
               + (f"; orphans: {orphans}" if orphans else ""))
    if "requeue" in summary:
        r = summary["requeue"]
        write_line(f"requeued: deleted {r['deleted']} file(s), {r['ledger_records']} daemon record(s) marked for retry")


class _CheckProgress:
    """Files checked / total: a tqdm bar on a terminal's stderr, a plain line every 10 s otherwise."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self._last = total, 0, time.monotonic()
        self.bar: Any = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="Checking", unit="file", file=sys.stderr, dynamic_ncols=True)

    def advance(self) -> None:
        """One more file checked."""
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        elif time.monotonic() - self._last >= PLAIN_PROGRESS_EVERY_S:
            self._last = time.monotonic()
            write_line(f"Checking: {self.done}/{self.total} files", sys.stderr)

    def message(self, text: str) -> None:
        """A table row on stdout, never glued to the bar."""
        if self.bar is not None:
            self.bar.clear()
        write_line(text)
        if self.bar is not None:
            self.bar.refresh()

    def close(self) -> None:
        """Remove the bar."""
        if self.bar is not None:
            self.bar.close()


@click.command("report")
@click.argument("output", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Cards drawn at once [CPUs, ≤ 8].")
@click.option("--page-size", type=click.IntRange(min=1), default=50, show_default=True, help="Slides per page.")
def report(output: Path, threads: int | None, page_size: int) -> None:
    """Write the QC gallery OUTPUT/qc/index.html (self-contained: open it from disk, no network needed)."""
    build_report(output, threads=threads, page_size=page_size)


def build_report(output: Path, *, threads: int | None = None, page_size: int = 50, to_stderr: bool = False) -> None:
    """Write the gallery and say where (on stderr when stdout carries JSON), or one line naming the missing `qc`
    extra."""
    from ..errors import MissingExtraError, import_extra

    try:
        import_extra("jinja2", "qc", "atlaspatch report needs Jinja2")
        import_extra("matplotlib", "qc", "atlaspatch report needs matplotlib")
    except MissingExtraError as exc:
        raise click.ClickException(str(exc)) from exc
    from ..qc.report import write_report

    quiet_slide_libraries(False)  # a slide that cannot give a thumbnail is listed as missing on the page
    started = time.perf_counter()
    page = write_report(output, threads=threads, page_size=page_size)
    write_line(f"wrote {page} in {time.perf_counter() - started:.1f} s", sys.stderr if to_stderr else None)
