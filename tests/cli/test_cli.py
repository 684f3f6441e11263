"""CLI scenarios: the commands as a user types them, on real and synthetic slides, CPU and offline."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import orjson
import pytest
from click.testing import CliRunner

from atlaspatch_stream.cli import cli
from atlaspatch_stream.testing.synthetic import write_synthetic_slide

from ..conftest import SHARED_SLIDES

COORDS = ["--patch-size", "256", "--target-mag", "20", "--segmenter", "otsu", "--device", "cpu"]


def _run(args: list[str]) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def mixed_folder(tmp_path: Path) -> Path:
    """A folder with two good synthetic slides and the two broken real ones (when available)."""
    folder = tmp_path / "slides"
    folder.mkdir()
    write_synthetic_slide(folder / "good_a.svs", width=2048, height=1536, seed=1)
    write_synthetic_slide(folder / "good_b.SVS", width=2048, height=1536, seed=2, compression="jpeg_ycbcr")
    for name in ("unreadable.svs", "unopenable.tiff"):
        src = SHARED_SLIDES / "errors" / name
        if src.exists():
            shutil.copy(src, folder / name)
    return folder


def test_segment_and_get_coords_mixed_batch(mixed_folder: Path, tmp_path: Path) -> None:
    """Good and broken slides in one folder: H5s for the good ones, one line per broken one, a report, exit 1."""
    out = tmp_path / "out"
    code, stdout, stderr = _run(["segment-and-get-coords", str(mixed_folder), "-o", str(out), *COORDS])
    broken = [p for p in mixed_folder.iterdir() if p.stem in ("unreadable", "unopenable")]
    assert code == (1 if broken else 0)
    assert sorted(p.name for p in (out / "patches").glob("*.h5")) == ["good_a.h5", "good_b.h5"]
    fail_lines = [line for line in stderr.splitlines() if line.startswith("[FAIL]")]
    assert len(fail_lines) == len(broken)
    for path in broken:
        assert any(path.name in line for line in fail_lines)
    assert f"Completed 2 slide(s), failures: {len(broken)}" in stdout
    with h5py.File(out / "patches" / "good_a.h5") as f:
        assert f["coords"].dtype == "int32" and f["coords"].shape[1] == 5
        assert f.attrs["num_patches"] == f["coords"].shape[0] > 0
    events = [orjson.loads(line) for line in (out / "atlaspatch-report.jsonl").read_bytes().splitlines()]
    kinds = {e["event"] for e in events}
    assert {"run_start", "stage", "slide", "run_end"} <= kinds
    assert not list((out / "patches").glob("*.lock"))
    assert not list((out / "patches").glob(".*tmp*"))


def test_second_run_skips_existing_and_force_redoes(tmp_path: Path) -> None:
    """Run twice: the second run skips the slide (exit 0); --force writes it again."""
    slide = write_synthetic_slide(tmp_path / "s.svs", width=2048, height=1536)
    out = tmp_path / "out"
    assert _run(["segment-and-get-coords", str(slide), "-o", str(out), *COORDS])[0] == 0
    first = (out / "patches" / "s.h5").stat().st_mtime_ns
    code, stdout, _ = _run(["segment-and-get-coords", str(slide), "-o", str(out), *COORDS])
    assert code == 0 and "Skipped 1 existing" in stdout
    assert (out / "patches" / "s.h5").stat().st_mtime_ns == first
    assert _run(["segment-and-get-coords", str(slide), "-o", str(out), *COORDS, "--force"])[0] == 0
    assert (out / "patches" / "s.h5").stat().st_mtime_ns != first


def test_reuse_with_other_geometry_fails_with_hint(tmp_path: Path) -> None:
    """An existing H5 made with another patch size is not silently reused: the slide fails and names --force."""
    slide = write_synthetic_slide(tmp_path / "s.svs", width=2048, height=1536)
    out = tmp_path / "out"
    assert _run(["segment-and-get-coords", str(slide), "-o", str(out), *COORDS])[0] == 0
    other = ["--patch-size", "128", *COORDS[2:]]
    code, _, stderr = _run(["segment-and-get-coords", str(slide), "-o", str(out), *other])
    assert code == 1
    assert "--force" in stderr and "patch_size" in stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--patch-size", "0", "--target-mag", "20"], "patch-size"),
        (["--patch-size", "256", "--target-mag", "500"], "target-mag"),
        (["--patch-size", "256", "--target-mag", "20", "--tissue-thresh", "2"], "tissue-thresh"),
    ],
)
def test_invalid_arguments_fail_at_once(tmp_path: Path, args: list[str], needle: str) -> None:
    """Bad flag values: non-zero exit and one line naming the flag, before any slide is touched."""
    slide = write_synthetic_slide(tmp_path / "s.svs", width=1024, height=1024)
    result = CliRunner().invoke(cli, ["segment-and-get-coords", str(slide), "-o", str(tmp_path / "o"), *args])
    assert result.exit_code != 0
    assert needle in result.output
    assert not (tmp_path / "o" / "patches").exists()


def test_missing_input_empty_folder_and_unwritable_output(tmp_path: Path) -> None:
    """A missing path, an empty folder and an unwritable output each fail at once with one clear line."""
    result = CliRunner().invoke(cli, ["segment-and-get-coords", str(tmp_path / "nope"), "-o", str(tmp_path / "o"),
                                      *COORDS])
    assert result.exit_code == 2 and "does not exist" in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(cli, ["segment-and-get-coords", str(empty), "-o", str(tmp_path / "o"), *COORDS])
    assert result.exit_code == 1 and "No WSI files found" in result.output
    slide = write_synthetic_slide(tmp_path / "s.svs", width=1024, height=1024)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = CliRunner().invoke(cli, ["segment-and-get-coords", str(slide), "-o", str(blocker / "out"), *COORDS])
    assert result.exit_code == 1 and "not writable" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_detect_tissue_writes_overlays(tmp_path: Path) -> None:
    """detect-tissue writes <stem>_mask.png and <stem>_mask_bw.png and no H5."""
    slide = write_synthetic_slide(tmp_path / "s.svs", width=2048, height=1536)
    out = tmp_path / "out"
    code, stdout, _ = _run(["detect-tissue", str(slide), "-o", str(out), "--segmenter", "otsu", "--device", "cpu"])
    assert code == 0 and "Created 1 mask overlay(s), failures: 0" in stdout
    assert (out / "visualization" / "s_mask.png").exists() and (out / "visualization" / "s_mask_bw.png").exists()
    assert not (out / "patches").exists()


def test_info_and_version() -> None:
    """info lists formats and the layout; --version prints this package's version."""
    code, stdout, _ = _run(["info"])
    assert code == 0 and ".svs" in stdout and "patches/<stem>.h5" in stdout
    code, stdout, _ = _run(["--version"])
    from atlaspatch_stream import __version__

    assert code == 0 and __version__ in stdout


