"""Output layout and reuse decisions (upstream §2.1, §2.6, plus the geometry check)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from atlaspatch_stream import outputs
from atlaspatch_stream.assembly import RealBackends
from atlaspatch_stream.config import PipelineConfig, PlanConfig, WriteConfig
from atlaspatch_stream.outputs import SlideAttrs
from atlaspatch_stream.outputs.h5store import SlideH5, inspect_h5

# -- paths ----------------------------------------------------------------------------------------------------------


def test_paths_follow_upstream_layout(tmp_path: Path) -> None:
    """H5, lock, images and visualization live where upstream puts them (§2.1)."""
    assert outputs.h5_path(tmp_path, "s") == tmp_path / "patches" / "s.h5"
    assert outputs.lock_path(tmp_path, "s") == tmp_path / "patches" / "s.lock"
    assert outputs.images_dir(tmp_path, "s") == tmp_path / "images" / "s"
    assert outputs.visualization_dir(tmp_path) == tmp_path / "visualization"



# -- reuse ----------------------------------------------------------------------------------------------------------


def _wanted(config: PipelineConfig) -> dict[str, object]:
    return RealBackends(config).settings.attrs()


def _our_file(tmp_path: Path, config: PipelineConfig, n: int, features: dict[str, int]) -> Path:
    """A file as this package writes it (with the settings attributes), with `features` name -> rows."""
    final = outputs.h5_path(tmp_path, "s")
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
    final = outputs.h5_path(tmp_path, "s")
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
    assert outputs.decide_reuse(None, ("a",), _wanted(PipelineConfig())).action == "new"
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
    assert outputs.decide_reuse(existing, ("a", "b"), wanted).action == "skip"  # names compared lowercased
    decision = outputs.decide_reuse(existing, ("a", "c", "d"), wanted)
    assert (decision.action, decision.missing, decision.num_patches) == ("reuse", ("c", "d"), 5)
    coords_only = outputs.decide_reuse(existing, (), wanted)  # segment-and-get-coords: the file exists
    assert (coords_only.action, coords_only.num_patches) == ("skip", 5)


def test_our_zero_patch_file_is_reused_not_resegmented(tmp_path: Path) -> None:
    """A zero-patch file we wrote (fingerprint present) with (0, D) sets is skipped; a missing set is reused."""
    config = PipelineConfig()
    existing = inspect_h5(_our_file(tmp_path, config, 0, {"a": 0}))
    assert outputs.decide_reuse(existing, ("a",), _wanted(config)).action == "skip"
    assert outputs.decide_reuse(existing, ("a", "b"), _wanted(config)).missing == ("b",)


def test_our_file_with_other_geometry_is_a_mismatch(tmp_path: Path) -> None:
    """A file made with another patch size fails reuse with a reason naming the setting and both values."""
    existing = inspect_h5(_our_file(tmp_path, PipelineConfig(plan=PlanConfig(patch_size=224)), 5, {"a": 5}))
    decision = outputs.decide_reuse(existing, ("a",), _wanted(PipelineConfig()))
    assert decision.action == "mismatch"
    assert "patch_size=224 (requested 256)" in decision.reason
    assert outputs.decide_reuse(existing, (), _wanted(PipelineConfig())).action == "mismatch"


def test_fingerprint_difference_without_named_setting_is_a_mismatch(tmp_path: Path) -> None:
    """With --no-fast-mode, another white threshold changes coordinates: the fingerprint alone must refuse reuse."""
    made = PipelineConfig(plan=PlanConfig(fast_mode=False, white_thresh=30))
    existing = inspect_h5(_our_file(tmp_path, made, 5, {"a": 5}))
    wanted = _wanted(PipelineConfig(plan=PlanConfig(fast_mode=False)))
    assert outputs.decide_reuse(existing, ("a",), wanted).action == "mismatch"
    same = _wanted(made)
    assert outputs.decide_reuse(existing, ("a",), same).action == "skip"


def test_output_folder_does_not_matter_for_reuse(tmp_path: Path) -> None:
    """Settings that do not shape outputs (the output folder) never cause a mismatch."""
    existing = inspect_h5(_our_file(tmp_path, PipelineConfig(), 5, {"a": 5}))
    wanted = _wanted(PipelineConfig(write=WriteConfig(output=Path("elsewhere"), write_batch=3)))
    assert outputs.decide_reuse(existing, ("a", "b"), wanted).action == "reuse"


def test_upstream_file_matching_geometry_is_reused(tmp_path: Path) -> None:
    """An upstream-made file (no fingerprint) with the requested patch size, mag and overlap is reused."""
    existing = inspect_h5(_upstream_file(tmp_path, 4, features={"uni_v1": 4}))
    decision = outputs.decide_reuse(existing, ("uni_v1", "resnet50"), _wanted(PipelineConfig()))
    assert (decision.action, decision.missing) == ("reuse", ("resnet50",))


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"patch_size": 512}, "patch_size=512"),
    ({"target_mag": 40}, "target_magnification=40"),
    ({"overlap": 64}, "overlap=64"),
])
def test_upstream_file_with_other_geometry_is_a_mismatch(tmp_path: Path, kwargs: dict[str, int], needle: str) -> None:
    """Upstream silently reuses coordinates of another geometry (§2.6); we refuse and say which setting differs."""
    existing = inspect_h5(_upstream_file(tmp_path, 4, **kwargs))
    decision = outputs.decide_reuse(existing, ("a",), _wanted(PipelineConfig()))
    assert decision.action == "mismatch"
    assert needle in decision.reason


def test_upstream_zero_patch_or_countless_file_is_reprocessed(tmp_path: Path) -> None:
    """As upstream: with encoders, a file with num_patches <= 0 is re-segmented; num_patches falls back to coords."""
    zero = inspect_h5(_upstream_file(tmp_path, 0))
    assert outputs.decide_reuse(zero, ("a",), _wanted(PipelineConfig())).action == "new"
    countless = inspect_h5(_upstream_file(tmp_path, 3, num_attr=False, features={"a": 3}))
    assert countless is not None and countless.num_patches == 3
    assert outputs.decide_reuse(countless, ("a",), _wanted(PipelineConfig())).action == "skip"
