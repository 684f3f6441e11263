"""Frozen message types that flow between stages.

Every item carries the `SlideJob` it belongs to; batch items carry `(slide_id, row)` per row so that the writer
places rows by index, never by arrival order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from .geometry import Geometry
    from .outputs import SlideAttrs
    from .protocols import SlideHandle


@dataclass(frozen=True)
class SlideJob:
    """One slide to process: where it is and what we know before opening it."""

    slide_id: int
    path: Path
    stem: str
    mpp_override: float | None = None
    display: str = ""
    pseudonym: str | None = None  # set when paths must not be recorded (the daemon's --pseudonymize)
    # A node-local copy to read pixels from (`--stage-dir`); `path` still names the slide everywhere else
    # (H5 attributes, locks, run report, reuse checks).
    read_path: Path | None = None

    @property
    def name(self) -> str:
        """The name used in messages: the path as the user gave it (or the pseudonym)."""
        return self.pseudonym or self.display or str(self.path)

    @property
    def recorded_path(self) -> str:
        """What outputs and reports record as the slide's path (`wsi_path`): the path, or its pseudonym."""
        return self.pseudonym or str(self.path)

    @property
    def recorded_filename(self) -> str:
        """What outputs record as `filename`: the file name, or the pseudonym."""
        return self.pseudonym or self.path.name


@dataclass(frozen=True)
class SlideInfo:
    """What a slide backend reports, after the metadata rules (upstream §7.2) are applied."""

    path: str
    backend: str
    width: int
    height: int
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float | None
    magnification: int | None
    vendor: str | None = None
    institution: str | None = None
    stain: str | None = None


@dataclass(frozen=True)
class Reuse:
    """An existing, matching H5 to which only missing encoders are added."""

    h5_path: Path
    num_patches: int
    missing: tuple[str, ...]


@dataclass(frozen=True)
class OpenedSlide:
    """A slide whose handle is open and whose lock is held."""

    job: SlideJob
    handle: SlideHandle
    reuse: Reuse | None = None


@dataclass(frozen=True)
class Thumbnail:
    """The segmentation-resolution thumbnail (upstream §3.2 steps 1-6), RGB uint8 (h, w, 3)."""

    slide: OpenedSlide
    image: np.ndarray | None  # None: nothing to segment (the slide reuses an existing output)


@dataclass(frozen=True)
class TissueMask:
    """A binary tissue mask at thumbnail resolution, bool (h, w); None for reused slides."""

    slide: OpenedSlide
    mask: np.ndarray | None
    thumbnail: np.ndarray | None = None  # the segmented thumbnail, carried only for `--qc` (saved by `plan`)


@dataclass(frozen=True)
class PatchPlan:
    """Coordinates of every patch of a slide, known before pixels are read."""

    slide: OpenedSlide
    geometry: Geometry | None
    coords: np.ndarray  # int32 (N, 5): x, y, read_w, read_h, level
    attrs: SlideAttrs | None = None  # for a new file; None when features are added to an existing one

    @property
    def num_patches(self) -> int:
        """N, the number of rows."""
        return int(self.coords.shape[0])


@dataclass(frozen=True)
class PatchBatch:
    """Decoded patches at `patch_size`, possibly from several slides: rows are addressed by (slide_id, row)."""

    slide_ids: np.ndarray  # int64 (B,)
    rows: np.ndarray  # int64 (B,)
    pixels: Any  # uint8 (B, P, P, 3): numpy, or a torch tensor on the feature device (the GPU path)
    read_seconds: float = 0.0
    encoders: frozenset[str] | None = None  # encoders these rows need (reused slides); None = all

    def __len__(self) -> int:
        return int(self.rows.shape[0])


@dataclass(frozen=True)
class Encoded:
    """What the encoders made of one batch: float32 (B, D) per encoder, and where a row holds NaN or Inf.

    `nonfinite` maps an encoder to a bool (B,) mask of its rows with a non-finite value; encoders whose rows are all
    finite are absent (the usual case: an empty dict). The mask is computed where the features are (on the device).
    """

    features: dict[str, np.ndarray]
    nonfinite: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class FeatureBatch:
    """Features of one `PatchBatch` from every requested encoder, float32 (B, D) each."""

    slide_ids: np.ndarray
    rows: np.ndarray
    features: dict[str, np.ndarray]
    encode_seconds: float = 0.0
    read_seconds: float = 0.0
    nonfinite: dict[str, np.ndarray] = field(default_factory=dict)  # as `Encoded.nonfinite`


@dataclass(frozen=True)
class SlideFailed:
    """A per-slide failure record: flows to the writer and the run report; the run goes on."""

    job: SlideJob
    stage: str
    message: str
    error: BaseException | None = None  # what raised (its class decides retries and run-level stops)


# What the writer receives: a plan opens a file, batches fill it, a failure drops it.
WriteItem = PatchPlan | PatchBatch | FeatureBatch | SlideFailed

Status = Literal["done", "reused", "skipped", "locked", "failed", "cancelled"]


@dataclass(frozen=True)
class SlideResult:
    """The final word on one slide."""

    job: SlideJob
    status: Status
    h5_path: Path | None = None
    num_patches: int | None = None
    message: str = ""
    features: tuple[str, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True unless the slide failed or was cancelled before finishing."""
        return self.status not in ("failed", "cancelled")
