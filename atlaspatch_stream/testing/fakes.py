"""Fake backends for stage and pipeline tests: no slides, no models, controllable delays and failures.

Each fake declares the Protocol of `atlaspatch_stream.protocols` it implements (mypy checks it) and subclasses no real
backend; tests/conformance runs the same checks on each fake and on the real part. `FakeBackends` composes them with
the real H5 output store (real lock files, real HDF5 files), so tests exercise end-of-stream, cancellation,
backpressure and per-slide failures quickly against real outputs. Tests replace a single part (e.g.
`backends.pixels = ...`) to inject a specific failure.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import numpy as np

from ..backends.bundle import LatticePlanner
from ..backends.encoders.group import EncoderGroup
from ..backends.readers import PatchIterator
from ..config import PipelineConfig
from ..errors import SlideError
from ..geometry import Geometry, plan_geometry
from ..items import OpenedSlide, PatchPlan, Pixels, SlideInfo, SlideJob
from ..outputs import SlideAttrs, visualization_dir
from ..outputs.h5outputs import H5Outputs, SettingsRecord, slide_attrs
from ..outputs.overlays import OverlayFiles
from ..protocols import (
    Backends,
    Encoder,
    PixelSource,
    Planner,
    Segmenter,
    SlideHandle,
    SlideSource,
)


@dataclass
class FakeHandle(SlideHandle):
    """A 'slide' of `width` × `height` at 40×, one level."""

    info: SlideInfo
    closed: bool = False

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """Pixels derived from the coordinates (deterministic)."""
        value = (x // 7 + y // 11) % 256
        return np.full((height, width, 3), value, dtype=np.uint8)

    def thumbnail(self, power: float, max_size: int, budget_mb: int) -> np.ndarray:
        """A small grey thumbnail."""
        return np.full((32, 32, 3), 128, dtype=np.uint8)

    def overlay_thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """Same as thumbnail."""
        return self.thumbnail(1.25, max_size, 1)

    def close(self) -> None:
        """Mark closed."""
        self.closed = True


@dataclass
class FakeSegmenter(Segmenter):
    """Everything is tissue, after `delay` seconds per batch; records batch sizes."""

    name: str = "fake"
    weights_sha256: str | None = None
    delay: float = 0.0
    batches: list[int] = field(default_factory=list)

    def warm_up(self) -> None:
        """Nothing to load."""

    def segment(self, thumbnails: Sequence[np.ndarray]) -> list[np.ndarray | Exception]:
        """All-true masks after `delay` seconds."""
        self.batches.append(len(thumbnails))
        time.sleep(self.delay)
        return [np.ones(t.shape[:2], dtype=bool) for t in thumbnails]

    def close(self) -> None:
        """Nothing to free."""


@dataclass
class FakeEncoder(Encoder):
    """Mean colour per patch (R, G, B means, repeated to `dim` columns), optionally slow."""

    name: str = "fake_mean"
    dim: int = 3
    delay: float = 0.0
    precision_ran: str = "float32"  # `PrecisionReporting`: plain numpy means

    def warm_up(self) -> None:
        """Nothing to load."""

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """float32 (B, dim): the channel means, cycled."""
        time.sleep(self.delay)
        means = pixels.reshape(len(pixels), -1, 3).mean(axis=1).astype(np.float32)
        return means[:, np.arange(self.dim) % 3]

    def close(self) -> None:
        """Nothing to free."""


class FakeSlides(SlideSource):
    """Fake slide access (`SlideSource`): 4096² at 40×; stems in `fail_open` fail to open; counts open handles."""

    def __init__(self, fail_open: Sequence[str] = ()) -> None:
        self.fail_open = set(fail_open)
        self.opened: list[FakeHandle] = []
        self.max_open_seen = 0
        self._lock = threading.Lock()

    def open_slide(self, job: SlideJob) -> SlideHandle:
        """A fake handle, or SlideError for stems in `fail_open`."""
        if job.stem in self.fail_open:
            raise SlideError("cannot open: injected failure", slide=job.name)
        info = SlideInfo(str(job.path), "fake", 4096, 4096, ((4096, 4096),), (1.0,), 0.25, 40)
        handle = FakeHandle(info)
        with self._lock:
            self.opened.append(handle)
            self.max_open_seen = max(self.max_open_seen, sum(not h.closed for h in self.opened))
        return handle

    def thumbnail(self, handle: SlideHandle) -> np.ndarray:
        """The handle's small grey thumbnail."""
        return handle.thumbnail(1.25, 1024, 1)


