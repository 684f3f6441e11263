"""The daemon keeps the QC gallery of its output folder current: on its timer, and on demand from `status`."""

from __future__ import annotations

import os
import time
from pathlib import Path

import anyio
import pytest
from click.testing import CliRunner

from atlaspatch_stream.api import serve_folder
from atlaspatch_stream.cli import cli
from atlaspatch_stream.config import (
    EncodeConfig,
    PipelineConfig,
    PlanConfig,
    SegmentConfig,
    WatchConfig,
    WriteConfig,
)
from atlaspatch_stream.testing.synthetic import write_synthetic_slide

pytest.importorskip("jinja2", reason="the gallery needs the qc extra")
pytest.importorskip("matplotlib", reason="the gallery needs the qc extra")


@pytest.mark.anyio
async def test_the_daemon_rebuilds_the_gallery_and_status_report_does_it_at_once(tmp_path: Path) -> None:
    """A served folder with a 0.3 s gallery timer: once its slide is done, `<out>/qc/index.html` appears without
    anyone asking and (rebuilt as the run report grows) lists it. After the page is removed, `atlaspatch status OUT --report` rebuilds it at once."""
    folder, out = tmp_path / "in", tmp_path / "out"
    write_synthetic_slide(folder / "s.svs", width=2048, height=1536)
    old = time.time() - 60
    os.utime(folder / "s.svs", (old, old))
    config = PipelineConfig(segment=SegmentConfig(segmenter="otsu", device="cpu"),
                            plan=PlanConfig(patch_size=256, target_mag=20),
                            encode=EncodeConfig(extractors=("color_stats",), device="cpu"), write=WriteConfig(output=out),
                            watch=WatchConfig(settle_s=0.2, rescan_s=0.3, watch_mode="poll", status_interval_s=0.2,
                                              qc_report_s=0.3))
    page = out / "qc" / "index.html"
    with anyio.fail_after(120):
        async with serve_folder(folder, config, allow_root=True) as service:
            async with service.results() as results:
                outcome = await results.receive()
                assert outcome.state == "done"
                while not (page.exists() and '"stem": "s"' in page.read_text()):  # rebuilt as the report grows
                    await anyio.sleep(0.1)
            service.stop()
    page.unlink()
    done = CliRunner().invoke(cli, ["status", str(out), "--report"], catch_exceptions=False)
    assert done.exit_code == 0 and page.exists(), done.output
