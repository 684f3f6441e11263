"""Lock files and reuse decisions (upstream §2.6-2.7, plus stale-lock takeover and the geometry check)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from atlaspatch_stream.backends.bundle import Backends
from atlaspatch_stream.backends.h5store import SlideH5, inspect_h5
from atlaspatch_stream.config import PipelineConfig, PlanConfig, WriteConfig
from atlaspatch_stream.outputs import SlideAttrs
from atlaspatch_stream.sources import ledger


def _dead_pid() -> int:
    """The pid of a child that has exited and been reaped (so no process has it, barring reuse)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _write_lock(path: Path, pid: int, host: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"pid={pid},time=1700000000,slide=/x/s.svs,host={host}", encoding="utf-8")


# -- paths ----------------------------------------------------------------------------------------------------------


def test_paths_follow_upstream_layout(tmp_path: Path) -> None:
    """H5, lock, images and visualization live where upstream puts them (§2.1)."""
    assert ledger.h5_path(tmp_path, "s") == tmp_path / "patches" / "s.h5"
    assert ledger.lock_path(tmp_path, "s") == tmp_path / "patches" / "s.lock"
    assert ledger.images_dir(tmp_path, "s") == tmp_path / "images" / "s"
    assert ledger.visualization_dir(tmp_path) == tmp_path / "visualization"


# -- locks ----------------------------------------------------------------------------------------------------------


def test_lock_is_exclusive_and_carries_payload(tmp_path: Path) -> None:
    """The first acquire creates the file with pid/time/slide/host; a second acquire (this live pid) gets None."""
    path = ledger.lock_path(tmp_path, "s")
    lock = ledger.acquire_lock(path, "/data/s.svs", phase="features")
    assert lock is not None
    text = path.read_text(encoding="utf-8")
    assert text.startswith(f"pid={os.getpid()},time=")
    fields = dict(part.split("=", 1) for part in text.split(","))
    assert fields["slide"] == "/data/s.svs"
    assert fields["phase"] == "features"
    assert fields["host"] == ledger.HOST
    assert abs(int(fields["time"]) - __import__("time").time()) < 60
    assert ledger.acquire_lock(path, "/data/s.svs") is None
    lock.release()
    assert not path.exists()
    lock.release()  # idempotent
    again = ledger.acquire_lock(path, "/data/s.svs")
    assert again is not None
    again.release()


def test_stale_lock_of_dead_pid_on_this_host_is_taken_over(tmp_path: Path) -> None:
    """A lock left by a reaped child on this host is stale: acquire replaces it with our own payload."""
    path = ledger.lock_path(tmp_path, "s")
    _write_lock(path, _dead_pid(), ledger.HOST)
    assert ledger.lock_is_stale(path)
    lock = ledger.acquire_lock(path, "/x/s.svs")
    assert lock is not None
    assert path.read_text(encoding="utf-8").startswith(f"pid={os.getpid()},")
    lock.release()


def test_live_foreign_pid_is_respected(tmp_path: Path) -> None:
    """A lock held by a running process (a sleeping child) is not stale and is not taken."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        path = ledger.lock_path(tmp_path, "s")
        _write_lock(path, child.pid, ledger.HOST)
        assert not ledger.lock_is_stale(path)
        assert ledger.acquire_lock(path, "/x/s.svs") is None
        assert f"pid={child.pid}," in path.read_text(encoding="utf-8")
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize(
    "payload",
    [
        "pid={dead},time=1,slide=/x/s.svs,host=some-other-host",  # dead here, but maybe alive there
        "pid={dead},time=1,slide=/x/s.svs",  # an upstream lock: no host, liveness unknowable
        "garbage",
    ],
)
def test_locks_we_cannot_judge_are_respected(tmp_path: Path, payload: str) -> None:
    """Other hosts' locks, upstream's host-less locks and unreadable payloads are never taken over."""
    path = ledger.lock_path(tmp_path, "s")
    path.parent.mkdir(parents=True)
    path.write_text(payload.format(dead=_dead_pid()), encoding="utf-8")
    assert not ledger.lock_is_stale(path)
    assert ledger.acquire_lock(path, "/x/s.svs") is None


# -- reuse ----------------------------------------------------------------------------------------------------------


def _wanted(config: PipelineConfig) -> dict[str, object]:
    return Backends(config).settings_attrs()


def _our_file(tmp_path: Path, config: PipelineConfig, n: int, features: dict[str, int]) -> Path:
    """A file as this package writes it (with the settings attributes), with `features` name -> rows."""
    final = ledger.h5_path(tmp_path, "s")
    plan = config.plan
    attrs = SlideAttrs(plan.patch_size, plan.patch_size * 2, 40, plan.target_mag, max(0, plan.patch_size - plan.step),
                       1000, 1000, "/x/s.svs", "s.svs", extra=_wanted(config))
    coords = np.zeros((n, 5), np.int32)
    store = SlideH5.create(final, attrs, coords, "s", write_batch=16)
    store.finalize()
    with h5py.File(final, "a") as f:
        for name, rows in features.items():
            f.create_dataset(f"features/{name}", data=np.zeros((rows, 4), np.float32))
    return final


def _upstream_file(tmp_path: Path, n: int, patch_size: int = 256, target_mag: int = 20, overlap: int = 0,
                   features: dict[str, int] | None = None, num_attr: bool = True) -> Path:
    """A file as upstream writes it: only upstream's attributes, no fingerprint."""
    final = ledger.h5_path(tmp_path, "s")
    final.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(final, "w") as f:
        f.create_dataset("coords", data=np.zeros((n, 5), np.int32))
        f.attrs["patch_size"] = patch_size
        f.attrs["target_magnification"] = target_mag
        f.attrs["overlap"] = overlap
        f.attrs["level0_magnification"] = 40
        if num_attr:
            f.attrs["num_patches"] = n
        for name, rows in (features or {}).items():
            f.create_dataset(f"features/{name}", data=np.zeros((rows, 4), np.float32))
    return final


