"""`atlaspatch process` when the output disk fills or fails: a clean failure (exit 1, one line per slide, no crash,
no traceback), nothing left stuck (no temp files, no locks, every H5 that exists complete), and a rerun that
completes every slide. Faults are injected at the OS write under HDF5 for every k of a whole run, and met for real on
a small tmpfs and on an output remounted read-only mid-run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import h5py
import orjson
import pytest
import torch
import torchvision

from atlaspatch_stream.testing.synthetic import write_synthetic_slide
from tests.conftest import SHARED_SLIDES
from tests.helpers import TINY_PLUGIN, leftovers, mounted_tmpfs

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
CLI = [sys.executable, "-c", "from atlaspatch_stream.cli import main; main()"]


COMMON = ["--patch-size", "256", "--target-mag", "20", "--segmenter", "otsu", "--device", "cpu",
          "--feature-precision", "float32"]


def _args(folder: Path, out: Path, weights: Path) -> list[str]:
    """The issue's command: color_stats and resnet18 (random local weights)."""
    return ["process", str(folder), "-o", str(out), *COMMON, "--feature-extractors", "color_stats,resnet18",
            "--weights", f"resnet18={weights}"]


def _light_args(folder: Path, out: Path, plugin: Path) -> list[str]:
    """Two cheap encoders (color_stats and a tiny plugin CNN), for runs repeated many times."""
    return ["process", str(folder), "-o", str(out), *COMMON, "--feature-extractors", "color_stats,tiny_conv",
            "--feature-plugin", str(plugin)]


@pytest.fixture(scope="module")
def resnet18(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


def complete_h5s(out: Path) -> dict[str, int]:
    """stem -> patch count of every H5 under out/patches, each checked complete (coords, both feature sets)."""
    found = {}
    for path in sorted((out / "patches").glob("*.h5")) if (out / "patches").exists() else []:
        with h5py.File(path, "r") as f:
            n = int(f.attrs["num_patches"])
            assert f["coords"].shape == (n, 5) and n > 0, path
            sets = {name: f["features"][name].shape for name in f["features"]}
            assert len(sets) == 2 and all(shape[0] == n for shape in sets.values()), (path, sets)
        found[path.stem] = n
    return found


MATRIX = textwrap.dedent("""
    import errno, json, os, shutil, sys
    from pathlib import Path
    from atlaspatch_stream.cli import main
    from atlaspatch_stream.testing import faults

    args, out, ks = json.loads(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])

    def run(argv):
        sys.argv = ["atlaspatch", *argv]
        try:
            main()
        except SystemExit as exc:
            return exc.code
        return 0

    with faults.count_writes() as clean:
        assert run(args) == 0
    print(json.dumps({"writes": clean.count}), flush=True)
    for k in ks or range(1, clean.count + 1):
        shutil.rmtree(out)
        code = errno.ENOSPC if k % 2 else errno.EIO
        with faults.inject(at=k, errno=code) as injected:
            failed = run(args)
        left = sorted(p.name for p in (out / "patches").iterdir() if ".tmp." in p.name or p.suffix == ".lock")
        from tests.cli.test_output_faults import complete_h5s
        h5s = complete_h5s(out)
        again = run(args)
        print(json.dumps({"k": k, "errno": code, "exit": failed, "failed_ops": injected.failed, "left": left,
                          "complete": sorted(h5s), "rerun": again, "after": sorted(complete_h5s(out))}), flush=True)
""")


def test_every_failing_write_of_a_whole_run_ends_cleanly(tmp_path: Path) -> None:
    """Three slides, two encoders; for every k of the run's H5 writes, the k-th write (and every later one: a full
    disk stays full) fails with ENOSPC or EIO: each run exits 1 with no crash and no traceback, leaves no temporary
    file and no lock, every H5 that exists is complete, and a rerun completes every slide."""
    folder = tmp_path / "in"
    for i in range(3):
        write_synthetic_slide(folder / f"s{i}.svs", width=1536, height=1024, seed=i)
    plugin = tmp_path / "tiny_plugin.py"
    plugin.write_text(TINY_PLUGIN)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", MATRIX, orjson.dumps(_light_args(folder, out, plugin)).decode(),
                           str(out), "[]"], env=ENV, capture_output=True, text=True, timeout=1200,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr[-3000:]
    lines = [orjson.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    writes, runs = lines[0]["writes"], lines[1:]
    assert writes >= 30 and [r["k"] for r in runs] == list(range(1, writes + 1))
    for r in runs:
        assert r["exit"] == 1 and r["failed_ops"] >= 1, r
        assert r["left"] == [], r
        assert r["rerun"] == 0 and r["after"] == ["s0", "s1", "s2"], r
    assert proc.stderr.count("[FAIL]") >= writes  # every run names at least one failed slide


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs (root only; skipped where it cannot be mounted)."""
    with mounted_tmpfs(tmp_path / "tmpfs", "4m") as where:
        yield where


def _cli(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env=ENV, capture_output=True, text=True, timeout=600)


def test_the_issue_scenario_on_a_4_mib_tmpfs(tmp_path: Path, tmpfs: Path, resnet18: Path) -> None:
    """6 copies of CMU-1-Small-Region.svs with color_stats and resnet18 into a 4 MiB tmpfs: exit 1 (no segfault,
    no traceback), one [FAIL] per slide that did not fit naming the free space, the rest `not started: output disk
    full` in one summary line; no temp files, no locks. With room made, a rerun completes all 6 (exit 0)."""
    source = SHARED_SLIDES / "aperio" / "CMU-1-Small-Region.svs"
    if not source.exists():
        pytest.skip("CMU-1-Small-Region.svs not available")
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(1, 7):
        shutil.copy(source, folder / f"s{i}.svs")
    out = tmpfs / "out"
    first = _cli(_args(folder, out, resnet18))
    assert first.returncode == 1, first.stderr[-2000:]
    assert "Traceback" not in first.stderr and "Exception ignored" not in first.stderr
    fails = [line for line in first.stderr.splitlines() if line.startswith("[FAIL]")]
    assert fails and all("output disk full" in line and "free on" in line for line in fails)
    assert "Stopped early (output disk full)" in first.stdout or len(fails) + len(complete_h5s(out)) == 6
    assert leftovers(out) == []
    subprocess.run(["mount", "-o", "remount,size=64m", str(tmpfs)], check=True)
    second = _cli(_args(folder, out, resnet18))
    assert second.returncode == 0, second.stderr[-2000:]
    assert sorted(complete_h5s(out)) == [f"s{i}" for i in range(1, 7)] and leftovers(out) == []


def _read_only(folder: Path, on: bool) -> None:
    """Make `folder` refuse new entries: `chattr +i` as root (root ignores permission bits), chmod 0555 otherwise."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i" if on else "-i", str(folder)], check=True)
    else:
        os.chmod(folder, 0o555 if on else 0o755)


