"""The contract between stages and backends: one Protocol per kind of backend, and the `Backends` bundle.

Stages call these blocking methods in worker threads, each under a limiter of the pipeline's own. The real
implementations live in `backends/` and `outputs/`, composed by `assembly.RealBackends`; `testing.fakes` implements
the same Protocols with small deterministic stand-ins (tests/conformance checks both alike). This module is part of
the pure core: it imports no backend module (one type, for type checking only) and names no `Any`.

Errors: a problem confined to one slide is raised as `SlideError` with its `slide` set; an output I/O failure as
`OutputError`; anything of `errors.BUG_TYPES` is a bug and stops the run.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from .backends.tiles import TilePageMeta
    from .geometry import Contours
    from .items import (
        DevicePixels,
        Encoded,
        OpenedSlide,
        PatchPlan,
        Pixels,
        ReuseDecision,
        SlideInfo,
        SlideJob,
    )


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


@dataclass(frozen=True)
class DecodedTiles:
    """The result of one `TileDecoder.decode_batch` call.

    Attributes:
        pixels: One uint8 (h, w, 3) array per input tile, in input order: numpy on the CPU, torch on CUDA.
        ready: A CUDA event recorded after the work that produced `pixels` (None on the CPU); a consumer on another
            stream waits on it before reading the pixels.
    """

    pixels: Sequence[Pixels]
    ready: object | None = None


class TileDecoder(Protocol):
    """Decodes batches of tiles of one pyramid level (`backends.decoders`: cpu, dali, nvimgcodec).

    Thread-safe: the readers of several slides share one decoder. `meta` describes the level's tiles.

    Attributes:
        name: "cpu", "dali" or "nvimgcodec".
        device: Where decoded pixels live: "cpu" or "cuda:N".
        batch_size: Tiles per `decode_batch` call the reader should aim for (1: one call per tile).
    """

    name: str
    device: str
    batch_size: int

    def warm_up(self) -> None:
        """Build pipelines or decoder objects and run the start-up colour probes (idempotent)."""
        ...

    def unsupported(self, meta: TilePageMeta) -> str | None:
        """Why this decoder cannot decode the level's tiles exactly (the reader then uses `cpu`), or None."""
        ...

    def decode_batch(self, raws: Sequence[bytes], meta: TilePageMeta) -> DecodedTiles:
        """Decode stored tiles of the level. Raises on a corrupt tile (the reader then isolates it)."""
        ...

    def statistics(self) -> Mapping[str, object]:
        """Counters: tiles and batches decoded, seconds spent."""
        ...

    def close(self) -> None:
        """Release pipelines, decoders and device memory pools."""
        ...


class PatchReader(Protocol):
    """Reads the pixels of planned patches, resized to `patch_size` as upstream does (cv2 INTER_LINEAR)."""

    def iter_patches(
        self, handle: SlideHandle, coords: np.ndarray, patch_size: int, chunk: int
    ) -> Iterator[tuple[np.ndarray, Pixels]]:
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
class PrecisionReporting(Protocol):
    """An `Encoder` that says what its forward pass runs in (the built-in ones do; a plugin's own need not)."""

    @property
    def precision_ran(self) -> str:
        """In words, once warmed up: "float32", "bfloat16 autocast (float16 requested; ...)", "exact (weight-free)"."""
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

    def encode_device(self, pixels: DevicePixels) -> DevicePixels:
        """uint8 (B, P, P, 3) torch tensor -> float32 (B, dim) torch tensor on `device`, queued on the current stream.

        Nothing waits for the work: the caller orders it with CUDA events.
        """
        ...


@dataclass(frozen=True)
class SlideInputs:
    """What a slide or patient encoder reads of one slide's H5: its patch features and geometry.

    Attributes:
        h5_path: The slide's H5 (complete, final).
        wsi_path: The slide the H5 was made from (its `wsi_path` attribute).
        features: float32 (N, D): `features/<patch encoder>`.
        coords: int64 (N, 2): level-0 x, y of each patch.
        patch_size: Patch edge at the target magnification.
        patch_size_level0: Patch edge in level-0 pixels.
        target_magnification: The magnification the patches were cut at.
    """

    h5_path: Path
    wsi_path: str
    features: np.ndarray
    coords: np.ndarray
    patch_size: int
    patch_size_level0: int
    target_magnification: int

    @property
    def num_patches(self) -> int:
        """N, the number of patches."""
        return int(self.features.shape[0])


@dataclass(frozen=True)
class Embedding:
    """One slide or patient embedding: float32 (D,) and attributes of ours to record beside upstream's."""

    vector: np.ndarray
    attrs: Mapping[str, object]


