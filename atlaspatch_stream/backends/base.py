"""Protocols every backend implements. Backends are blocking; stages call them in worker threads."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..items import SlideInfo


@runtime_checkable
class SlideHandle(Protocol):
    """An open slide. Methods are blocking and may be called from several threads at once."""

    info: SlideInfo

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 (height, width, 3) of a region whose top-left is (x, y) in level-0 pixels.

        Pixels equal the library's `read_region(...).convert("RGB")`: outside the slide and transparent -> black.
        Raises SlideError on a corrupt tile.
        """
        ...

    def thumbnail(self, power: float, max_size: int, budget_mb: int) -> np.ndarray:
        """Upstream's segmentation thumbnail (§3.2 steps 1-6), RGB uint8, without holding more than `budget_mb`."""
        ...

    def overlay_thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """An aspect-preserving thumbnail on a white background (OpenSlide `get_thumbnail`), for overlays."""
        ...

    def close(self) -> None:
        """Release file handles."""
        ...


class Segmenter(Protocol):
    """A tissue segmenter working on batches of thumbnails."""

    name: str
    weights_sha256: str | None

    def warm_up(self) -> None:
        """Load models and check weights (before the stage reports ready)."""
        ...

    def segment(self, thumbnails: Sequence[np.ndarray]) -> list[np.ndarray | Exception]:
        """One bool mask (h, w) per RGB thumbnail (h, w, 3); a per-image failure is returned, not raised."""
        ...

    def close(self) -> None:
        """Free device memory."""
        ...


class PatchReader(Protocol):
    """Reads the pixels of planned patches, resized to `patch_size` as upstream does (cv2 INTER_LINEAR)."""

    def iter_patches(
        self, handle: SlideHandle, coords: np.ndarray, patch_size: int, chunk: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (row indices int64 (b,), pixels uint8 (b, patch_size, patch_size, 3)) covering every row once."""
        ...


class Encoder(Protocol):
    """A loaded patch encoder ready to run on decoded batches."""

    name: str
    dim: int

    def warm_up(self) -> None:
        """Load weights, move to the device and run one dummy batch."""
        ...

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (B, P, P, 3) RGB -> float32 (B, dim), preprocessing done on the encoder's device."""
        ...

    def close(self) -> None:
        """Free device memory."""
        ...


@runtime_checkable
class DeviceEncoder(Protocol):
    """An `Encoder` that also takes pixels already on its device (the GPU path: no host round trip).

    `encode` keeps working on numpy batches; callers holding a torch batch on `device` use `encode_device`.
    """

    name: str
    dim: int
    device: str
    fixed_batch: bool  # True when the model is compiled for one batch shape: pass full batches, pad the tail

    def encode_device(self, pixels: Any) -> Any:
        """uint8 (B, P, P, 3) torch tensor -> float32 (B, dim) torch tensor on `device`, queued on the current stream.

        Nothing waits for the work: the caller orders it with CUDA events.
        """
        ...
