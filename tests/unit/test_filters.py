"""Black and white patch filters (upstream §4.5) on constructed patches, with real OpenCV colour conversions."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from atlaspatch_stream.backends.filters import keep_patches

PINK = (200, 120, 180)  # H&E-like: saturated, mid bright
NEAR_WHITE = (240, 240, 236)  # background glass: low saturation, V >= 200
BLACK = (10, 10, 10)


def _patch(fill: tuple[int, int, int], size: int = 10) -> np.ndarray:
    return np.full((size, size, 3), fill, dtype=np.uint8)


def _with_fraction(
    base: tuple[int, int, int], other: tuple[int, int, int], n_other: int, size: int = 10
) -> np.ndarray:
    """A size x size patch of `base` whose first `n_other` pixels (row-major) are `other`."""
    p = _patch(base, size).reshape(-1, 3)
    p[:n_other] = other
    return p.reshape(size, size, 3)


def _upstream_one(patch: np.ndarray, white_thresh: int, black_thresh: int) -> bool:
    """The per-patch rule as upstream states it: black test, then white test, each `np.mean(...) >= 0.7`."""
    gray = cv2.cvtColor(patch, cv2.COLOR_RGB2GRAY)
    if np.mean(gray < black_thresh) >= 0.7:
        return False
    hsv = cv2.cvtColor(patch, cv2.COLOR_RGB2HSV)
    return not np.mean((hsv[..., 1] < white_thresh) & (hsv[..., 2] >= 200)) >= 0.7


def test_plain_patches() -> None:
    """Tissue and mid-gray are kept; black and near-white glass are rejected."""
    batch = np.stack(
        [_patch(PINK), _patch((150, 150, 150)), _patch(BLACK), _patch(NEAR_WHITE), _patch((255, 255, 255))]
    )
    assert keep_patches(batch, 15, 50).tolist() == [True, True, False, False, False]


def test_seventy_percent_is_the_rejection_point() -> None:
    """On 100-pixel patches, 69 black (or white) pixels keep the patch and 70 reject it."""
    batch = np.stack(
        [
            _with_fraction(PINK, BLACK, 69),
            _with_fraction(PINK, BLACK, 70),
            _with_fraction(PINK, NEAR_WHITE, 69),
            _with_fraction(PINK, NEAR_WHITE, 70),
        ]
    )
    assert keep_patches(batch, 15, 50).tolist() == [True, False, True, False]


def test_thresholds_are_strict_below_and_value_at_least_200() -> None:
    """gray < black_thresh (49 black at 50, 50 not); S < white_thresh; V >= 200 counts as bright, 199 does not."""
    assert keep_patches(np.stack([_patch((49, 49, 49)), _patch((50, 50, 50))]), 15, 50).tolist() == [
        False,
        True,
    ]
    pale = (220, 210, 200)  # S = 255 * 20 / 220 = 23.2 -> 23 in OpenCV 8-bit HSV
    s = int(cv2.cvtColor(_patch(pale, 1), cv2.COLOR_RGB2HSV)[0, 0, 1])
    assert keep_patches(_patch(pale)[None], s, 50).tolist() == [True]  # S < S is false: not white
    assert keep_patches(_patch(pale)[None], s + 1, 50).tolist() == [False]
    dim = (199, 199, 199)
    bright = (200, 200, 200)
    assert keep_patches(np.stack([_patch(dim), _patch(bright)]), 15, 50).tolist() == [True, False]


def test_lower_white_thresh_rejects_fewer_patches() -> None:
    """Upstream's README has it backwards: a lower saturation threshold marks fewer pixels white."""
    pale = _patch((220, 210, 200))[None]
    assert keep_patches(pale, 5, 50).tolist() == [True]
    assert keep_patches(pale, 40, 50).tolist() == [False]


def test_batch_matches_per_patch_rule_on_random_patches() -> None:
    """Random mixtures of tissue, black, glass and noise at 32 px: the batched result equals a per-patch loop."""
    rng = np.random.default_rng(0)
    palette = np.array([PINK, BLACK, NEAR_WHITE, (150, 150, 150), (30, 60, 40)], dtype=np.uint8)
    batch = palette[rng.integers(0, len(palette), size=(64, 1, 1))].repeat(32, 1).repeat(32, 2)
    for i in range(64):
        k = int(rng.integers(0, 32 * 32))
        flat = batch[i].reshape(-1, 3)
        flat[:k] = palette[rng.integers(0, len(palette), size=k)]
        if i % 5 == 0:
            batch[i] = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    for white, black in ((15, 50), (30, 20), (5, 120)):
        expected = [_upstream_one(p, white, black) for p in batch]
        assert keep_patches(batch, white, black).tolist() == expected
        assert 0 < sum(expected) < len(expected)


def test_empty_batch_and_bad_input() -> None:
    """An empty batch gives an empty result; wrong shapes or dtypes are errors."""
    assert keep_patches(np.zeros((0, 8, 8, 3), np.uint8), 15, 50).shape == (0,)
    with pytest.raises(ValueError, match="RGB"):
        keep_patches(np.zeros((8, 8, 3), np.uint8), 15, 50)
    with pytest.raises(ValueError, match="uint8"):
        keep_patches(np.zeros((1, 8, 8, 3), np.float32), 15, 50)