class SlideEncoder(Protocol):
    """A slide (or patient) encoder: the patch features of one slide, or of a case's slides, -> one vector."""

    name: str
    patch_encoder: str  # whose features it reads: `features/<patch_encoder>`
    dim: int

    def warm_up(self) -> None:
        """Load the model onto the feature device (before any slide)."""
        ...

    def encode(self, slides: Sequence[SlideInputs]) -> Embedding:
        """One slide (a one-item sequence) or one case's slides, in order -> float32 (dim,)."""
        ...

    def close(self) -> None:
        """Free device memory."""
        ...


class SlideEmbedder(Protocol):
    """The blocking work of stage `embed`: slide embeddings into finished slide H5s."""

    def warm_up(self) -> None:
        """Load every slide encoder onto the feature device."""
        ...

    def claim(self, job: SlideJob) -> Lock | None:
        """Take the slide's lock for the embedding (phase `slide-embedding`); None when another process holds it."""
        ...

    def embed(self, h5_path: Path) -> tuple[str, ...]:
        """Write each slide encoder's `slide_features/<name>` unless a current one exists; the names written.

        Raises SlideError (the slide's inputs are unusable) or OutputError (the write failed).
        """
        ...

    def close(self) -> None:
        """Free device memory."""
        ...


class EncoderSet(Protocol):
    """Every requested encoder, run together on each decoded batch (each batch is decoded once for all).

    Batches are `submit`ted and their features `collect`ed in order; up to `depth` may be in flight at once (1 on
    the CPU, where `submit` does the work; more on CUDA, where each encoder runs on its own stream and `collect`
    waits on events). Both calls block: stages make them in worker threads.
    """

    @property
    def names(self) -> tuple[str, ...]:
        """Encoder names, in the order requested."""
        ...

    @property
    def dims(self) -> Mapping[str, int]:
        """Declared output width of each encoder (for the (0, D) datasets of slides without patches)."""
        ...

    @property
    def depth(self) -> int:
        """Batches that may be in flight between `submit` and `collect`."""
        ...

    @property
    def precision_ran(self) -> Mapping[str, str]:
        """What each encoder's forward pass runs in, in words (`PrecisionReporting`), once warmed up."""
        ...

    def warm_up(self) -> None:
        """Load every model (weights, device, one dummy batch)."""
        ...

    def submit(self, pixels: Pixels, names: frozenset[str] | None) -> object:
        """Start encoding uint8 (B, P, P, 3) pixels (numpy, or torch on the device) with the encoders in `names`
        (None: all); returns the ticket to `collect`."""
        ...

    def collect(self, ticket: object) -> Encoded:
        """float32 (B, D) per encoder of a submitted batch and its non-finite rows, counted on the device (waits)."""
        ...

    def close(self) -> None:
        """Free device memory."""
        ...


class Lock(Protocol):
    """A held per-slide lock (a claim on the output filesystem); `release()` is idempotent."""

    def heartbeat(self) -> bool:
        """Refresh the lock's age; False once it was lost (taken over by another process)."""
        ...

    def release(self) -> None:
        """Give the lock up (never removing a lock that is no longer ours)."""
        ...


class Store(Protocol):
    """One slide's output file being written: feature rows land by index; nothing looks complete until finalized."""

    def begin_feature(self, name: str, dim: int) -> None:
        """Open a temporary feature set of N rows and width `dim`."""
        ...

    def has_feature(self, name: str) -> bool:
        """Whether a temporary feature set is open for `name`."""
        ...

    def write_rows(self, name: str, rows: np.ndarray, values: np.ndarray) -> None:
        """Place `values` (b, D) at `rows`, whatever their order."""
        ...

    def complete(self) -> bool:
        """True when every open feature set has all its rows."""
        ...

    def set_feature_attrs(self, name: str, attrs: Mapping[str, int]) -> None:
        """Attributes of the open feature set `name` (kept when it is renamed at finalize)."""
        ...

    def finalize(self) -> Path:
        """Make the output final (rename sets and file into place) and return its path."""
        ...

    def abort(self) -> None:
        """Drop everything not yet final (never raises)."""
        ...


class SlideSource(Protocol):
    """Opens slides and builds their segmentation thumbnails."""

    def open_slide(self, job: SlideJob) -> SlideHandle:
        """Open the slide of `job` (SlideError on failure)."""
        ...

    def thumbnail(self, handle: SlideHandle) -> np.ndarray:
        """The segmentation thumbnail (upstream §3.2), with bounded memory."""
        ...


class OverlayWriter(Protocol):
    """Writes a slide's overlay images where the outputs keep them (`outputs.overlays.OverlayFiles`); the planner
    draws nothing itself."""

    def mask(self, stem: str, thumb: np.ndarray, mask: np.ndarray) -> list[Path]:
        """The mask overlays (`<stem>_mask.png`, `<stem>_mask_bw.png`) of `mask` on the RGB thumbnail `thumb`."""
        ...

    def contours(self, stem: str, thumb: np.ndarray, contours: Contours, mask_shape: tuple[int, int]) -> Path:
        """The contour overlay of `contours` (in the pixels of a mask of `mask_shape` (h, w)) on `thumb`."""
        ...

    def grid(self, stem: str, thumb: np.ndarray, level0_size: tuple[int, int], coords: np.ndarray,
             patch_size_level0: int, info: Mapping[str, str]) -> Path:
        """The patch grid of `coords` (level-0 pixels) on `thumb`, with the lines of `info` in a box."""
        ...