class FakePlanner(Planner):
    """`patches_per_slide` patches in a row (0 for stems containing 'empty'), with real output attributes (`Planner`).

    Overlays (`detect_overlays`) are the real planner's, drawn on the fake handle's thumbnail.
    """

    def __init__(self, config: PipelineConfig, settings: SettingsRecord, patches_per_slide: int) -> None:
        self.config = config
        self.settings = settings
        self.patches_per_slide = patches_per_slide
        self._overlays = LatticePlanner(config, self._attrs, OverlayFiles(visualization_dir(config.write.output)))

    def plan(self, slide: OpenedSlide, mask: np.ndarray) -> PatchPlan:
        """A single row of patches along y=0."""
        cfg = self.config.plan
        n = 0 if "empty" in slide.job.stem else self.patches_per_slide
        geometry = plan_geometry(40, cfg.target_mag, cfg.patch_size, cfg.step, (1.0,))
        xs = np.arange(n, dtype=np.int32) * geometry.ps_src
        coords = np.stack([xs, np.zeros(n, np.int32), *[np.full(n, v, np.int32) for v in
                           (geometry.read_size, geometry.read_size, 0)]], axis=1).reshape(n, 5)
        return PatchPlan(slide, geometry, coords, self._attrs(slide, geometry))

    def detect_overlays(self, slide: OpenedSlide, mask: np.ndarray) -> list[Path]:
        """The real mask overlays."""
        return self._overlays.detect_overlays(slide, mask)

    def _attrs(self, slide: OpenedSlide, geometry: Geometry) -> SlideAttrs:
        return slide_attrs(slide, geometry, self.settings)


class FakeChunks(PatchIterator):
    """The real `PatchChunks` (`PatchIterator`) over any iterator of (rows, pixels), with no decode routes to report;
    `close()` closes the iterator when it is a generator."""

    def __init__(self, chunks: Iterator[tuple[np.ndarray, Pixels]]) -> None:
        super().__init__(SimpleNamespace(routes=[]), chunks)


class FakePixels(PixelSource):
    """Deterministic pixels from the handle (`PixelSource`); stems in `fail_read` fail half-way; optional delay."""

    def __init__(self, fail_read: Sequence[str] = (), read_delay: float = 0.0) -> None:
        self.fail_read = set(fail_read)
        self.read_delay = read_delay

    def iter_patches(self, plan: PatchPlan, patch_size: int, chunk: int, threads: int) -> FakeChunks:
        """Chunks of `chunk` rows, `read_delay` seconds each."""
        return FakeChunks(self._chunks(plan, patch_size, chunk))

    def _chunks(self, plan: PatchPlan, patch_size: int, chunk: int) -> Iterator[tuple[np.ndarray, Pixels]]:
        handle, coords = plan.slide.handle, plan.coords
        for start in range(0, len(coords), chunk):
            if plan.slide.job.stem in self.fail_read and start >= len(coords) // 2:
                raise SlideError("corrupt tile: injected failure", slide=plan.slide.job.name)
            time.sleep(self.read_delay)
            rows = np.arange(start, min(start + chunk, len(coords)), dtype=np.int64)
            pixels = np.stack([handle.read_region(int(x), int(y), 0, patch_size, patch_size)
                               for x, y in coords[rows, :2]])
            yield rows, pixels

    def close(self) -> None:
        """Nothing shared to release."""


class FakeBackends:
    """Fake slides, segmenter, planner, reader and encoders around the real H5 output store.

    Args:
        config: the run's settings.
        patches_per_slide: N for every slide (a slide named `*empty*` gets 0).
        fail_open: slide stems whose opening fails.
        fail_read: slide stems whose pixel reading fails half-way.
        read_delay: seconds per chunk read (to make reading slow).
        encoder_delay: seconds per encoder call.
        segment_delay: seconds per segmentation batch.
    """

    def __init__(
        self,
        config: PipelineConfig,
        *,
        patches_per_slide: int = 10,
        fail_open: Sequence[str] = (),
        fail_read: Sequence[str] = (),
        read_delay: float = 0.0,
        encoder_delay: float = 0.0,
        segment_delay: float = 0.0,
    ) -> None:
        self.config = config
        self.settings = SettingsRecord(config, lambda: None)
        self.slides = FakeSlides(fail_open)
        self.planner = FakePlanner(config, self.settings, patches_per_slide)
        self.pixels = FakePixels(fail_read, read_delay)
        self.outputs = H5Outputs(config, self.settings)
        self.encoder_delay = encoder_delay
        self.segment_delay = segment_delay

    def make_segmenter(self) -> FakeSegmenter:
        """An all-tissue segmenter."""
        return FakeSegmenter(delay=self.segment_delay)

    def make_encoders(self) -> EncoderGroup:
        """One fake encoder per requested name."""
        return EncoderGroup([FakeEncoder(name=n, delay=self.encoder_delay) for n in self.config.encode.extractors])


def fake_jobs(folder: Path, stems: Sequence[str]) -> list[SlideJob]:
    """Jobs for files that need not exist (fake backends never read them)."""
    return [SlideJob(i, folder / f"{s}.svs", s, None, display=f"{s}.svs") for i, s in enumerate(stems)]


if TYPE_CHECKING:  # `Backends` exposes read-only parts, which the fakes' tests replace: checked structurally here
    _checked: type[Backends] = FakeBackends
