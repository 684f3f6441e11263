"""Frozen message types that flow between stages.

Every item carries the `SlideJob` it belongs to; batch items carry `(slide_id, row)` per row so that the writer
places rows by index, never by arrival order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, TypeAlias

import numpy as np

if TYPE_CHECKING:
    from .geometry import Geometry
    from .outputs import SlideAttrs
    from .protocols import SlideHandle


class DevicePixels(Protocol):
    """A torch tensor on the feature device, as the GPU path hands pixels on (the core never imports torch)."""

    @property
    def shape(self) -> tuple[int, ...]:
        """(B, P, P, 3)."""
        ...

    @property
    def device(self) -> object:
        """The tensor's device."""
        ...

    def __getitem__(self, index: slice) -> DevicePixels: ...

    def cpu(self) -> DevicePixels:
        """A copy on the host."""
        ...

    def numpy(self) -> np.ndarray:
        """The host tensor's data as numpy."""
        ...


# Decoded patches, uint8 (B, P, P, 3): host numpy, or a torch tensor on the feature device (the GPU path).
Pixels: TypeAlias = np.ndarray | DevicePixels


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
class ReuseDecision:
    """What to do with a slide whose output may already exist."""

    action: Literal["new", "skip", "reuse", "mismatch"]
    num_patches: int = 0
    missing: tuple[str, ...] = ()
    reason: str = ""
    source: SourceRecord | None = None  # what the existing file says it was made from


@dataclass(frozen=True)
class SourceRecord:
    """The slide an existing output file was made from, as its root attributes record it (`outputs.layout`)."""

    filename: str | None
    level0: tuple[int, int] | None

    def mismatch(self, filename: str, level0: tuple[int, int]) -> str | None:
        """Why the file was not made from a slide named `filename` of level-0 size `level0` (None when it was)."""
        if self.filename is not None and self.filename != filename:
            return f"it was made from {self.filename!r}"
        if self.level0 is not None and tuple(self.level0) != tuple(level0):
            w, h = self.level0
            return f"it was made from a slide of {w}x{h} pixels, this one is {level0[0]}x{level0[1]}"
        return None


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
    pixels: Pixels  # uint8 (B, P, P, 3)
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


# The output filesystem's failures (`errors.OutputError.kind`).
OutputKind = Literal["disk_full", "quota", "read_only", "permission", "output_missing", "output_io"]
FailureKind = Literal[
    OutputKind,
    "unreadable", "no_magnification", "no_tissue", "input_io",  # the slide, or reading it
    "reuse_refused", "collision", "locked",  # an existing output, a second slide with its name, another's lock
    "nonfinite",  # an encoder wrote NaN or Inf feature rows (and --allow-nonfinite was not given)
    "out_of_memory", "device", "worker_lost", "incomplete", "bug",
]
RetryClass = Literal["slide", "transient", "system"]


@dataclass(frozen=True)
class Failure:
    """Why a slide failed, typed once where the exception is caught (`errors.failure_of`); pickles across Ray.

    Attributes:
        stage: the step it failed in (open, segment, plan, read, encode, write, reuse, discover, worker, check).
        kind: what went wrong (one vocabulary for reports, the daemon's ledger and the Ray driver).
        retry: `slide` (the slide's own fault: a charged attempt), `transient` (retry later, uncharged) or `system`
            (the output or the device is the problem: later slides would fail the same way).
        errno: the OS error number behind it, when there is one.
    """

    stage: str
    kind: FailureKind
    retry: RetryClass
    errno: int | None = None

    @property
    def systemic(self) -> bool:
        """True when the cause is the run's output or device, not this slide (`process` stops intake on it)."""
        return self.retry == "system"


@dataclass(frozen=True)
class SlideFailed:
    """A per-slide failure record: flows to the writer and the run report; the run goes on."""

    job: SlideJob
    failure: Failure
    message: str


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
    failure: Failure | None = None  # set for `failed` results
    attempts: int = 1  # tries it took (the Ray engine retries slides whose worker died)
    notes: dict[str, object] = field(default_factory=dict)  # facts for the run report only (decode routes...)


@dataclass(frozen=True)
class Totals:
    """Running totals of final results: slides by status, patches, throughput."""

    finished: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    patches: int = 0
    patches_per_s: float = 0.0
    elapsed_s: float = 0.0


@dataclass(frozen=True)
class EdgeStatistics:
    """One bounded stream between two stages: items buffered, capacity, and the bytes an item may hold."""

    used: int
    size: int
    bytes_per_item: int

    @property
    def fill(self) -> float:
        """The share of the stream in use, 0..1."""
        return self.used / max(1, self.size)


@dataclass(frozen=True)
class EngineStatistics:
    """What an engine (the local pipeline, the Ray pool) reports about itself at one moment.

    Attributes:
        state: starting, running, draining, closed or failed.
        totals: final results so far.
        in_flight: slides started and not yet finished.
        submitted: jobs handed to the engine.
        stopped: why intake stopped, if it did.
        streams: the local pipeline's streams by name (empty for engines without them).
    """

    state: str
    totals: Totals
    in_flight: int = 0
    submitted: int = 0
    stopped: str | None = None
    streams: dict[str, EdgeStatistics] = field(default_factory=dict)