def test_output_folder_made_read_only_mid_run(tmp_path: Path) -> None:
    """The output folder stops accepting new files after the first slide (read-only): the run stops starting slides,
    exits 1 with one line per failed slide naming the cause and no traceback; the H5s written before are complete.
    Once writable again, the rerun sweeps what the read-only folder kept it from removing and completes every
    slide."""
    if os.geteuid() == 0 and shutil.which("chattr") is None:
        pytest.skip("needs chattr as root")
    folder = tmp_path / "in"
    for i in range(12):
        write_synthetic_slide(folder / f"s{i:02d}.svs", width=2048, height=1536, seed=i)
    plugin = tmp_path / "tiny_plugin.py"
    plugin.write_text(TINY_PLUGIN)
    out = tmp_path / "out"
    proc = subprocess.Popen([*CLI, *_light_args(folder, out, plugin), "--max-open-slides", "2"], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out / "patches").exists() or not list((out / "patches").glob("*.h5")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    _read_only(out / "patches", True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        _read_only(out / "patches", False)
    assert proc.returncode == 1 and "Traceback" not in stderr, stderr[-2000:]
    fails = [line for line in stderr.splitlines() if line.startswith("[FAIL]")]
    assert fails and all("no permission to write the output" in line for line in fails), fails
    assert "Stopped early (output folder is not writable)" in stdout, stdout
    assert 1 <= len(complete_h5s(out)) < 12
    again = _cli(_light_args(folder, out, plugin))
    assert again.returncode == 0, again.stderr[-2000:]
    assert len(complete_h5s(out)) == 12 and leftovers(out) == []