def test_help_does_not_import_torch() -> None:
    """`atlaspatch --help` in a fresh interpreter loads neither torch nor cv2."""
    code = ("import sys; from atlaspatch_stream.cli import cli\n"
            "try:\n    cli(['process', '--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules and 'cv2' not in sys.modules, 'heavy import'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr
    assert "--feature-extractors" in proc.stdout


@pytest.mark.skipif(not SHARED_SLIDES.is_dir(), reason="real slides absent")
def test_real_slides_folder(tmp_path: Path) -> None:
    """The real fixture folder: every slide with a known magnification yields an H5; broken ones fail, one line each."""
    out = tmp_path / "out"
    code, stdout, stderr = _run(["segment-and-get-coords", str(SHARED_SLIDES), "--recursive", "-o", str(out), *COORDS])
    assert code == 1
    made = {p.stem for p in (out / "patches").glob("*.h5")}
    assert {"CMU-1-Small-Region", "small-16x16", "test3-DAPI-2-387"} <= made
    fails = [line for line in stderr.splitlines() if line.startswith("[FAIL]")]
    assert any("unreadable.svs" in line for line in fails)
    assert any("unopenable.tiff" in line for line in fails)
    assert all(len(line) < 400 for line in fails)


def test_process_resnet50_and_color_stats_with_local_weights(tmp_path: Path) -> None:
    """The issue's command: process with resnet50 (local weights file) and color_stats on CPU writes complete,
    row-aligned feature sets in upstream's schema."""
    import torch
    import torchvision

    folder = tmp_path / "slides"
    write_synthetic_slide(folder / "a.svs", width=2048, height=1536, seed=7)
    write_synthetic_slide(folder / "b.svs", width=1536, height=1536, seed=8, compression="jpeg2000")
    torch.manual_seed(0)
    weights = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), weights)
    out = tmp_path / "out"
    code, stdout, stderr = _run(["process", str(folder), "-o", str(out), "--patch-size", "256", "--target-mag", "20",
                                 "--feature-extractors", "resnet50,color_stats", "--device", "cpu",
                                 "--segmenter", "otsu", "--weights", f"resnet50={weights}",
                                 "--feature-batch-size", "8"])
    assert code == 0, stderr
    assert "Completed 2 slide(s), failures: 0" in stdout
    for stem in ("a", "b"):
        with h5py.File(out / "patches" / f"{stem}.h5") as f:
            n = f.attrs["num_patches"]
            assert n > 0
            assert f["features/resnet50"].shape == (n, 2048)
            assert f["features/color_stats"].shape[0] == n
            assert not [k for k in f["features"] if k.startswith("__tmp_")]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-GPU fallback")
def test_default_cuda_device_falls_back_to_cpu_for_encoders_too(tmp_path: Path) -> None:
    """Without a GPU, upstream's default --device cuda makes every slide fail in its feature stage; here both the
    segmenter and the encoders fall back to the CPU with a warning, and the run succeeds."""
    slide = write_synthetic_slide(tmp_path / "s.svs", width=1024, height=1024)
    code, stdout, stderr = _run(["process", str(slide), "-o", str(tmp_path / "out"), "--patch-size", "256",
                                 "--target-mag", "20", "--segmenter", "otsu", "--feature-extractors", "color_stats"])
    assert code == 0, stderr
    assert "Completed 1 slide(s), failures: 0" in stdout