def test_absent_or_unreadable_file_is_new(tmp_path: Path) -> None:
    """No file, or a file h5py cannot read, means: process anew."""
    assert ledger.decide_reuse(None, ("a",), _wanted(PipelineConfig())).action == "new"
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    assert inspect_h5(bad) is None


def test_our_file_skip_reuse_and_partial(tmp_path: Path) -> None:
    """All encoders present -> skip; some missing -> reuse naming only those; a wrong-length set counts as missing."""
    config = PipelineConfig()
    path = _our_file(tmp_path, config, 5, {"a": 5, "B": 5, "c": 3})
    existing = inspect_h5(path)
    assert existing is not None and existing.num_patches == 5
    wanted = _wanted(config)
    assert ledger.decide_reuse(existing, ("a", "b"), wanted).action == "skip"  # names compared lowercased
    decision = ledger.decide_reuse(existing, ("a", "c", "d"), wanted)
    assert (decision.action, decision.missing, decision.num_patches) == ("reuse", ("c", "d"), 5)
    coords_only = ledger.decide_reuse(existing, (), wanted)  # segment-and-get-coords: the file exists
    assert (coords_only.action, coords_only.num_patches) == ("skip", 5)


def test_our_zero_patch_file_is_reused_not_resegmented(tmp_path: Path) -> None:
    """A zero-patch file we wrote (fingerprint present) with (0, D) sets is skipped; a missing set is reused."""
    config = PipelineConfig()
    existing = inspect_h5(_our_file(tmp_path, config, 0, {"a": 0}))
    assert ledger.decide_reuse(existing, ("a",), _wanted(config)).action == "skip"
    assert ledger.decide_reuse(existing, ("a", "b"), _wanted(config)).missing == ("b",)


def test_our_file_with_other_geometry_is_a_mismatch(tmp_path: Path) -> None:
    """A file made with another patch size fails reuse with a reason naming the setting and both values."""
    existing = inspect_h5(_our_file(tmp_path, PipelineConfig(plan=PlanConfig(patch_size=224)), 5, {"a": 5}))
    decision = ledger.decide_reuse(existing, ("a",), _wanted(PipelineConfig()))
    assert decision.action == "mismatch"
    assert "patch_size=224 (requested 256)" in decision.reason
    assert ledger.decide_reuse(existing, (), _wanted(PipelineConfig())).action == "mismatch"


def test_fingerprint_difference_without_named_setting_is_a_mismatch(tmp_path: Path) -> None:
    """With --no-fast-mode, another white threshold changes coordinates: the fingerprint alone must refuse reuse."""
    made = PipelineConfig(plan=PlanConfig(fast_mode=False, white_thresh=30))
    existing = inspect_h5(_our_file(tmp_path, made, 5, {"a": 5}))
    wanted = _wanted(PipelineConfig(plan=PlanConfig(fast_mode=False)))
    assert ledger.decide_reuse(existing, ("a",), wanted).action == "mismatch"
    same = _wanted(made)
    assert ledger.decide_reuse(existing, ("a",), same).action == "skip"


def test_output_folder_does_not_matter_for_reuse(tmp_path: Path) -> None:
    """Settings that do not shape outputs (the output folder) never cause a mismatch."""
    existing = inspect_h5(_our_file(tmp_path, PipelineConfig(), 5, {"a": 5}))
    wanted = _wanted(PipelineConfig(write=WriteConfig(output=Path("elsewhere"), write_batch=3)))
    assert ledger.decide_reuse(existing, ("a", "b"), wanted).action == "reuse"


def test_upstream_file_matching_geometry_is_reused(tmp_path: Path) -> None:
    """An upstream-made file (no fingerprint) with the requested patch size, mag and overlap is reused."""
    existing = inspect_h5(_upstream_file(tmp_path, 4, features={"uni_v1": 4}))
    decision = ledger.decide_reuse(existing, ("uni_v1", "resnet50"), _wanted(PipelineConfig()))
    assert (decision.action, decision.missing) == ("reuse", ("resnet50",))


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"patch_size": 512}, "patch_size=512"),
    ({"target_mag": 40}, "target_magnification=40"),
    ({"overlap": 64}, "overlap=64"),
])
def test_upstream_file_with_other_geometry_is_a_mismatch(tmp_path: Path, kwargs: dict[str, int], needle: str) -> None:
    """Upstream silently reuses coordinates of another geometry (§2.6); we refuse and say which setting differs."""
    existing = inspect_h5(_upstream_file(tmp_path, 4, **kwargs))
    decision = ledger.decide_reuse(existing, ("a",), _wanted(PipelineConfig()))
    assert decision.action == "mismatch"
    assert needle in decision.reason


def test_upstream_zero_patch_or_countless_file_is_reprocessed(tmp_path: Path) -> None:
    """As upstream: with encoders, a file with num_patches <= 0 is re-segmented; num_patches falls back to coords."""
    zero = inspect_h5(_upstream_file(tmp_path, 0))
    assert ledger.decide_reuse(zero, ("a",), _wanted(PipelineConfig())).action == "new"
    countless = inspect_h5(_upstream_file(tmp_path, 3, num_attr=False, features={"a": 3}))
    assert countless is not None and countless.num_patches == 3
    assert ledger.decide_reuse(countless, ("a",), _wanted(PipelineConfig())).action == "skip"
