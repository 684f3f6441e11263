"""`atlaspatch check`: each reason code on a real output folder broken on purpose, orphans, --json, --requeue."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import anyio
import h5py
import numpy as np
import orjson
import pytest
from click.testing import CliRunner

import atlaspatch_stream
from atlaspatch_stream import sync
from atlaspatch_stream.cli import cli
from atlaspatch_stream.qc.check import Expectations
from atlaspatch_stream.testing.synthetic import write_synthetic_slide

ARGS = ["--patch-size", "256", "--target-mag", "20", "--segmenter", "otsu", "--device", "cpu",
        "--feature-extractors", "color_stats"]
STEMS = ("s0", "s1", "s2")


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three synthetic slides processed once (otsu, color_stats): `slides/` and `out/` (copied by each test)."""
    root = tmp_path_factory.mktemp("made")
    for i, stem in enumerate(STEMS):
        write_synthetic_slide(root / "slides" / f"{stem}.svs", width=2048, height=1536, seed=i)
    done = CliRunner().invoke(cli, ["process", str(root / "slides"), "-o", str(root / "out"), *ARGS])
    assert done.exit_code == 0, done.output
    return root


@pytest.fixture
def run(made: Path, tmp_path: Path) -> Path:
    """A private copy of the processed slides and outputs; the H5s record the copy's slide paths."""
    shutil.copytree(made / "slides", tmp_path / "slides")
    shutil.copytree(made / "out", tmp_path / "out")
    for stem in STEMS:
        with h5py.File(tmp_path / "out" / "patches" / f"{stem}.h5", "a") as f:
            f.attrs["wsi_path"] = str(tmp_path / "slides" / f"{stem}.svs")
    return tmp_path


def _check(out: Path, *args: str) -> tuple[int, dict[str, dict], dict]:
    """`check OUT --json ARGS`: exit code, verdicts by file name, summary."""
    done = CliRunner().invoke(cli, ["check", str(out), "--json", *args], catch_exceptions=False)
    lines = [orjson.loads(line) for line in done.stdout.splitlines()]
    return done.exit_code, {Path(v["path"]).name: v for v in lines[:-1]}, lines[-1]["summary"]


def _h5(run: Path, stem: str) -> Path:
    return run / "out" / "patches" / f"{stem}.h5"


def test_a_fresh_run_is_all_ok_and_exits_0(run: Path) -> None:
    """Right after `process`: every file ok, nothing orphaned, exit 0; the table says so in one line."""
    code, verdicts, summary = _check(run / "out", "--patch-size", "256", "--target-mag", "20",
                                     "--feature-extractors", "color_stats", "--slides", str(run / "slides"))
    assert code == 0 and summary["by_code"] == {"ok": 3} and summary["orphans"] == {}
    assert all(v["num_patches"] > 0 for v in verdicts.values())
    table = CliRunner().invoke(cli, ["check", str(run / "out")], catch_exceptions=False)
    assert table.exit_code == 0 and "checked 3 file(s)" in table.stdout and "3 ok" in table.stdout


