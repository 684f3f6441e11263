"""SAM2 segmenter: batched masks equal SAM2ImagePredictor's image by image; weights from HF cache or a local file.

The model (SAM2.1 Hiera-T, seeded random weights) is built once per module; each 1024² forward costs seconds on CPU,
so the tests share two thumbnails and the masks computed for them.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from atlaspatch_stream.backends import segment_sam2
from atlaspatch_stream.backends.devices import resolve_device
from atlaspatch_stream.backends.segment_sam2 import (
    SAM2_OFFICIAL_SHA256,
    Sam2Segmenter,
    build_sam2_model,
    check_sam2_weights,
    resolve_sam2_weights,
)
from atlaspatch_stream.backends.weights import find_hf_file, hf_cache_dir
from atlaspatch_stream.errors import ConfigError, SlideError, WeightsError
from atlaspatch_stream.testing.sam2_weights import install_in_hf_cache, write_random_sam2_checkpoint
from tests.conftest import real_slide

# Captured at import, before the autouse fixture points the caches at empty folders: the user's real HF cache.
REAL_HF_CACHE = hf_cache_dir()


@dataclass
class Sam2Setup:
    checkpoint: Path
    segmenter: Sam2Segmenter
    thumbnails: list[np.ndarray]
    batched: list[np.ndarray | Exception]


def _thumbnails() -> list[np.ndarray]:
    """Two thumbnails of different shapes (one at the 1024 cap) with drawn tissue on noisy glass."""
    rng = np.random.default_rng(7)
    images = []
    for height, width in [(300, 500), (1024, 700)]:
        rgb = np.full((height, width, 3), 238, np.uint8)
        rgb[height // 5 : height * 3 // 4, width // 6 : width * 2 // 3] = (200, 110, 170)
        rgb = np.clip(rgb.astype(np.int16) + rng.integers(-25, 26, rgb.shape), 0, 255).astype(np.uint8)
        images.append(rgb)
    return images


@pytest.fixture(scope="module")
def sam2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sam2Setup]:
    """A random checkpoint installed in a temporary HF cache; the segmenter warms up from it offline (batch size 2)."""
    root = tmp_path_factory.mktemp("sam2")
    checkpoint = write_random_sam2_checkpoint(root / "random" / "model.pth", seed=0)
    cache = root / "hf" / "hub"
    install_in_hf_cache(checkpoint, cache)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_HUB_CACHE", str(cache))
        segmenter = Sam2Segmenter(device="cpu", batch_size=2)
        segmenter.warm_up()
    thumbnails = _thumbnails()
    batched = segmenter.segment(thumbnails)
    yield Sam2Setup(checkpoint, segmenter, thumbnails, batched)
    segmenter.close()


def _predictor_mask(model: torch.nn.Module, thumbnail: np.ndarray) -> np.ndarray:
    """Upstream's recipe with sam2's own SAM2ImagePredictor, one image: squash, full box, single mask, NEAREST back."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    predictor = SAM2ImagePredictor(model, mask_threshold=0.0)
    predictor.set_image(Image.fromarray(thumbnail).resize((1024, 1024), Image.BILINEAR))
    masks, _, _ = predictor.predict(box=np.array([0, 0, 1024, 1024]), multimask_output=False)
    height, width = thumbnail.shape[:2]
    back = Image.fromarray((masks[0] > 0.5).astype(np.uint8) * 255).resize((width, height), Image.NEAREST)
    return np.asarray(back) > 127


def test_batched_masks_equal_sam2_image_predictor(sam2: Sam2Setup) -> None:
    """Segment two thumbnails in one batch, then each with SAM2ImagePredictor: every mask is identical."""
    for thumbnail, mask in zip(sam2.thumbnails, sam2.batched, strict=True):
        assert isinstance(mask, np.ndarray) and mask.dtype == bool and mask.shape == thumbnail.shape[:2]
        # Random weights still give a non-trivial mask, so equality says something.
        assert 0.01 < mask.mean() < 0.99
        assert np.array_equal(mask, _predictor_mask(sam2.segmenter.model, thumbnail))


def test_batched_masks_equal_one_at_a_time(sam2: Sam2Setup) -> None:
    """Segment the second thumbnail alone (a batch of one): the mask equals its slot in the batch of two."""
    alone = sam2.segmenter.segment([sam2.thumbnails[1]])
    assert len(alone) == 1 and np.array_equal(alone[0], sam2.batched[1])


