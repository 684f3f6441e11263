"""`atlaspatch report`: thumbnails from --qc or from the slides, the missing ones named, nothing fetched from afar."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from atlaspatch_stream.cli import cli
from atlaspatch_stream.sync import write_report
from atlaspatch_stream.testing.synthetic import write_synthetic_slide

pytest.importorskip("jinja2", reason="atlaspatch report needs the qc extra")
pytest.importorskip("matplotlib", reason="atlaspatch report needs the qc extra")

ARGS = ["--patch-size", "256", "--target-mag", "20", "--segmenter", "otsu", "--device", "cpu"]


def _rows(page: Path) -> list[dict]:
    found = re.search(r'<script id="data" type="application/json">(.*?)</script>', page.read_text(), re.S)
    assert found is not None
    return json.loads(found.group(1))


def test_thumbnails_come_from_the_slides_until_they_are_gone(tmp_path: Path) -> None:
    """Without --qc the cards are drawn from the slides while they are there; once the slides are moved away the
    page names both slides as missing a thumbnail. The page references no remote URL; the run plots are SVG files
    beside it."""
    slides, out = tmp_path / "slides", tmp_path / "out"
    for i in range(2):
        write_synthetic_slide(slides / f"s{i}.svs", width=2048, height=1536, seed=i)
    done = CliRunner().invoke(cli, ["segment-and-get-coords", str(slides), "-o", str(out), *ARGS])
    assert done.exit_code == 0, done.output
    page = write_report(out)
    rows = _rows(page)
    assert [(r["stem"], r["thumb"], r["verdict"]) for r in rows] == [("s0", "slide", "ok"), ("s1", "slide", "ok")]
    assert all((page.parent / r["image"]).stat().st_size > 0 and r["patches"] > 0 for r in rows)
    html = page.read_text()
    assert not re.search(r'(src|href)="(https?:)?//', html)
    assert {p.name for p in (page.parent / "plots").glob("*.svg")} == {"stage_busy.svg", "throughput.svg",
                                                                       "queues.svg", "patches.svg"}
    shutil.move(slides, tmp_path / "elsewhere")
    shutil.rmtree(page.parent / "cards")
    rows = _rows(write_report(out))
    assert [(r["thumb"], r["image"]) for r in rows] == [("missing", None)] * 2
    assert "No thumbnail for 2 slide(s)" in page.read_text()


def test_outliers_and_verdicts_reach_the_table(tmp_path: Path) -> None:
    """A zero-patch slide (blank) among slides with tissue is flagged `zero`; a file broken after the run carries
    its `check` verdict in the table."""
    slides, out = tmp_path / "slides", tmp_path / "out"
    for i in range(3):
        write_synthetic_slide(slides / f"s{i}.svs", width=2048, height=1536, seed=i)
    write_synthetic_slide(slides / "blank.svs", width=2048, height=1536, seed=9, tissue="none")
    done = CliRunner().invoke(cli, ["segment-and-get-coords", str(slides), "-o", str(out), "--qc", *ARGS])
    assert done.exit_code == 0, done.output
    (out / "patches" / "s2.h5").write_bytes(b"not an h5")
    rows = {r["stem"]: r for r in _rows(write_report(out))}
    assert rows["blank"]["patches"] == 0 and rows["blank"]["outlier"] == "zero"
    assert rows["s0"]["outlier"] == "" and rows["s0"]["tissue"] > 0
    assert rows["s2"]["verdict"] == "corrupt" and rows["s0"]["verdict"] == "ok"


def test_a_rebuild_redraws_only_the_cards_whose_inputs_changed(tmp_path: Path) -> None:
    """Two slides with --qc, the gallery built; a second build keeps both card files as they were; after s1's H5 is
    rewritten (newer than its card) the third build redraws s1's card alone."""
    slides, out = tmp_path / "slides", tmp_path / "out"
    for i in range(2):
        write_synthetic_slide(slides / f"s{i}.svs", width=2048, height=1536, seed=i)
    done = CliRunner().invoke(cli, ["segment-and-get-coords", str(slides), "-o", str(out), "--qc", *ARGS])
    assert done.exit_code == 0, done.output
    cards = out / "qc" / "cards"
    write_report(out)
    first = {p.name: p.stat().st_mtime_ns for p in cards.iterdir()}
    write_report(out)
    assert {p.name: p.stat().st_mtime_ns for p in cards.iterdir()} == first
    h5 = out / "patches" / "s1.h5"
    later = first["s1.jpg"] + 1  # just newer than its card
    os.utime(h5, ns=(later, later))
    write_report(out)
    again = {p.name: p.stat().st_mtime_ns for p in cards.iterdir()}
    assert again["s0.jpg"] == first["s0.jpg"] and again["s1.jpg"] > first["s1.jpg"]