def _truncate(run: Path) -> None:
    path = _h5(run, "s0")
    os.truncate(path, path.stat().st_size // 2)


def _drop_filename(run: Path) -> None:
    with h5py.File(_h5(run, "s0"), "a") as f:
        del f.attrs["filename"]


def _drop_passports(run: Path) -> None:
    with h5py.File(_h5(run, "s0"), "a") as f:
        del f["passports"]


def _claim_more_rows(run: Path) -> None:
    with h5py.File(_h5(run, "s0"), "a") as f:
        f.attrs["num_patches"] = int(f.attrs["num_patches"]) + 5


def _coords_outside(run: Path) -> None:
    with h5py.File(_h5(run, "s0"), "a") as f:
        f["coords"][0, 0] = int(f.attrs["level0_width"]) + 10


def _nan_rows(run: Path) -> None:
    with h5py.File(_h5(run, "s0"), "a") as f:
        f["features/color_stats"][1:3] = np.nan


def _grow_slide(run: Path) -> None:
    with open(run / "slides" / "s0.svs", "ab") as slide:
        slide.write(b"\0" * 1024)


@pytest.mark.parametrize(("breakage", "code", "words"), [
    (_truncate, "corrupt", "truncated"),
    (_drop_passports, "schema", "missing dataset passports"),
    (_drop_filename, "schema", "missing attribute(s) filename"),
    (_claim_more_rows, "incomplete", "num_patches"),
    (_coords_outside, "coords_out_of_bounds", "outside"),
    (_nan_rows, "nonfinite_features", "2 of"),
    (_grow_slide, "slide_changed", "bytes"),
])
def test_each_breakage_gets_its_reason_code(run: Path, breakage, code: str, words: str) -> None:  # type: ignore[no-untyped-def]
    """Break s0 one way: its verdict has that reason code and says what is wrong; the other two stay ok; exit 1."""
    breakage(run)
    exit_code, verdicts, summary = _check(run / "out", "--slides", str(run / "slides"))
    assert exit_code == 1
    assert verdicts["s0.h5"]["code"] == code and words in verdicts["s0.h5"]["detail"], verdicts["s0.h5"]
    assert verdicts["s1.h5"]["code"] == verdicts["s2.h5"]["code"] == "ok"


def test_settings_and_encoders_asked_for_are_checked(run: Path) -> None:
    """Another --patch-size gives geometry_mismatch; an encoder the files lack gives missing_features."""
    code, verdicts, _ = _check(run / "out", "--patch-size", "512")
    assert code == 1 and {v["code"] for v in verdicts.values()} == {"geometry_mismatch"}
    assert "patch_size=256 (expected 512)" in verdicts["s1.h5"]["detail"]
    code, verdicts, _ = _check(run / "out", "--feature-extractors", "color_stats,resnet18")
    assert code == 1 and {v["code"] for v in verdicts.values()} == {"missing_features"}


def test_orphans_temp_files_stale_locks_and_gone_slides(run: Path) -> None:
    """A temporary H5 of a dead writer, an unreadable lock older than its grace, and a moved-away slide: all three
    are listed as orphans; the H5 whose slide is gone is still ok, the temp file and the lock are not."""
    patches = run / "out" / "patches"
    temp = patches / f".s1.h5.tmp.{'0' * 32}"
    shutil.copy(patches / "s1.h5", temp)
    lock = patches / "s9.lock"
    lock.write_bytes(b"garbage")
    old = time.time() - 3600
    os.utime(lock, (old, old))
    os.utime(temp, (old, old))
    (run / "slides" / "s2.svs").rename(run / "s2.svs")
    code, verdicts, summary = _check(run / "out")
    assert code == 1
    assert verdicts[temp.name]["code"] == "incomplete" and verdicts[temp.name]["orphan"] == "temp_file"
    assert verdicts["s9.lock"]["orphan"] == "stale_lock"
    assert verdicts["s2.h5"] == {**verdicts["s2.h5"], "code": "ok", "orphan": "slide_gone"}
    assert summary["orphans"] == {"temp_file": 1, "stale_lock": 1, "slide_gone": 1}


def test_requeue_deletes_what_process_would_skip_and_process_rebuilds_it(run: Path) -> None:
    """s0 gets NaN rows, s1 out-of-bounds coords (both files `process` would skip as finished): `check --requeue`
    deletes exactly those two, and the next `process` rebuilds them; then `check` exits 0."""
    _nan_rows(run)
    with h5py.File(_h5(run, "s1"), "a") as f:
        f["coords"][0, 1] = -4
    code, _, summary = _check(run / "out", "--requeue")
    assert code == 1 and summary["requeue"] == {"deleted": 2, "ledger_records": 0}
    assert sorted(p.name for p in (run / "out" / "patches").glob("*.h5")) == ["s2.h5"]
    again = CliRunner().invoke(cli, ["process", str(run / "slides"), "-o", str(run / "out"), *ARGS])
    assert again.exit_code == 0, again.output
    code, verdicts, _ = _check(run / "out")
    assert code == 0 and set(verdicts) == {"s0.h5", "s1.h5", "s2.h5"}


def test_requeue_marks_the_daemon_ledger_record_for_retry(made: Path, tmp_path: Path) -> None:
    """A folder served by `watch --once`: NaN rows in its H5, `check --requeue` deletes it and marks the ledger
    record for retry (`seen` again), so the daemon rebuilds it at its next scan."""
    inbox, out = tmp_path / "in", tmp_path / "out"
    inbox.mkdir()
    shutil.copy(made / "slides" / "s0.svs", inbox / "s0.svs")
    done = CliRunner().invoke(cli, ["watch", str(inbox), "-o", str(out), "--once", "--settle-s", "0", "--allow-root",
                                     *ARGS])
    assert done.exit_code == 0, done.output
    with h5py.File(out / "patches" / "s0.h5", "a") as f:
        f["features/color_stats"][0] = np.inf
    code, _, summary = _check(out, "--requeue")
    assert code == 1 and summary["requeue"] == {"deleted": 1, "ledger_records": 1}
    status = CliRunner().invoke(cli, ["status", str(out), "--json"], catch_exceptions=False)
    assert orjson.loads(status.stdout)["counts"].get("seen") == 1, status.stdout


def _upstream_h5(path: Path, n: int, level0: tuple[int, int] = (4096, 2048)) -> None:
    """An H5 as upstream writes it (§2): coords int32 (N, 5), passports S160, its root attributes only, a feature
    set without attributes."""
    with h5py.File(path, "w") as f:
        coords = np.array([[i * 512, 256, 512, 512, 0] for i in range(n)], dtype=np.int32).reshape(n, 5)
        f.create_dataset("coords", data=coords, maxshape=(None, 5))
        f.create_dataset("passports", data=np.array([b"p"] * n, dtype="S160"), maxshape=(None,))
        f.attrs.update({"patch_size": 256, "patch_size_level0": 512, "level0_magnification": 40,
                        "target_magnification": 20, "overlap": 0, "level0_width": level0[0],
                        "level0_height": level0[1], "wsi_path": "slides/up.svs", "passport_format": "{stem}",
                        "passport_version": 2, "creation_date": "2026-01-01T00:00:00+00:00", "filename": "up.svs",
                        "mpp": 0.25, "magnification": 40, "num_patches": n})
        f.create_dataset("features/resnet50", data=np.ones((n, 8), dtype=np.float32))


def test_an_upstream_h5_whose_slide_has_another_size_is_slide_changed(tmp_path: Path) -> None:
    """Upstream's files record no byte size: with the slide found (--slides), its level-0 size is read from the slide
    itself; a file made from a 2048x1536 slide passes, one recording 4096x2048 is `slide_changed`."""
    patches = tmp_path / "out" / "patches"
    patches.mkdir(parents=True)
    write_synthetic_slide(tmp_path / "slides" / "up.svs", width=2048, height=1536)
    _upstream_h5(patches / "same.h5", 2, (2048, 1536))
    _upstream_h5(patches / "other.h5", 2, (4096, 2048))
    code, verdicts, _ = _check(tmp_path / "out", "--slides", str(tmp_path / "slides"))
    assert code == 1 and verdicts["same.h5"]["code"] == "ok"
    assert verdicts["other.h5"]["code"] == "slide_changed" and "2048x1536, was 4096x2048" in verdicts["other.h5"][
        "detail"]


def test_an_h5_written_to_upstreams_schema_passes(tmp_path: Path) -> None:
    """A file as upstream writes it (`_upstream_h5`) is ok, as is a zero-patch one; their slide is gone."""
    patches = tmp_path / "out" / "patches"
    patches.mkdir(parents=True)
    _upstream_h5(patches / "up.h5", 4)
    _upstream_h5(patches / "empty.h5", 0)
    expect = Expectations(patch_size=256, target_mag=20, encoders=("resnet50",))
    verdicts = sync.check_outputs(tmp_path / "out", expect)
    assert sorted((v.stem, v.code, v.orphan) for v in verdicts) == [("empty", "ok", "slide_gone"),
                                                                   ("up", "ok", "slide_gone")]
    from_async = anyio.run(lambda: atlaspatch_stream.check_outputs(tmp_path / "out", expect))
    assert sorted(from_async, key=lambda v: v.stem) == sorted(verdicts, key=lambda v: v.stem)
