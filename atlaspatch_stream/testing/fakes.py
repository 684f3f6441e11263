"""Fake backends for stage and pipeline tests: no slides, no models, controllable delays and failures.

`FakeBackends` keeps the real ledger and H5 store (real files) and replaces slide access, segmentation, pixel
reading and encoders with small deterministic stand-ins, so tests can exercise end-of-stream, cancellation,
backpressure and per-slide failures quickly.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..backends.bundle import Backends
from ..config import PipelineConfig
from ..errors import SlideError
from ..items import OpenedSlide, PatchPlan, SlideInfo, SlideJob


@dataclass
class FakeHandle:
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
class FakeSegmenter:
    """Everything is tissue; `fail` names slides (by thumbnail index order) to fail."""

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
class FakeEncoder:
    """Mean colour per patch (dim 3), optionally slow."""

    name: str = "fake_mean"
    dim: int = 3
    delay: float = 0.0
    calls: int = 0

    def warm_up(self) -> None:
        """Nothing to load."""

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """float32 (B, 3) channel means."""
        self.calls += 1
        time.sleep(self.delay)
        return pixels.reshape(len(pixels), -1, 3).mean(axis=1).astype(np.float32)

    def close(self) -> None:
        """Nothing to free."""


class FakeBackends(Backends):
    """Real ledger and H5 store; fake slides, segmenter, reader and encoders.

    Args:
        config: the run's settings.
        patches_per_slide: N for every slide (a slide named `*empty*` gets 0).
        fail_open: slide stems whose opening fails.
        fail_read: slide stems whose pixel reading fails half-way.
        read_delay: seconds per chunk read (to make reading slow).
        encoder_delay: seconds per encoder call.
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
        super().__init__(config)
        self.patches_per_slide = patches_per_slide
        self.fail_open = set(fail_open)
        self.fail_read = set(fail_read)
        self.read_delay = read_delay
        self.encoder_delay = encoder_delay
        self.segment_delay = segment_delay
        self.opened: list[FakeHandle] = []
        self.max_open_seen = 0
        self._lock = threading.Lock()

    def make_segmenter(self) -> FakeSegmenter:
        """An all-tissue segmenter."""
        self.segmenter = FakeSegmenter(delay=self.segment_delay)
        return self.segmenter

    def make_encoders(self) -> list[Any]:
        """One fake encoder per requested name."""
        return [FakeEncoder(name=n, delay=self.encoder_delay) for n in self.config.encode.extractors]

    def open_slide(self, job: SlideJob) -> FakeHandle:
        """A fake handle, or SlideError for stems in `fail_open`."""
        if job.stem in self.fail_open:
            raise SlideError("cannot open: injected failure", slide=job.name)
        info = SlideInfo(str(job.path), "fake", 4096, 4096, ((4096, 4096),), (1.0,), 0.25, 40)
        handle = FakeHandle(info)
        with self._lock:
            self.opened.append(handle)
            self.max_open_seen = max(self.max_open_seen, sum(not h.closed for h in self.opened))
        return handle

    def plan(self, slide: OpenedSlide, mask: np.ndarray | None) -> PatchPlan:
        """`patches_per_slide` patches in a row (0 for stems containing 'empty')."""
        if slide.reuse is not None:
            return super().plan(slide, mask)
        from ..geometry import plan_geometry

        n = 0 if "empty" in slide.job.stem else self.patches_per_slide
        geometry = plan_geometry(40, self.config.plan.target_mag, self.config.plan.patch_size,
                                 self.config.plan.step, (1.0,))
        xs = np.arange(n, dtype=np.int32) * geometry.ps_src
        coords = np.stack([xs, np.zeros(n, np.int32), *[np.full(n, v, np.int32) for v in
                           (geometry.read_size, geometry.read_size, 0)]], axis=1).reshape(n, 5)
        return PatchPlan(slide, geometry, coords, self._attrs(slide, geometry))

    def iter_patches(self, plan: PatchPlan, patch_size: int, chunk: int, threads: int) -> Iterator[Any]:
        """Chunks of deterministic pixels; fails half-way for stems in `fail_read`."""
        handle, coords = plan.slide.handle, plan.coords
        for start in range(0, len(coords), chunk):
            if plan.slide.job.stem in self.fail_read and start >= len(coords) // 2:
                raise SlideError("corrupt tile: injected failure", slide=plan.slide.job.name)
            time.sleep(self.read_delay)
            rows = np.arange(start, min(start + chunk, len(coords)), dtype=np.int64)
            pixels = np.stack([handle.read_region(int(x), int(y), 0, patch_size, patch_size)
                               for x, y in coords[rows, :2]])
            yield rows, pixels


def fake_jobs(folder: Path, stems: Sequence[str]) -> list[SlideJob]:
    """Jobs for files that need not exist (fake backends never read them)."""
    return [SlideJob(i, folder / f"{s}.svs", s, None, display=f"{s}.svs") for i, s in enumerate(stems)]
