"""Black and white patch filters of upstream's `--no-fast-mode` (§4.5), for a whole batch at once.

Upstream converts each patch with OpenCV (`COLOR_RGB2GRAY`, `COLOR_RGB2HSV`, 8-bit) and rejects it when at least
70% of its pixels are dark (gray < black_thresh) or pale and bright (S < white_thresh and V >= 200). The batch is
converted in one OpenCV call by stacking its patches vertically, which gives the same pixels as per-patch calls
because both conversions are per pixel.
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["keep_patches", "REJECT_FRACTION", "WHITE_MIN_VALUE"]

REJECT_FRACTION = 0.7  # a patch is rejected when at least this fraction of its pixels are black (or white)
WHITE_MIN_VALUE = 200  # HSV V from which a low-saturation pixel counts as white


def keep_patches(pixels: np.ndarray, white_thresh: int, black_thresh: int) -> np.ndarray:
    """Which patches pass upstream's black filter and then its white filter.

    Args:
        pixels: uint8 (B, P, P, 3) RGB patches at `patch_size`.
        white_thresh: Saturation below which a bright pixel (V >= 200) is white.
        black_thresh: Gray level below which a pixel is black.

    Returns:
        bool (B,): True for patches to keep.
    """
    batch = _as_batch(pixels)
    if batch.shape[0] == 0:
        return np.zeros(0, dtype=bool)
    return ~_is_black(batch, black_thresh) & ~_is_white(batch, white_thresh)


def _as_batch(pixels: np.ndarray) -> np.ndarray:
    """Validate the batch shape and make it C-contiguous uint8 for OpenCV."""
    arr = np.asarray(pixels)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"patches must be (B, P, P, 3) RGB, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"patches must be uint8, got {arr.dtype}")
    return np.ascontiguousarray(arr)


def _stacked(batch: np.ndarray) -> np.ndarray:
    """The batch as one tall image (B*P, P, 3), a view when contiguous."""
    b, h, w, _ = batch.shape
    return batch.reshape(b * h, w, 3)


def _fraction(flags: np.ndarray, batch_size: int) -> np.ndarray:
    """Per-patch fraction of True pixels (float64, as `np.mean` of a bool patch)."""
    per_patch = flags.reshape(batch_size, -1)
    return per_patch.sum(axis=1) / per_patch.shape[1]


def _is_black(batch: np.ndarray, black_thresh: int) -> np.ndarray:
    """Upstream's `is_black_patch`: gray (COLOR_RGB2GRAY) < black_thresh on >= 70% of the pixels."""
    gray = cv2.cvtColor(_stacked(batch), cv2.COLOR_RGB2GRAY)
    return _fraction(gray < black_thresh, batch.shape[0]) >= REJECT_FRACTION


def _is_white(batch: np.ndarray, white_thresh: int) -> np.ndarray:
    """Upstream's `is_white_patch`: S < white_thresh and V >= 200 (COLOR_RGB2HSV) on >= 70% of the pixels."""
    hsv = cv2.cvtColor(_stacked(batch), cv2.COLOR_RGB2HSV)
    pale = (hsv[..., 1] < white_thresh) & (hsv[..., 2] >= WHITE_MIN_VALUE)
    return _fraction(pale, batch.shape[0]) >= REJECT_FRACTION
