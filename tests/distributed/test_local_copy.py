"""`--stage-dir`: slides copied to local disk before they are read and deleted after, within a byte budget, the
copy of the next slide overlapping the processing of this one, while every name keeps the original path."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import pytest
from click.testing import CliRunner

from atlaspatch_stream import api, sync
from atlaspatch_stream.assembly import RealBackends
from atlaspatch_stream.cli import cli
from atlaspatch_stream.items import SlideJob
from atlaspatch_stream.outputs import claims
from atlaspatch_stream.sources import local_copy as staging
from atlaspatch_stream.sources.local_copy import (
    CopyOptions,
    LocalCopier,
    free_to_take,
    slide_bytes,
    slide_files,
)
from atlaspatch_stream.sources.shard_source import ShardSource
from atlaspatch_stream.sources.shards import split_shard
from tests.distributed.common import COUNT, PROCESS, assert_same_outputs, config, slide_events
from tests.helpers import leftovers


def _staged_run(slides: Path, out: Path, stage: CopyOptions) -> tuple[api.RunSummary, dict, list[Path]]:
    """Process `slides` through a shard source that copies each slide; returns the summary, the copier's statistics and every path the
    slide backend was asked to open."""
    cfg = config(out)
    backends = RealBackends(cfg)
    opened: list[Path] = []
    real_open = backends.slides.open_slide

    def recording_open(job: SlideJob):  # a thin wrapper: which file is really opened
        opened.append(job.read_path or job.path)
        return real_open(job)

    backends.slides.open_slide = recording_open  # type: ignore[method-assign]
    jobs = api.make_jobs([slides], cfg)
    with LocalCopier(stage) as copier:
        source = ShardSource(split_shard(jobs, None, {}), out, True, copier=copier)
        summary = sync.run(lambda: api.process_slides(source, cfg, backends=backends))
        stats = copier.statistics()
        assert list(copier.folder.iterdir()) == []  # every copy deleted once its slide was done
    assert not copier.folder.exists()
    return summary, stats, opened


def test_staged_slides_are_read_from_the_copy_and_named_by_the_original(slides: Path, reference: Path,
                                                                        tmp_path: Path) -> None:
    """Every slide staged with room for all: each is opened from its copy under the stage folder, several copies
    exist at once (the next is copied while this one is processed), and the H5s equal an unstaged run's, with
    `wsi_path`, `filename` and the run report naming the original slide; nothing is left in the stage folder."""
    out, stage_root = tmp_path / "out", tmp_path / "local"
    summary, stats, opened = _staged_run(slides, out, CopyOptions(stage_root, max_gb=10))
    assert summary.ok and summary.count("done") == COUNT
    assert stats["staged"] == COUNT and stats["peak_slides"] >= 2 and stats["used_bytes"] == 0
    assert len(opened) == COUNT and all(stage_root in p.parents for p in opened)
    assert_same_outputs(out, reference)
    for path in (out / "patches").glob("*.h5"):
        with h5py.File(path) as f:
            assert f.attrs["wsi_path"] == str(slides / f"{path.stem}.svs")
            assert f.attrs["filename"] == f"{path.stem}.svs"
    assert sorted(e["slide"] for e in slide_events(out)) == sorted(str(p) for p in slides.glob("*.svs"))
    assert list(stage_root.iterdir()) == [] and leftovers(out) == []


def test_the_budget_bounds_what_is_staged_at_once(slides: Path, reference: Path, tmp_path: Path) -> None:
    """A budget that holds one slide but not two: never more than one copy at once, never more bytes than the
    budget, and every slide still done with the same outputs."""
    biggest = max(slide_bytes(p) for p in slides.glob("*.svs"))
    out = tmp_path / "out"
    summary, stats, _ = _staged_run(slides, out, CopyOptions(tmp_path / "local", max_gb=biggest * 1.5 / 1e9))
    assert summary.ok and stats["staged"] == COUNT
    assert stats["peak_slides"] == 1 and stats["peak_bytes"] <= biggest * 1.5
    assert_same_outputs(out, reference)


def _job(path: Path, slide_id: int = 0) -> SlideJob:
    return SlideJob(slide_id, path, path.stem)


def test_a_copy_waits_for_room_and_close_releases_waiters(slides: Path, tmp_path: Path) -> None:
    """With room for one slide, staging a second waits until the first is released; a third waiting when the copier
    closes gives up and is read in place."""
    paths = sorted(slides.glob("*.svs"))
    with LocalCopier(CopyOptions(tmp_path / "local", max_gb=max(map(slide_bytes, paths)) * 1.2 / 1e9)) as copier:
        first = copier.copy(_job(paths[0], 0))
        assert first.read_path is not None and first.read_path.read_bytes() == paths[0].read_bytes()
        done: list[SlideJob] = []
        waiter = threading.Thread(target=lambda: done.append(copier.copy(_job(paths[1], 1))))
        waiter.start()
        time.sleep(0.3)
        assert done == []
        copier.release(first)
        waiter.join(5)
        assert done and done[0].read_path is not None and not first.read_path.exists()
        third: list[SlideJob] = []
        blocked = threading.Thread(target=lambda: third.append(copier.copy(_job(paths[2], 2))))
        blocked.start()
        time.sleep(0.3)
        copier.close()
        blocked.join(5)
        assert third and third[0].read_path is None
    assert not copier.folder.exists()


def test_multi_file_slides_are_staged_whole(tmp_path: Path) -> None:
    """An MRXS slide is staged with its data folder beside it, a DICOM series folder with all its files; a VMS slide
    (its image files are named inside it) is read in place."""
    mrxs = tmp_path / "in" / "case.mrxs"
    (mrxs.parent / "case").mkdir(parents=True)
    mrxs.write_bytes(b"mrxs")
    (mrxs.parent / "case" / "Slidedat.ini").write_text("[GENERAL]\n")
    (mrxs.parent / "case" / "Data0000.dat").write_bytes(b"\0" * 1000)
    dicom = tmp_path / "in" / "series"
    dicom.mkdir()
    for i in range(3):
        (dicom / f"{i}.dcm").write_bytes(bytes([i]) * 100)
    vms = tmp_path / "in" / "h.vms"
    vms.write_text("[Virtual Microscope Specimen]\n")
    assert [str(rel) for _, rel in slide_files(mrxs)] == ["case.mrxs", "case/Data0000.dat", "case/Slidedat.ini"]
    assert slide_bytes(dicom) == 300 and slide_files(vms) is None
    with LocalCopier(CopyOptions(tmp_path / "local")) as copier:
        staged = copier.copy(_job(mrxs))
        assert staged.read_path is not None and staged.read_path.name == "case.mrxs"
        assert (staged.read_path.parent / "case" / "Data0000.dat").stat().st_size == 1000
        series = copier.copy(_job(dicom, 1))
        assert series.read_path is not None and sorted(p.name for p in series.read_path.iterdir()) == [
            "0.dcm", "1.dcm", "2.dcm"]
        assert copier.copy(_job(vms, 2)).read_path is None
        assert copier.statistics()["in_place"] == 1


def test_no_room_on_the_local_disk_reads_in_place(slides: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """When the local disk cannot hold the copy and its reserve, the slide is read where it is, with a warning,
    and its room in the budget is given back."""
    monkeypatch.setattr(staging, "RESERVE", 1 << 62)
    path = sorted(slides.glob("*.svs"))[0]
    with LocalCopier(CopyOptions(tmp_path / "local")) as copier:
        assert copier.copy(_job(path)).read_path is None
        assert copier.statistics()["used_bytes"] == 0
    assert "read in place" in caplog.text and "GB free" in caplog.text


def test_a_killed_stager_s_folder_is_removed_by_the_next(tmp_path: Path) -> None:
    """A process that stops without closing its copier (as under kill -9) leaves its folder; the next copier on this
    host removes it, and leaves alone the folder of a copier that still runs."""
    root = tmp_path / "local"
    code = ("import os, sys; from pathlib import Path\n"
            "from atlaspatch_stream.sources.local_copy import CopyOptions, LocalCopier\n"
            "s = LocalCopier(CopyOptions(Path(sys.argv[1]))); (s.folder / 'partial.svs').write_bytes(b'x'); "
            "print(s.folder); os._exit(0)")
    left = Path(subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, check=True,
                               timeout=60).stdout.strip())
    assert left.exists()
    with LocalCopier(CopyOptions(root)) as live, LocalCopier(CopyOptions(root)) as other:
        assert not left.exists() and live.folder.exists() and other.folder.exists()


def test_done_or_taken_slides_are_not_worth_staging(slides: Path, tmp_path: Path) -> None:
    """A slide whose H5 exists (with --skip-existing) or whose claim a live process holds is not copied."""
    path = sorted(slides.glob("*.svs"))[0]
    job, out = _job(path), tmp_path / "out"
    assert free_to_take(job, out, True)
    claim = claims.try_claim(out / "patches" / f"{job.stem}.lock", slide=str(path))
    assert claim is not None and not free_to_take(job, out, True)
    claim.release()
    (out / "patches" / f"{job.stem}.h5").write_bytes(b"")
    assert not free_to_take(job, out, True) and free_to_take(job, out, False)


def test_stage_dir_from_the_command_line(slides: Path, reference: Path, tmp_path: Path) -> None:
    """`process --stage-dir DIR --stage-max-gb G`: every slide done, outputs as without staging, DIR left empty."""
    out, local = tmp_path / "out", tmp_path / "local"
    result = CliRunner().invoke(cli, ["process", str(slides), "-o", str(out), *PROCESS, "--stage-dir", str(local),
                                      "--stage-max-gb", "1"])
    assert result.exit_code == 0, result.output
    assert_same_outputs(out, reference)
    assert list(local.iterdir()) == []


def test_stage_options_reject_a_zero_budget(tmp_path: Path) -> None:
    """A budget must be positive."""
    with pytest.raises(ValueError, match="stage-max-gb"):
        CopyOptions(tmp_path, max_gb=0)
    assert dataclasses.replace(CopyOptions(tmp_path), max_gb=2).max_bytes == 2_000_000_000
