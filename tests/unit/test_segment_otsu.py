"""The weight-free Otsu segmenter: finds drawn tissue, leaves glass and black areas out, fails per image."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from atlaspatch_stream.backends.segment_otsu import OtsuSegmenter, otsu_tissue_mask
from atlaspatch_stream.errors import ConfigError, SlideError
from atlaspatch_stream.protocols import Segmenter
from tests.conftest import real_slide


def _drawn_slide(seed: int = 0, height: int = 300, width: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """A glass-white thumbnail with two H&E-pink blobs, a black unscanned strip and sensor noise; returns (rgb, truth)."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((height, width), np.uint8)
    cv2.ellipse(truth, (110, 150), (70, 100), 20, 0, 360, 1, -1)
    cv2.circle(truth, (290, 120), 60, 1, -1)
    rgb = np.empty((height, width, 3), np.uint8)
    rgb[:] = (236, 234, 238)
    rgb[truth == 1] = (205, 120, 175)
    noise = rng.integers(-12, 13, rgb.shape)
    rgb = np.clip(rgb.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    rgb[:, width - 30 :] = 0  # transparent, unscanned area: exactly black in upstream's thumbnail
    return rgb, truth.astype(bool)


def test_finds_drawn_tissue_and_not_background() -> None:
    """Draw two tissue blobs on noisy glass with a black strip, segment: the blobs are tissue, glass and black are not."""
    rgb, truth = _drawn_slide()
    mask = OtsuSegmenter().segment([rgb])[0]
    assert isinstance(mask, np.ndarray) and mask.dtype == bool and mask.shape == truth.shape
    inner = cv2.erode(truth.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
    outer = ~cv2.dilate(truth.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
    assert mask[inner].mean() > 0.99
    assert mask[outer].mean() < 0.01
    assert not mask[:, -30:].any()


def test_blank_glass_is_empty_and_result_is_deterministic() -> None:
    """Segment a thumbnail of plain noisy glass twice: the saturation floor keeps it empty, and runs agree."""
    rng = np.random.default_rng(3)
    glass = np.clip(235 + rng.integers(-4, 5, (120, 160, 3)), 0, 255).astype(np.uint8)
    first = otsu_tissue_mask(glass)
    assert not first.any()
    rgb, _ = _drawn_slide(seed=5)
    assert np.array_equal(otsu_tissue_mask(rgb), otsu_tissue_mask(rgb.copy()))


def test_close_bridges_a_thin_gap() -> None:
    """A tissue band cut by a 2-px glass line: with `close` the cut is bridged, with close=0 it stays open."""
    rgb, _ = _drawn_slide()
    rgb[:, :] = (236, 234, 238)
    rgb[100:200, 50:350] = (205, 120, 175)
    rgb[100:200, 199:201] = (236, 234, 238)
    bridged = otsu_tissue_mask(rgb, median=1, close=5)
    cut = otsu_tissue_mask(rgb, median=1, close=0)
    assert bridged[150, 199:201].all()
    assert not cut[150, 199:201].any()


def test_a_bad_thumbnail_fails_alone() -> None:
    """Segment [empty, float, good]: the first two slots hold SlideErrors, the good one its mask."""
    rgb, truth = _drawn_slide()
    results = OtsuSegmenter().segment([np.zeros((0, 0, 3), np.uint8), rgb.astype(np.float32), rgb])
    assert isinstance(results[0], SlideError) and "non-empty" in str(results[0])
    assert isinstance(results[1], SlideError) and "uint8" in str(results[1])
    assert isinstance(results[2], np.ndarray) and results[2][truth].mean() > 0.95


def test_protocol_and_settings_validation() -> None:
    """The segmenter has the protocol's surface; even median kernels and negative close are config errors."""
    segmenter: Segmenter = OtsuSegmenter(median=5, close=0, min_saturation=20)
    segmenter.warm_up()
    assert segmenter.name == "otsu" and segmenter.weights_sha256 is None
    segmenter.close()
    with pytest.raises(ConfigError):
        OtsuSegmenter(median=4)
    with pytest.raises(ConfigError):
        OtsuSegmenter(close=-1)


def test_real_slide_tissue_versus_white() -> None:
    """CMU-1-Small-Region (real H&E) at 1/4 size: clear white glass pixels are background, most stained pixels tissue."""
    import tiffslide
    from PIL import Image

    path = real_slide("aperio/CMU-1-Small-Region.svs")
    with tiffslide.TiffSlide(path) as slide:
        width, height = slide.dimensions
        rgb = np.asarray(slide.read_region((0, 0), 0, (width, height)).convert("RGB"))
    thumb = np.asarray(Image.fromarray(rgb).resize((width // 4, height // 4), Image.BILINEAR))
    mask = otsu_tissue_mask(thumb)
    saturation = cv2.cvtColor(thumb, cv2.COLOR_RGB2HSV)[:, :, 1]
    white = (thumb.min(axis=2) > 225) & (saturation < 10)
    stained = saturation > 80
    assert white.any() and stained.any()
    assert mask[white].mean() < 0.05
    assert mask[stained].mean() > 0.95
