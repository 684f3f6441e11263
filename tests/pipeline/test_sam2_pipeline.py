"""SAM2 in the whole pipeline: random weights in the published format, found offline in an HF cache layout."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from atlaspatch_stream.config import load_config
from atlaspatch_stream.errors import WeightsError
from atlaspatch_stream.sync import process_slides
from atlaspatch_stream.testing.sam2_weights import install_in_hf_cache, write_random_sam2_checkpoint

from ..conftest import real_slide


@pytest.fixture(scope="module")
def sam2_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded random SAM2.1-tiny checkpoint, {"model": state_dict}, as the published model.pth."""
    return write_random_sam2_checkpoint(tmp_path_factory.mktemp("sam2") / "model.pth", seed=0)


def _config(out: Path, **segment: object):
    return load_config({
        "plan": {"patch_size": 256, "target_mag": 20},
        "segment": {"segmenter": "sam2", "device": "cpu", "seg_batch_size": 2, **segment},
        "write": {"output": out},
    }, environ={})


def test_sam2_from_hf_cache_on_real_slides(sam2_checkpoint: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """With HF_HUB_OFFLINE=1 and the checkpoint in an HF cache layout, segment-and-get-coords runs SAM2 on real
    slides of three formats; each H5 records the segmenter and the weights' sha256."""
    cache = tmp_path / "hf"
    install_in_hf_cache(sam2_checkpoint, cache)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    slides = [real_slide("aperio/CMU-1-Small-Region.svs"), real_slide("hamamatsu/test3-DAPI-2-387.ndpi"),
              real_slide("aperio/small-16x16.svs")]
    out = tmp_path / "out"
    summary = process_slides(slides, _config(out))
    assert summary.ok, [r.message for r in summary.failed]
    from atlaspatch_stream.backends.weights import sha256_file

    digest = sha256_file(sam2_checkpoint)
    for slide in slides:
        with h5py.File(out / "patches" / f"{slide.stem}.h5") as f:
            assert f.attrs["segmenter"] == "sam2"
            assert f.attrs["segmenter_sha256"] == digest
            assert f["coords"].dtype == np.int32


def test_sam2_local_weights_and_masks_match_direct_segmenter(sam2_checkpoint: Path, tmp_path: Path) -> None:
    """--seg-weights PATH: the pipeline's mask overlay equals the segmenter run directly on the same thumbnail."""
    from atlaspatch_stream.backends.segment_sam2 import Sam2Segmenter
    from atlaspatch_stream.backends.slides import open_slide
    from atlaspatch_stream.outputs.overlays import resize_mask_nearest

    slide = real_slide("aperio/CMU-1-Small-Region.svs")
    out = tmp_path / "out"
    summary = process_slides([slide], _config(out, seg_weights=sam2_checkpoint), mode="detect")
    assert summary.ok
    handle = open_slide(slide)
    seg = Sam2Segmenter("cpu", "float32", sam2_checkpoint)
    seg.warm_up()
    [mask] = seg.segment([handle.thumbnail(1.25, 1024, 512)])
    thumb = handle.overlay_thumbnail(1024)
    expected = resize_mask_nearest(mask, (thumb.shape[1], thumb.shape[0]))
    from PIL import Image

    written = np.asarray(Image.open(out / "visualization" / "CMU-1-Small-Region_mask_bw.png")) > 127
    np.testing.assert_array_equal(written, expected.astype(bool))


def test_offline_without_weights_fails_before_any_slide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No weights anywhere, offline: WeightsError naming the file and the remedies (--seg-weights, --segmenter otsu);
    no slide was opened, and no output folder or run report was created."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    out = tmp_path / "out"
    with pytest.raises(WeightsError) as info:
        process_slides([real_slide("aperio/small-16x16.svs")], _config(out))
    text = str(info.value)
    assert "model.pth" in text and "--seg-weights" in text and "AtlasAnalyticsLab/AtlasPatch" in text
    assert "--segmenter otsu" in text
    assert not out.exists()
    assert os.environ["HF_HUB_OFFLINE"] == "1"
