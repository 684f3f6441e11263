"""The QC gallery in a real browser: headless Chromium (Debian's `chromium`) over the DevTools protocol."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from atlaspatch_stream.cli import cli
from atlaspatch_stream.testing.synthetic import write_synthetic_slide

pytest.importorskip("websockets", reason="the browser test drives Chromium with the websockets package")
pytest.importorskip("jinja2", reason="atlaspatch report needs the qc extra")
pytest.importorskip("matplotlib", reason="atlaspatch report needs the qc extra")

from .cdp import find_chromium, open_page  # noqa: E402 - after the skips

SHOTS = Path(__file__).resolve().parents[1] / "output" / "qc"  # kept for CI artifacts and the README
ARGS = ["--patch-size", "256", "--target-mag", "20", "--segmenter", "otsu", "--device", "cpu",
        "--feature-extractors", "color_stats"]


@pytest.fixture
def chromium() -> str:
    """The Chromium binary, or a clean skip where it is not installed."""
    found = find_chromium()
    if found is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium)")
    return found


@pytest.fixture
def gallery(tmp_path: Path) -> Path:
    """Five synthetic slides processed with --qc, one truncated slide that fails, then `atlaspatch report`; the
    slide folder is then moved away (thumbnails must come from --qc)."""
    slides = tmp_path / "slides"
    for i in range(5):
        write_synthetic_slide(slides / f"case_{i:02d}.svs", width=3072 - 256 * i, height=2048, seed=i)
    (slides / "truncated.svs").write_bytes((slides / "case_00.svs").read_bytes()[:5000])
    out = tmp_path / "out"
    done = CliRunner().invoke(cli, ["process", str(slides), "-o", str(out), "--qc", *ARGS])
    assert done.exit_code == 1 and "truncated" in done.stderr, done.output
    shutil.move(slides, tmp_path / "moved")
    made = CliRunner().invoke(cli, ["report", str(out)], catch_exceptions=False)
    assert made.exit_code == 0, made.output
    return out / "qc" / "index.html"


def test_gallery_in_headless_chromium(chromium: str, gallery: Path, tmp_path: Path) -> None:
    """Open the gallery from disk: it renders 6 rows and cards; every thumbnail and plot loads (images forced eager
    and awaited); filtering by status `failed` leaves the truncated slide alone, by verdict `ok` the other five; the
    console shows no error and the only requests are for files in the gallery's folder (no network). Screenshots
    (before and after filtering) are kept under tests/output/qc/."""
    with open_page(chromium, tmp_path / "profile") as page:
        page.call("Page.navigate", url=gallery.as_uri())
        page.wait_for("Page.loadEventFired")
        assert page.evaluate("document.querySelectorAll('#slides tbody tr').length") == 6
        assert page.evaluate("document.querySelectorAll('#cards .card').length") == 6
        broken = page.evaluate("""
            Promise.all([...document.images].map((img) => { img.loading = 'eager';
              return img.complete ? null : new Promise((done) => { img.onload = img.onerror = done; }); }))
            .then(() => [...document.images].filter((img) => !img.naturalWidth).map((img) => img.src))""")
        assert broken == []
        assert page.evaluate("document.images.length") == 5 + 4  # five cards (no thumbnail for truncated), 4 plots
        page.screenshot(SHOTS / "gallery.png")
        status = page.evaluate("""(() => { const f = document.getElementById('f-status'); f.value = 'failed';
            f.dispatchEvent(new Event('input')); return [...document.querySelectorAll('#slides tbody tr')]
            .map((tr) => tr.cells[0].textContent); })()""")
        assert status == ["truncated"]
        page.screenshot(SHOTS / "gallery_failed.png")
        verdict = page.evaluate("""(() => { document.getElementById('f-status').value = '';
            const f = document.getElementById('f-verdict'); f.value = 'ok'; f.dispatchEvent(new Event('input'));
            return document.querySelectorAll('#slides tbody tr').length; })()""")
        assert verdict == 5
        page.evaluate("new Promise((done) => setTimeout(done, 200))")  # let late console messages arrive
    assert page.console_errors == []
    folder = gallery.parent.as_uri()
    assert page.requests and all(url.startswith(folder) for url in page.requests), page.requests


def test_a_page_of_10000_slides_stays_paged(chromium: str, tmp_path: Path) -> None:
    """The page rendered for 10,000 slides (rows only, no images): the DOM holds one page (50 rows, 50 cards), the
    count says 10000; a name filter finds one slide, the patch filter the 100 zero-patch ones (two pages)."""
    from atlaspatch_stream.qc.report import mark_outliers, render
    from atlaspatch_stream.qc.runlog import RunLog

    rows = [{"stem": f"s{i:05d}", "slide": f"slides/s{i:05d}.svs", "status": "done", "message": "",
             "patches": 0 if i % 100 == 0 else 400 + i % 50, "stages": {"read": 0.5}, "seconds": 1.0,
             "verdict": "ok", "verdict_detail": "", "image": None, "thumb": "missing", "tissue": None}
            for i in range(10_000)]
    page = tmp_path / "index.html"
    page.write_text(render(rows, RunLog(), {}, mark_outliers(rows), 50, 0.0))
    with open_page(chromium, tmp_path / "profile") as tab:
        tab.call("Page.navigate", url=page.as_uri())
        tab.wait_for("Page.loadEventFired")
        assert tab.evaluate("[document.querySelectorAll('#slides tbody tr').length, "
                            "document.querySelectorAll('#cards .card').length]") == [50, 50]
        assert tab.evaluate("document.getElementById('count').textContent") == "10000 of 10000 slides"
        found = tab.evaluate("""(() => { const f = document.getElementById('f-text'); f.value = 's09999';
            f.dispatchEvent(new Event('input')); return [...document.querySelectorAll('#slides tbody tr')]
            .map((tr) => tr.cells[0].textContent); })()""")
        assert found == ["s09999"]
        zero = tab.evaluate("""(() => { document.getElementById('f-text').value = '';
            const f = document.getElementById('f-patches'); f.value = 'zero'; f.dispatchEvent(new Event('input'));
            return [document.getElementById('count').textContent, document.getElementById('page').textContent]; })()""")
        assert zero == ["100 of 10000 slides", " page 1 of 2 "]
    assert tab.console_errors == []
