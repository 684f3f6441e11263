"""Weight-free tissue segmenter: Otsu's threshold on HSV saturation.

Stained tissue is coloured; glass, background and unscanned (black) areas are grey, so saturation separates them
without any model. Per RGB uint8 thumbnail (h, w, 3):

1. saturation = the S channel of OpenCV's RGB->HSV (0..255);
2. median blur with an odd kernel of `median` pixels (1 = none), to remove dust and JPEG speckle;
3. Otsu's threshold on the blurred saturation, floored at `min_saturation`, so a blank thumbnail (constant
   saturation, where Otsu returns 0) gives an empty mask instead of "everything is tissue";
4. tissue = saturation > threshold;
5. morphological close with an elliptical kernel of `close` pixels (0 = none), to bridge small gaps in tissue.

It is deterministic (no randomness, no weights) and fast (milliseconds per 1024-px thumbnail), so the pipeline can
run anywhere. Pure black (upstream's transparent areas) has saturation 0 and is background, but *noisy* near-black
pixels are highly saturated in HSV and can count as tissue. It is not upstream's segmenter: masks differ from SAM2's, and `weights_sha256` is None.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from ..errors import ConfigError, SlideError, describe
from .thumbnails import check_thumbnail


def otsu_tissue_mask(
    thumbnail: np.ndarray, median: int = 7, close: int = 5, min_saturation: int = 8
) -> np.ndarray:
    """The bool (h, w) tissue mask of one RGB uint8 thumbnail (steps in the module docstring).

    Raises:
        SlideError: not a non-empty (h, w, 3) uint8 image.
    """
    check_thumbnail(thumbnail)
    saturation = cv2.cvtColor(np.ascontiguousarray(thumbnail), cv2.COLOR_RGB2HSV)[:, :, 1]
    if median > 1:
        saturation = cv2.medianBlur(saturation, median)
    otsu, _ = cv2.threshold(saturation, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    mask = (saturation > max(float(otsu), float(min_saturation))).astype(np.uint8)
    if close > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (close, close))
        return np.asarray(cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel)).astype(bool)
    return mask.astype(bool)



class OtsuSegmenter:
    """Saturation + Otsu tissue segmentation (implements `protocols.Segmenter`)."""

    name = "otsu"
    weights_sha256: str | None = None

    def __init__(self, median: int = 7, close: int = 5, min_saturation: int = 8) -> None:
        """Args: median blur kernel (odd, >= 1), close kernel (>= 0, 0 = none), saturation floor (0..255)."""
        if median < 1 or median % 2 == 0:
            raise ConfigError("otsu_median must be a positive odd number")
        if close < 0:
            raise ConfigError("otsu_close must be >= 0")
        if not 0 <= min_saturation <= 255:
            raise ConfigError("otsu_min_saturation must be within 0..255")
        self.median = median
        self.close_kernel = close
        self.min_saturation = min_saturation

    def warm_up(self) -> None:
        """Nothing to load."""

    def segment(self, thumbnails: Sequence[np.ndarray]) -> list[np.ndarray | Exception]:
        """One bool (h, w) mask per RGB uint8 thumbnail; a failing thumbnail's slot holds its SlideError."""
        return [self._one(thumbnail) for thumbnail in thumbnails]

    def _one(self, thumbnail: np.ndarray) -> np.ndarray | Exception:
        try:
            return otsu_tissue_mask(thumbnail, self.median, self.close_kernel, self.min_saturation)
        except SlideError as exc:
            return exc
        except Exception as exc:  # a cv2 error on odd input stays confined to its slide
            return SlideError(f"segmentation failed: {describe(exc)}")

    def close(self) -> None:
        """Nothing to free."""
