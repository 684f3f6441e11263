"""The real slide, planner and pixel parts of the backends (`SlideSource`, `Planner`, `PixelSource`).

`assembly.RealBackends` composes them with the outputs. Each method is called by a stage in a worker thread.
Third-party libraries are imported inside the methods' modules, which are imported here lazily, so
`import atlaspatch_stream` stays light. Nothing here knows the output layout: the planner is handed the builder of
a new slide's attributes and the writer of its overlays.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..batching import to_host
from ..buffers import BufferPool
from ..config import PipelineConfig
from ..geometry import Contours, Geometry
from ..items import OpenedSlide, PatchPlan, SlideJob
from ..protocols import OverlayWriter, PatchChunks, SlideHandle, TileDecoder

if TYPE_CHECKING:
    from ..outputs import SlideAttrs

log = logging.getLogger(__name__)

# What a new slide's H5 records at its root, given its geometry (`outputs.h5outputs.slide_attrs`, bound to the run).
AttrsBuilder = Callable[[OpenedSlide, Geometry], "SlideAttrs"]


class TiffSlides:
    """tiffslide / openslide / Pillow slide access (`SlideSource`)."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config

    def open_slide(self, job: SlideJob) -> SlideHandle:
        """Open a slide (SlideError on failure): its staged copy when it has one."""
        from .slides import open_slide

        return open_slide(job.read_path or job.path, job.mpp_override, job.name)

    def thumbnail(self, handle: SlideHandle) -> np.ndarray:
        """The segmentation thumbnail (upstream §3.2), with bounded memory."""
        seg = self.config.segment
        return handle.thumbnail(seg.thumbnail_power, seg.thumbnail_max, seg.thumbnail_budget_mb)


class LatticePlanner:
    """Contours and upstream's patch lattice from a tissue mask, plus what the overlays show (`Planner`)."""

    def __init__(self, config: PipelineConfig, attrs: AttrsBuilder, overlays: OverlayWriter,
                 pixels: TilePixels | None = None) -> None:
        self.config = config
        self.attrs = attrs
        self.overlays = overlays
        self.pixels = pixels or TilePixels(config)

    def plan(self, slide: OpenedSlide, mask: np.ndarray) -> PatchPlan:
        """Coordinates for a new slide; overlays when asked."""
        from ..geometry import plan_geometry
        from .contours import plan_coordinates

        info, cfg = slide.handle.info, self.config.plan
        geometry = plan_geometry(info.magnification, cfg.target_mag, cfg.patch_size, cfg.step, info.level_downsamples)
        contours, coords = plan_coordinates(
            mask, (info.width, info.height), geometry, cfg.tissue_thresh, cfg.hole_min_area, cfg.max_n_holes
        )
        if not cfg.fast_mode and len(coords):
            coords = self._filter(slide, coords)
        try:
            self._visualize(slide, mask, contours, coords, geometry)
        except Exception as exc:  # noqa: BLE001 - overlays never fail a slide (upstream §6.4)
            log.warning("%s: visualization failed: %s", slide.job.name, exc)
        return PatchPlan(slide, geometry, coords, self.attrs(slide, geometry))

    def _filter(self, slide: OpenedSlide, coords: np.ndarray) -> np.ndarray:
        """`--no-fast-mode`: drop black and white patches (upstream §4.5), keeping row order."""
        from .filters import keep_patches
        from .readers import make_patch_reader

        cfg = self.config.plan
        keep = np.zeros(len(coords), dtype=bool)
        reader = make_patch_reader(slide.handle, self.config.read.reader_threads, self.pixels.decoder(),
                                   buffers=self.pixels.buffers)
        for rows, pixels in reader.iter_patches(slide.handle, coords, cfg.patch_size, self.config.read.chunk_patches):
            keep[rows] = keep_patches(to_host(pixels), cfg.white_thresh, cfg.black_thresh)
        return coords[keep]

    def _visualize(self, slide: OpenedSlide, mask: np.ndarray, contours: Contours, coords: np.ndarray,
                   geometry: Geometry) -> None:
        w = self.config.write
        if not (w.visualize_grids or w.visualize_mask or w.visualize_contours):
            return
        out, stem, info = self.overlays, slide.job.stem, slide.handle.info
        thumb = slide.handle.overlay_thumbnail(1024)
        if w.visualize_mask:
            out.mask(stem, thumb, mask)
        if w.visualize_contours:
            out.contours(stem, thumb, contours, (mask.shape[0], mask.shape[1]))
        if w.visualize_grids:
            cfg = self.config.plan
            facts = {
                "Patches Extracted": str(len(coords)),
                "WSI Size": f"{info.width} x {info.height}",
                "Patch Size": str(cfg.patch_size),
                "Step Size": str(cfg.step),
                "Tissue Threshold": str(cfg.tissue_thresh),
            }
            out.grid(stem, thumb, (info.width, info.height), coords, geometry.patch_size_level0, facts)

    def detect_overlays(self, slide: OpenedSlide, mask: np.ndarray) -> list[Path]:
        """`detect-tissue`: `<stem>_mask.png` and `<stem>_mask_bw.png`."""
        return self.overlays.mask(slide.job.stem, slide.handle.overlay_thumbnail(1024), mask)


class TilePixels:
    """The tile-once patch reader, or `read_region` threads where it cannot read a slide (`PixelSource`).

    One tile decoder (`--decoder`) is built on first use and shared by every slide's reader, and so is one pool of
    host buffers for their chunks, keeping as many as can be alive at once: the `patches` stream's, one being cut and
    one being sent for each slide read at a time, and two in the encoder's batcher.
    """

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.buffers = BufferPool(config.patch_queue + 2 * config.read.slides_in_parallel + 2)
        self._decoder: TileDecoder | None = None
        self._lock = threading.Lock()

    def decoder(self) -> TileDecoder:
        """The run's tile decoder, built and warmed once (MissingExtraError for an explicit one not installed)."""
        with self._lock:
            if self._decoder is None:
                from .decoders import DecoderSettings, make_decoder

                read = self.config.read
                decoder = make_decoder(DecoderSettings(read.decoder, feature_device(self.config),
                                                       batch_size=read.decode_batch,
                                                       hw_decoder_load=read.hw_decoder_load))
                decoder.warm_up()
                self._decoder = decoder
            return self._decoder

    def iter_patches(self, plan: PatchPlan, patch_size: int, chunk: int, threads: int) -> PatchChunks:
        """Chunks (rows, pixels) of every planned patch, from the best reader for this slide.

        The iterator's `routes` tells which decoder read each level and why (for the run report).
        """
        from .readers import PatchIterator, make_patch_reader

        handle, decoder = plan.slide.handle, self.decoder()
        # A GPU decoder's patches stay on its device all the way to the encoders.
        reader = make_patch_reader(handle, threads, decoder, device_output=decoder.device != "cpu",
                                   buffers=self.buffers)
        return PatchIterator(reader, reader.iter_patches(handle, plan.coords, patch_size, chunk))

    def close(self) -> None:
        """Release the decoder's pipelines and device memory."""
        with self._lock:
            decoder, self._decoder = self._decoder, None
        if decoder is not None:
            decoder.close()


def feature_device(config: PipelineConfig) -> str:
    """The encoders' device, resolved (decoded tiles live there too)."""
    from .devices import resolve_device

    return str(resolve_device(config.feature_device, "encoders"))