class Planner(Protocol):
    """Turns a new slide's tissue mask into patch coordinates (and overlays)."""

    def plan(self, slide: OpenedSlide, mask: np.ndarray) -> PatchPlan:
        """Coordinates of every patch of a new slide, with the attributes of its output file."""
        ...

    def detect_overlays(self, slide: OpenedSlide, mask: np.ndarray) -> list[Path]:
        """`detect-tissue`: write the mask overlays and return their paths."""
        ...


class PatchChunks(Protocol):
    """One slide's patch chunks, as `PixelSource.iter_patches` returns them: an iterator that also says how the
    slide was read, and that can be stopped part-way.

    Each `next()` blocks (stages call it in a worker thread) and yields (rows int64 (b,), pixels uint8 (b, P, P, 3)).
    """

    @property
    def routes(self) -> str:
        """How each level was decoded (which decoder, and why a GPU one was not used), for the run report; "" when
        there is nothing to tell."""
        ...

    def __iter__(self) -> Iterator[tuple[np.ndarray, Pixels]]: ...

    def __next__(self) -> tuple[np.ndarray, Pixels]: ...

    def close(self) -> None:
        """Stop reading: the reader's own threads are joined and its files closed (idempotent; also mid-slide)."""
        ...


class PixelSource(Protocol):
    """Reads the pixels of a slide's planned patches, each tile read and decoded once."""

    def iter_patches(self, plan: PatchPlan, patch_size: int, chunk: int, threads: int) -> PatchChunks:
        """Chunks (rows int64 (b,), pixels uint8 (b, P, P, 3)) covering every planned row once."""
        ...

    def close(self) -> None:
        """Release what readers share (the tile decoder's pipelines and device memory)."""
        ...


class OutputStore(Protocol):
    """Everything a slide leaves on the output filesystem: lock, reuse decision, H5 file, patch images."""

    def h5_path(self, job: SlideJob) -> Path:
        """The slide's final H5 path."""
        ...

    def lock_path(self, job: SlideJob) -> Path:
        """The slide's lock file."""
        ...

    def acquire_lock(self, job: SlideJob) -> Lock | None:
        """Take the slide's lock, or None when a live process holds it."""
        ...

    def reuse_decision(self, job: SlideJob, encoders: Sequence[str]) -> ReuseDecision:
        """Skip, reuse, refuse or process anew, judged from the existing output file (if any)."""
        ...

    def read_coords(self, path: Path) -> np.ndarray:
        """The `coords` of a complete output file, int32 (N, 5)."""
        ...

    def open_store(self, plan: PatchPlan, feature_dims: Mapping[str, int]) -> Store:
        """A new temporary output with coords (new slide), or the existing file (reuse), checked to have room for
        its coordinates and the feature sets in `feature_dims`.

        Raises:
            OutputError: it would not fit, or the output filesystem refused it.
        """
        ...

    def save_images(self, plan: PatchPlan, rows: np.ndarray, pixels: Pixels) -> None:
        """`--save-images`: one PNG per patch, written atomically."""
        ...

    def save_qc_thumbnail(self, stem: str, thumbnail: np.ndarray, mask: np.ndarray) -> None:
        """`--qc`: `<out>/qc/thumbs/<stem>.jpg` (small) and `<stem>.mask.png` from the segmented thumbnail."""
        ...

    def sweep_orphans(self) -> None:
        """At start: remove temporary files and stale locks left by processes that no longer run."""
        ...

    def settings_fingerprint(self) -> str:
        """The fingerprint of the settings that shape coordinates, as recorded in every output (after the
        segmenter has loaded its weights)."""
        ...


class Backends(Protocol):
    """The blocking work of every stage, in parts; `open_pipeline(backends=...)` takes any implementation."""

    @property
    def slides(self) -> SlideSource:
        """Slide access."""
        ...

    @property
    def planner(self) -> Planner:
        """Coordinates and overlays."""
        ...

    @property
    def pixels(self) -> PixelSource:
        """Patch pixels."""
        ...

    @property
    def outputs(self) -> OutputStore:
        """Locks, reuse and output files."""
        ...

    def make_segmenter(self) -> Segmenter:
        """The configured tissue segmenter (not yet warmed up)."""
        ...

    def make_encoders(self) -> EncoderSet:
        """Every requested encoder, weights resolved (errors before any slide), not yet warmed up."""
        ...
