"""Whole-pipeline scenarios with the real backends: synthetic and real slides, otsu, real encoders (random weights)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from atlaspatch_stream.config import load_config
from atlaspatch_stream.sync import process_slides
from atlaspatch_stream.testing.synthetic import write_synthetic_slide

from ..conftest import real_slide


def _config(out: Path, extractors: tuple[str, ...] = (), weights: dict[str, Path] | None = None, **plan: object):
    return load_config({
        "plan": {"patch_size": 224, "target_mag": 20, **plan},
        "segment": {"segmenter": "otsu", "device": "cpu"},
        "encode": {"extractors": extractors, "device": "cpu", "precision": "float32", "batch_size": 8,
                   "weights": tuple((weights or {}).items())},
        "read": {"reader_threads": 2, "chunk_patches": 16},
        "write": {"output": out},
    }, environ={})


@pytest.fixture(scope="module")
def resnet18_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded random resnet18 state dict in torchvision's key names."""
    import torchvision

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def two_slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two small synthetic 40× slides (JPEG RGB as Aperio writes it, and YCbCr)."""
    folder = tmp_path_factory.mktemp("slides")
    write_synthetic_slide(folder / "a.svs", width=3072, height=2048, seed=3)
    write_synthetic_slide(folder / "b.svs", width=2048, height=2048, seed=4, compression="jpeg_ycbcr")
    return folder


def _features(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path) as f:
        return {name: f["features"][name][...] for name in f["features"]}


def test_process_two_encoders_equals_per_patch_reference(two_slides: Path, resnet18_weights: Path,
                                                         tmp_path: Path) -> None:
    """process with resnet18 + color_stats: upstream schema; features equal the encoder run on each patch alone,
    from pixels read with tiffslide.read_region (cross-slide batching and tile-once reading change nothing)."""
    import tiffslide

    from atlaspatch_stream.backends.encoders.registry import build_registry

    out = tmp_path / "out"
    cfg = _config(out, ("resnet18", "color_stats"), {"resnet18": resnet18_weights})
    summary = process_slides([two_slides], cfg)
    assert summary.ok and summary.count("done") == 2
    registry = build_registry(device="cpu", precision="float32", weights={"resnet18": resnet18_weights},
                              plugins=(), num_workers=1)
    encoders = {n: registry.create(n) for n in ("resnet18", "color_stats")}
    for stem in ("a", "b"):
        path = out / "patches" / f"{stem}.h5"
        with h5py.File(path) as f:
            coords = f["coords"][...]
            assert f["features/resnet18"].shape == (len(coords), 512)
            assert f["features/resnet18"].dtype == np.float32
            assert set(f["features"]) == {"resnet18", "color_stats"}
        feats = _features(path)
        slide = tiffslide.TiffSlide(two_slides / f"{stem}.svs")
        pick = np.linspace(0, len(coords) - 1, num=min(4, len(coords))).astype(int)
        for row in pick:
            x, y, rw, rh, lv = coords[row].tolist()
            patch = np.asarray(slide.read_region((x, y), lv, (rw, rh)).convert("RGB"))
            if rw != 224:
                import cv2

                patch = cv2.resize(patch, (224, 224))
            for name, enc in encoders.items():
                ref = enc.encode(patch[None])[0]
                np.testing.assert_allclose(feats[name][row], ref, rtol=1e-4, atol=1e-4)


def test_two_encoders_in_one_run_equal_separate_runs_and_reuse_adds_missing(
    two_slides: Path, resnet18_weights: Path, tmp_path: Path
) -> None:
    """Separate runs (color_stats, then resnet18 added by reuse) give the same features as one run with both."""
    both, split = tmp_path / "both", tmp_path / "split"
    weights = {"resnet18": resnet18_weights}
    assert process_slides([two_slides], _config(both, ("resnet18", "color_stats"), weights)).ok
    first = process_slides([two_slides], _config(split, ("color_stats",), weights))
    assert first.ok and first.count("done") == 2
    before = _features(split / "patches" / "a.h5")["color_stats"]
    second = process_slides([two_slides], _config(split, ("color_stats", "resnet18"), weights))
    assert second.ok and second.count("reused") == 2
    for stem in ("a", "b"):
        one, two = _features(both / "patches" / f"{stem}.h5"), _features(split / "patches" / f"{stem}.h5")
        for name in ("resnet18", "color_stats"):
            np.testing.assert_allclose(one[name], two[name], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(before, _features(split / "patches" / "a.h5")["color_stats"])
    third = process_slides([two_slides], _config(split, ("color_stats", "resnet18"), weights))
    assert third.count("skipped") == 2


def test_corrupt_tile_fails_only_its_slide(two_slides: Path, tmp_path: Path) -> None:
    """errors/unreadable.svs next to good slides: it fails with one line, the others complete."""
    import shutil

    folder = tmp_path / "in"
    shutil.copytree(two_slides, folder)
    shutil.copy(real_slide("errors/unreadable.svs"), folder / "unreadable.svs")
    out = tmp_path / "out"
    summary = process_slides([folder], _config(out, ("color_stats",)))
    assert summary.count("done") == 2
    [failed] = summary.failed
    assert "unreadable.svs" in failed.message and "\n" not in failed.message
    assert not (out / "patches" / "unreadable.h5").exists()
    assert not list((out / "patches").glob(".*tmp*"))


def test_real_cmu_slide_process(tmp_path: Path) -> None:
    """The real Aperio slide end to end with color_stats: coordinates, features row-aligned, passports."""
    slide = real_slide("aperio/CMU-1-Small-Region.svs")
    out = tmp_path / "out"
    summary = process_slides([slide], _config(out, ("color_stats",), patch_size=256))
    assert summary.ok
    with h5py.File(out / "patches" / "CMU-1-Small-Region.h5") as f:
        n = f.attrs["num_patches"]
        assert n > 0 and f["features/color_stats"].shape[0] == n
        assert f["passports"].dtype == np.dtype("S160")
        assert f["passports"][0].decode().startswith("CMU-1-Small-Region__x")
        assert f.attrs["level0_magnification"] == 20 and f.attrs["patch_size_level0"] == 256
