"""`atlaspatch report OUT`: a self-contained QC gallery, `<out>/qc/index.html`.

One card per slide (thumbnail with tissue contours and patch grid, patches, tissue fraction, status, failure cause,
magnification and mpp, time per stage, `check` verdict), a sortable, filterable, paged table of every slide, run-level
plots (stage busy time, throughput over time, queue occupancy, patches per slide) and the run's settings, encoders,
versions and machine. No network: the page is one HTML file (Jinja2 template shipped with the package, styles and
script inline) beside `cards/*.jpg` and `plots/*.svg` (matplotlib) in the same folder.

Thumbnails come from `<out>/qc/thumbs/` (`process --qc`) or, failing that, from the slide when it is still there; the
page lists the slides that have neither. Cards are drawn on a thread pool.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..cpu import usable_cores
from ..geometry import Contours
from ..outputs import qc_thumbs_dir
from .check import Verdict, check_outputs
from .runlog import RunLog, read_run_log

OUTLIER_FACTOR = 4.0  # a patch count this many times above or below the run's median is an outlier
PACKAGES = ("atlaspatch-stream", "torch", "timm", "h5py", "tiffslide", "openslide-bin", "numpy", "matplotlib",
            "jinja2")


@dataclass(frozen=True)
class Card:
    """One slide's card image and what was learnt drawing it."""

    image: str | None  # path relative to `<out>/qc/`, None when no thumbnail could be had
    source: str  # "run" (process --qc), "slide" (read now), or "missing"
    tissue_fraction: float | None
    facts: Mapping[str, Any]  # magnification, mpp, level-0 size from the H5


def write_report(out: Path, *, threads: int | None = None, page_size: int = 50) -> Path:
    """Build `<out>/qc/index.html` and its images; returns the page's path.

    Args:
        out: the output folder of `process`, `segment-and-get-coords` or `watch`.
        threads: workers drawing cards and checking H5s (default: CPU count, at most 8).
        page_size: table rows (and cards) per page.
    """
    started = time.perf_counter()
    out = Path(out)
    qc = out / "qc"
    log = read_run_log(out)
    verdicts = {v.stem: v for v in check_outputs(out, threads=threads) if v.path.suffix == ".h5"}
    rows = slide_rows(log, verdicts)
    workers = threads or min(8, usable_cores())
    with ThreadPoolExecutor(workers, thread_name_prefix="atlaspatch-report") as pool:
        cards = list(pool.map(lambda row: make_card(out, row), rows))
    for row, card in zip(rows, cards, strict=True):
        row.update(image=card.image, thumb=card.source, tissue=card.tissue_fraction, **card.facts)
    median = mark_outliers(rows)
    plots = write_plots(qc / "plots", log, rows)
    page = render(rows, log, plots, median, page_size, time.perf_counter() - started)
    return _write_text(qc / "index.html", page)


def slide_rows(log: RunLog, verdicts: Mapping[str, Verdict]) -> list[dict[str, Any]]:
    """One row per slide: every slide of the run report, then every H5 the report does not know."""
    rows: dict[str, dict[str, Any]] = {}
    for name, event in log.slides.items():
        stem = Path(event["h5"]).stem if event.get("h5") else Path(name).stem
        rows[stem] = {"stem": stem, "slide": name, "status": event.get("status", ""),
                      "message": event.get("message", ""), "patches": event.get("num_patches"),
                      "stages": event.get("stages", {}), "seconds": event.get("seconds"), "verdict": "no file",
                      "verdict_detail": ""}
    for stem, verdict in verdicts.items():
        row = rows.setdefault(stem, {"stem": stem, "slide": "", "status": "no report", "message": "", "patches": None,
                                     "stages": {}, "seconds": None})
        row.update(verdict=verdict.code, verdict_detail=verdict.detail, h5=str(verdict.path))
        if row["patches"] is None:
            row["patches"] = verdict.num_patches
    return sorted(rows.values(), key=lambda r: r["stem"])


def mark_outliers(rows: Sequence[dict[str, Any]]) -> float | None:
    """Flag rows whose patch count is zero or `OUTLIER_FACTOR`× away from the median of slides with patches."""
    counts = [r["patches"] for r in rows if r.get("patches")]
    median = float(statistics.median(counts)) if counts else None
    for row in rows:
        n = row.get("patches")
        far = median is not None and n is not None and n > 0 and not (
            median / OUTLIER_FACTOR <= n <= median * OUTLIER_FACTOR)
        row["outlier"] = "zero" if n == 0 else ("far" if far else "")
    return median


def make_card(out: Path, row: Mapping[str, Any]) -> Card:
    """One slide's card, `<out>/qc/cards/<stem>.jpg`: drawn from its `--qc` thumbnail or its slide, with its H5's
    patch grid; a card newer than all of those is kept as it is (the daemon's refreshes redraw only what changed)."""
    stem, h5 = row["stem"], Path(row["h5"]) if row.get("h5") else None
    attrs = _h5_read(h5, coords=False)[0]
    facts = {"target_mag": attrs.get("target_magnification"), "base_mag": attrs.get("level0_magnification"),
             "mpp": attrs.get("mpp")}
    source, picture, mask_path = _thumbnail_source(out, stem, row.get("slide", ""), attrs)
    if picture is None:
        return Card(None, "missing", None, facts)
    from ..outputs.overlays import read_qc_image

    mask = read_qc_image(mask_path) if mask_path is not None else None
    tissue = float((mask > 127).mean()) if mask is not None else None
    card = out / "qc" / "cards" / f"{stem}.jpg"
    if not _newer(card, [h5, picture, mask_path]) and not _draw_card(card, source, picture, mask, h5, attrs):
        return Card(None, "missing", tissue, facts)
    return Card(f"cards/{stem}.jpg", source, tissue, facts)