def test_a_bad_thumbnail_fails_alone(sam2: Sam2Setup) -> None:
    """Segment [empty image, good thumbnail, float image]: two SlideErrors, and the good mask equals the batched one."""
    good = sam2.thumbnails[0]
    results = sam2.segmenter.segment([np.zeros((0, 0, 3), np.uint8), good, good.astype(np.float32)])
    assert isinstance(results[0], SlideError) and "non-empty" in str(results[0])
    assert isinstance(results[2], SlideError) and "uint8" in str(results[2])
    assert np.array_equal(results[1], sam2.batched[0])


def test_a_failing_inference_is_retried_per_image(sam2: Sam2Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inject a device failure for batches holding a 'poison' image: the batch is retried per image, only it fails."""
    segmenter = sam2.segmenter
    original = segmenter._infer
    poison = np.full((64, 64, 3), 77, np.uint8)

    def flaky(batch: np.ndarray) -> np.ndarray:
        if (batch == 77).all(axis=(1, 2, 3)).any():
            raise RuntimeError("simulated device failure")
        return original(batch)

    monkeypatch.setattr(segmenter, "_infer", flaky)
    results = segmenter.segment([sam2.thumbnails[0], poison])
    assert np.array_equal(results[0], sam2.batched[0])
    assert isinstance(results[1], SlideError) and "simulated device failure" in str(results[1])


def test_weights_found_in_offline_hf_cache_and_hash_recorded(sam2: Sam2Setup) -> None:
    """The fixture warmed up with no explicit weights, offline: it used the cached file and recorded its sha256."""
    expected = hashlib.sha256(sam2.checkpoint.read_bytes()).hexdigest()
    assert sam2.segmenter.weights_sha256 == expected
    assert sam2.segmenter.weights_path is not None and "models--AtlasAnalyticsLab--AtlasPatch" in str(
        sam2.segmenter.weights_path
    )


def test_weights_from_a_local_file(sam2: Sam2Setup) -> None:
    """With an empty HF cache, an explicit checkpoint resolves to itself and loads strictly into the same weights."""
    assert find_hf_file("AtlasAnalyticsLab/AtlasPatch", "model.pth") is None
    assert resolve_sam2_weights(sam2.checkpoint) == sam2.checkpoint
    model = build_sam2_model(sam2.checkpoint, torch.device("cpu"))
    reference = sam2.segmenter.model.state_dict()
    loaded = model.state_dict()
    assert loaded.keys() == reference.keys()
    assert all(torch.equal(loaded[key], reference[key].cpu()) for key in reference)


def test_weights_cached_under_another_letter_case(
    sam2: Sam2Setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cache the checkpoint as `atlasanalyticslab/atlaspatch` (another tool's spelling) only: offline, warm_up finds
    it in that folder, loads it and records its sha256."""
    installed = install_in_hf_cache(sam2.checkpoint, tmp_path / "hub", "atlasanalyticslab/atlaspatch")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    segmenter = Sam2Segmenter(device="cpu")
    try:
        segmenter.warm_up()
        assert segmenter.weights_path == installed
        assert segmenter.weights_sha256 == sam2.segmenter.weights_sha256
    finally:
        segmenter.close()


def test_offline_missing_weights_error_text() -> None:
    """Offline with an empty cache: warm_up raises WeightsError naming model.pth, the cache and both remedies."""
    with pytest.raises(WeightsError) as info:
        Sam2Segmenter(device="cpu").warm_up()
    text = str(info.value)
    for part in (
        "model.pth",
        "AtlasAnalyticsLab/AtlasPatch",
        str(hf_cache_dir()),
        "network",
        "--seg-weights PATH",
    ):
        assert part in text
    with pytest.raises(WeightsError, match="no such file"):
        resolve_sam2_weights(Path("/nonexistent/model.pth"))


def test_a_file_that_is_not_a_checkpoint_is_a_weights_error(tmp_path: Path) -> None:
    """A checkpoint without a 'model' dict, and one with wrong keys, both give WeightsError naming the file."""
    wrong_format = tmp_path / "plain.pth"
    torch.save({"state_dict": {}}, wrong_format)
    with pytest.raises(WeightsError, match="plain.pth"):
        build_sam2_model(wrong_format, torch.device("cpu"))
    wrong_keys = tmp_path / "keys.pth"
    torch.save({"model": {"not.a.weight": torch.zeros(1)}}, wrong_keys)
    with pytest.raises(WeightsError, match="do not fit"):
        build_sam2_model(wrong_keys, torch.device("cpu"))


def test_non_official_weights_warn(
    sam2: Sam2Setup, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Check the random checkpoint: a warning names it and the official hash; declared official, it is silent."""
    with caplog.at_level(logging.WARNING, logger="atlaspatch_stream"):
        digest = check_sam2_weights(sam2.checkpoint)
    assert digest == sam2.segmenter.weights_sha256
    assert any(
        str(sam2.checkpoint) in r.message and SAM2_OFFICIAL_SHA256 in r.message for r in caplog.records
    )
    caplog.clear()
    monkeypatch.setattr(segment_sam2, "SAM2_OFFICIAL_SHA256", digest)
    with caplog.at_level(logging.WARNING, logger="atlaspatch_stream"):
        check_sam2_weights(sam2.checkpoint)
    assert not caplog.records


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA fallback")
def test_device_strings_without_cuda(caplog: pytest.LogCaptureFixture) -> None:
    """'cuda' without CUDA falls back to CPU with a warning; 'cuda:0' and nonsense are config errors."""
    with caplog.at_level(logging.WARNING, logger="atlaspatch_stream"):
        assert resolve_device("cuda", "segmentation") == torch.device("cpu")
    assert any("CUDA" in r.message for r in caplog.records)
    with pytest.raises(ConfigError, match="cuda:0"):
        resolve_device("cuda:0", "segmentation")
    with pytest.raises(ConfigError):
        resolve_device("warp-drive", "segmentation")
    with pytest.raises(ConfigError):
        Sam2Segmenter(precision="int8")


def test_bfloat16_autocast_gives_close_masks(sam2: Sam2Setup) -> None:
    """Switch the loaded segmenter to bfloat16: masks keep their shape and agree with float32 on most pixels."""
    segmenter = sam2.segmenter
    segmenter.precision = "bfloat16"
    try:
        mask = segmenter.segment([sam2.thumbnails[0]])[0]
    finally:
        segmenter.precision = "float32"
    assert isinstance(mask, np.ndarray) and mask.shape == sam2.batched[0].shape
    assert (mask == sam2.batched[0]).mean() > 0.9


def _official_weights() -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache("AtlasAnalyticsLab/AtlasPatch", "model.pth", cache_dir=str(REAL_HF_CACHE))
    return Path(found) if isinstance(found, str) else None


def test_official_weights_from_the_real_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only when the user's HF cache holds the official model.pth: no warning, official hash, predictor-equal masks."""
    official = _official_weights()
    if official is None:
        pytest.skip("official AtlasPatch model.pth not in the user's Hugging Face cache")
    monkeypatch.setenv("HF_HUB_CACHE", str(REAL_HF_CACHE))
    import tiffslide

    with tiffslide.TiffSlide(real_slide("aperio/CMU-1-Small-Region.svs")) as slide:
        thumbnail = np.asarray(slide.get_thumbnail((1024, 1024)).convert("RGB"))
    segmenter = Sam2Segmenter(device="cpu")
    segmenter.warm_up()
    try:
        assert segmenter.weights_sha256 == SAM2_OFFICIAL_SHA256
        mask = segmenter.segment([thumbnail])[0]
        assert np.array_equal(mask, _predictor_mask(segmenter.model, thumbnail))
        assert 0.05 < mask.mean() < 1.0
    finally:
        segmenter.close()


def test_device_failures_are_told_apart_from_per_slide_ones() -> None:
    """Out of memory at batch size 1 and CUDA errors stop the run; other inference errors fail the slide alone."""
    import torch

    from atlaspatch_stream.backends.segment_sam2 import _is_device_failure

    assert _is_device_failure(torch.cuda.OutOfMemoryError("out of memory"))
    assert _is_device_failure(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not _is_device_failure(ValueError("bad thumbnail"))
    assert not _is_device_failure(RuntimeError("shape mismatch"))
