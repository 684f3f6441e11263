"""What every segmenter accepts: a non-empty RGB uint8 thumbnail."""

from __future__ import annotations

import numpy as np

from ..errors import SlideError


def check_thumbnail(thumbnail: np.ndarray) -> None:
    """Refuse anything but a non-empty RGB uint8 (h, w, 3) image (SlideError: the slide fails alone)."""
    if not isinstance(thumbnail, np.ndarray) or thumbnail.dtype != np.uint8:
        kind = getattr(thumbnail, "dtype", type(thumbnail).__name__)
        raise SlideError(f"segmentation thumbnail must be a uint8 array, got {kind}")
    if thumbnail.ndim != 3 or thumbnail.shape[2] != 3 or thumbnail.shape[0] == 0 or thumbnail.shape[1] == 0:
        raise SlideError(
            f"segmentation thumbnail must be a non-empty (h, w, 3) RGB image, got {thumbnail.shape}"
        )