def _thumbnail_source(out: Path, stem: str, slide: str, attrs: Mapping[str, Any]) -> tuple[str, Path | None,
                                                                                         Path | None]:
    """(source, picture, mask): the `--qc` files first ("run"), else the slide itself if it is still there."""
    saved = qc_thumbs_dir(out) / f"{stem}.jpg"
    if saved.exists():
        mask = saved.with_name(f"{stem}.mask.png")
        return "run", saved, mask if mask.exists() else None
    path = Path(slide or str(attrs.get("wsi_path") or ""))
    if path.name and path.exists():
        return "slide", path, None
    return "missing", None, None


def _newer(card: Path, sources: Sequence[Path | None]) -> bool:
    try:
        made = card.stat().st_mtime_ns
        return all(made >= p.stat().st_mtime_ns for p in sources if p is not None)
    except FileNotFoundError:
        return False


def _draw_card(card: Path, source: str, picture: Path, mask: np.ndarray | None, h5: Path | None,
               attrs: Mapping[str, Any]) -> bool:
    """Draw and write the card; False when the slide gives no thumbnail."""
    from ..outputs.overlays import draw_qc_card, read_qc_image, write_qc_card

    thumb = read_qc_image(picture) if source == "run" else _slide_thumbnail(picture)
    if thumb is None:
        return False
    coords = _h5_read(h5, coords=True)[1]
    size = (int(attrs.get("level0_width") or thumb.shape[1]), int(attrs.get("level0_height") or thumb.shape[0]))
    write_qc_card(card, draw_qc_card(thumb, _tissue(mask), size, coords, int(attrs.get("patch_size_level0") or 0)))
    return True


def _tissue(mask: np.ndarray | None) -> tuple[Contours, tuple[int, int]] | None:
    """The tissue contours of a saved `--qc` mask (upstream's contour rules, no area threshold) and its shape."""
    if mask is None:
        return None
    from ..backends.contours import mask_to_contours

    return mask_to_contours(mask, 0.0), (mask.shape[0], mask.shape[1])


def _slide_thumbnail(path: Path) -> np.ndarray | None:
    """The slide library's own thumbnail (at most the `--qc` size), or None when the slide does not give one."""
    from ..backends.slides import open_slide
    from ..errors import SlideError
    from ..outputs.overlays import QC_THUMB_MAX

    try:
        with contextlib.closing(open_slide(path)) as handle:
            return handle.overlay_thumbnail(QC_THUMB_MAX)
    except SlideError:
        return None


def _h5_read(h5: Path | None, *, coords: bool) -> tuple[dict[str, Any], np.ndarray]:
    """An H5's root attributes (and coords when asked); nothing when it is absent or unreadable (its verdict says
    why)."""
    from ..outputs.h5check import read_summary

    if h5 is not None:
        with contextlib.suppress(OSError, KeyError, ValueError):
            return read_summary(h5, coords=coords)
    return {}, np.zeros((0, 5), np.int32)


def write_plots(folder: Path, log: RunLog, rows: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """The run-level SVG plots (matplotlib); returns {name: path relative to `<out>/qc/`}."""
    from . import plots

    start = float(log.start.get("time") or 0.0)
    made = {
        "stage_busy": plots.stage_busy(log.stage_busy()),
        "throughput": plots.throughput(log.timeline, start),
        "queues": plots.queue_occupancy(log.timeline, start,
                                        {k: v.get("size", 0) for k, v in log.end.get("streams", {}).items()}),
        "patches": plots.patches_histogram([int(r["patches"]) for r in rows if r.get("patches") is not None]),
    }
    for name, svg in made.items():
        _write_text(folder / f"{name}.svg", svg)
    return {name: f"plots/{name}.svg" for name in made}


def render(rows: list[dict[str, Any]], log: RunLog, plots: Mapping[str, str], median: float | None,
           page_size: int, build_seconds: float) -> str:
    """The page, from the package's Jinja2 template."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("atlaspatch_stream.qc", "templates"),
                             autoescape=jinja2.select_autoescape(["html", "j2"]))
    settings = log.start.get("settings", {})
    missing = [r["stem"] for r in rows if r.get("thumb") == "missing"]
    return env.get_template("index.html.j2").render(
        rows=rows, page_size=page_size, plots=plots, run=log.start, end=log.end, runs=log.runs,
        settings=settings, encoders=settings.get("encode", {}).get("extractors", []),
        versions=_versions(), machine=log.start.get("machine", {}), missing=missing,
        statuses=sorted({r["status"] for r in rows}), verdicts=sorted({r["verdict"] for r in rows}),
        median=median, outlier_factor=OUTLIER_FACTOR, built=time.strftime("%Y-%m-%d %H:%M:%S %Z"), build_seconds=build_seconds,
        tool_version=__version__)


def _versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        with contextlib.suppress(PackageNotFoundError):
            found[name] = version(name)
    return found


def _write_text(path: Path, text: str) -> Path:
    """Write a file atomically (temporary name, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
