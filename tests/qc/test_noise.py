"""Noise a new user met: a truncated slide's raw tifffile line, and the hard-link fallback warning printed twice."""

from __future__ import annotations

import errno
import logging
import os
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from atlaspatch_stream.cli import cli
from atlaspatch_stream.outputs import claims
from atlaspatch_stream.testing.synthetic import write_synthetic_slide


def test_a_truncated_slide_prints_only_its_fail_line(tmp_path: Path) -> None:
    """A slide cut short after its first 5 kB among a good one: stderr has the slide's one [FAIL] line and no line
    from tifffile (which logs `invalid page offset` at ERROR level for such a file)."""
    slides = tmp_path / "slides"
    write_synthetic_slide(slides / "good.svs", width=2048, height=1536, seed=1)
    (slides / "cut.svs").write_bytes((slides / "good.svs").read_bytes()[:5000])
    done = CliRunner().invoke(cli, ["segment-and-get-coords", str(slides), "-o", str(tmp_path / "out"),
                                    "--patch-size", "256", "--target-mag", "20", "--segmenter", "otsu",
                                    "--device", "cpu"])
    assert done.exit_code == 1
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert [line for line in lines if "cut.svs" in line and line.startswith("[FAIL]")] == lines[-1:], lines
    assert not any("tifffile" in line for line in lines), lines


def test_the_hard_link_fallback_warning_is_printed_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """Two slides claimed at the same instant on a filesystem without hard links (exFAT; stood in for by `link()`
    failing with EPERM, as exFAT's does, since no such filesystem can be mounted here): both claims succeed through
    the O_EXCL fallback and the warning appears once."""
    gate = threading.Barrier(2, timeout=10)

    def no_link(src: str, dst: str) -> None:
        gate.wait()  # both claims reach link() before either records the device
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(claims.os, "link", no_link)
    monkeypatch.setattr(claims, "_NO_LINK_DEVS", set())
    got: list[object] = []
    with caplog.at_level(logging.WARNING, logger="atlaspatch_stream"):
        threads = [threading.Thread(target=lambda i=i: got.append(claims.try_claim(tmp_path / f"s{i}.lock")))
                   for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    assert len(got) == 2 and all(c is not None for c in got)
    assert sorted(os.listdir(tmp_path)) == ["s0.lock", "s1.lock"]
    assert [r.getMessage() for r in caplog.records].count(
        f"{tmp_path}: no hard links on this filesystem; lock files fall back to O_EXCL") == 1
