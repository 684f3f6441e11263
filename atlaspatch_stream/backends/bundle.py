"""`Backends`: the blocking work of every stage, in one injectable object (tests pass a subclass or a fake).

Each method is called by a stage in a worker thread. Third-party libraries are imported inside the methods' modules,
which are imported here lazily, so `import atlaspatch_stream` stays light.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__, outputs
from ..config import PipelineConfig, geometry_fingerprint
from ..errors import SlideError
from ..items import OpenedSlide, PatchPlan, SlideJob
from ..outputs import SlideAttrs
from ..sources import claims

log = logging.getLogger("atlaspatch_stream")


class Backends:
    """The real backends: tiffslide/openslide/Pillow slides, SAM2 or Otsu, tile-once reader, timm/torch encoders, h5py."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.segmenter: Any = None
        self.decoder: Any = None

    # -- models ---------------------------------------------------------------------------------------------------

    def make_segmenter(self) -> Any:
        """The configured tissue segmenter (not yet warmed up)."""
        seg = self.config.segment
        if seg.segmenter == "otsu":
            from .segment_otsu import OtsuSegmenter

            self.segmenter = OtsuSegmenter(seg.otsu_median, seg.otsu_close, seg.otsu_min_saturation)
        else:
            from .segment_sam2 import Sam2Segmenter

            self.segmenter = Sam2Segmenter(seg.device, seg.seg_precision, seg.seg_weights, seg.seg_batch_size)
        return self.segmenter

    def make_registry(self) -> Any:
        """The encoder registry with built-ins and plugins."""
        from .devices import resolve_device
        from .encoders.registry import build_registry

        enc = self.config.encode
        return build_registry(
            device=str(resolve_device(self.config.feature_device, "encoders")),
            precision=enc.precision,
            weights=dict(enc.weights),
            plugins=enc.plugins,
            num_workers=self.config.read.reader_threads,
            compile=enc.compile,
        )

    def make_decoder(self) -> Any:
        """The run's tile decoder (`--decoder`), built and warmed once and shared by every slide's reader.

        Raises MissingExtraError for an explicit `dali` / `nvimgcodec` whose library is missing, so call it before
        any slide (`make_encoders` does).
        """
        if self.decoder is None:
            from .decoders import DecoderSettings, make_decoder

            read = self.config.read
            device = self._feature_device()
            decoder = make_decoder(DecoderSettings(read.decoder, device, batch_size=read.decode_batch,
                                                   hw_decoder_load=read.hw_decoder_load))
            decoder.warm_up()
            self.decoder = decoder
        return self.decoder

    def _feature_device(self) -> str:
        """The encoders' device, resolved (decoded tiles live there)."""
        from .devices import resolve_device

        return str(resolve_device(self.config.feature_device, "encoders"))

    def make_encoders(self) -> list[Any]:
        """Every requested encoder, weights resolved (errors before any slide), not yet warmed up.

        The tile decoder is resolved here too: a missing decoder extra fails before any slide, as a missing weight
        file does.
        """
        names = self.config.encode.extractors
        if not names:
            return []
        self.make_decoder()
        registry = self.make_registry()
        registry.prepare(names)
        return [registry.create(name) for name in names]

    # -- slides ---------------------------------------------------------------------------------------------------

    def open_slide(self, job: SlideJob) -> Any:
        """Open a slide (SlideError on failure)."""
        from .slides import open_slide

        return open_slide(job.path, job.mpp_override, job.name)

    def thumbnail(self, handle: Any) -> np.ndarray:
        """The segmentation thumbnail (upstream §3.2), with bounded memory."""
        seg = self.config.segment
        return handle.thumbnail(seg.thumbnail_power, seg.thumbnail_max, seg.thumbnail_budget_mb)

    # -- outputs --------------------------------------------------------------------------------------------------

    def h5_path(self, job: SlideJob) -> Path:
        """The slide's final H5 path."""
        return outputs.h5_path(self.config.write.output, job.stem)

    def lock_path(self, job: SlideJob) -> Path:
        """The slide's lock file."""
        return outputs.lock_path(self.config.write.output, job.stem)

    def acquire_lock(self, job: SlideJob) -> Any:
        """Take the slide's lock, or None when a live process holds it."""
        return claims.acquire_lock(self.lock_path(job), str(job.path))

    def reuse_decision(self, job: SlideJob, encoders: Sequence[str]) -> outputs.ReuseDecision:
        """Skip, reuse, refuse or process anew (upstream §2.6 plus the geometry check)."""
        from .h5store import inspect_h5

        path = self.h5_path(job)
        existing = inspect_h5(path) if path.exists() else None
        return outputs.decide_reuse(existing, encoders, self.settings_attrs())

    def segmenter_sha256(self) -> str | None:
        """The segmenter weights' hash once loaded (None for weight-free segmenters)."""
        return getattr(self.segmenter, "weights_sha256", None)

    def settings_attrs(self) -> dict[str, Any]:
        """Attributes (new names) recording the settings that shaped coordinates."""
        plan, seg = self.config.plan, self.config.segment
        return {
            "patch_size": plan.patch_size,
            "target_magnification": plan.target_mag,
            "overlap": max(0, plan.patch_size - plan.step),
            "step_size": plan.step,
            "tissue_thresh": float(plan.tissue_thresh),
            "fast_mode": int(plan.fast_mode),
            "segmenter": seg.segmenter,
            "segmenter_sha256": self.segmenter_sha256() or "",
            "atlaspatch_stream_version": __version__,
            "settings_fingerprint": geometry_fingerprint(self.config, self.segmenter_sha256()),
        }

    # -- plan -----------------------------------------------------------------------------------------------------

    def plan(self, slide: OpenedSlide, mask: np.ndarray | None) -> PatchPlan:
        """Coordinates for a new slide, or the existing ones for a reused slide; overlays when asked."""
        if slide.reuse is not None:
            from .h5store import read_coords

            return PatchPlan(slide, None, read_coords(slide.reuse.h5_path))
        from ..geometry import plan_geometry
        from .contours import plan_coordinates

        info, cfg = slide.handle.info, self.config.plan
        if mask is None:
            raise SlideError("no tissue mask", slide=slide.job.name)
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
        return PatchPlan(slide, geometry, coords, self._attrs(slide, geometry))

    def _filter(self, slide: OpenedSlide, coords: np.ndarray) -> np.ndarray:
        """`--no-fast-mode`: drop black and white patches (upstream §4.5), keeping row order."""
        from .filters import keep_patches
        from .readers import make_patch_reader

        cfg = self.config.plan
        keep = np.zeros(len(coords), dtype=bool)
        reader = make_patch_reader(slide.handle, self.config.read.reader_threads, self.make_decoder())
        for rows, pixels in reader.iter_patches(slide.handle, coords, cfg.patch_size, self.config.read.chunk_patches):
            keep[rows] = keep_patches(pixels, cfg.white_thresh, cfg.black_thresh)
        return coords[keep]

    def _attrs(self, slide: OpenedSlide, geometry: Any) -> SlideAttrs:
        info, job = slide.handle.info, slide.job
        return SlideAttrs(
            patch_size=geometry.patch_size,
            patch_size_level0=geometry.patch_size_level0,
            level0_magnification=geometry.base_mag,
            target_magnification=geometry.target_mag,
            overlap=geometry.overlap,
            level0_width=info.width,
            level0_height=info.height,
            wsi_path=str(job.path),
            filename=job.path.name,
            mpp=info.mpp,
            magnification=info.magnification,
            vendor=info.vendor,
            institution=info.institution,
            stain=info.stain,
            extra=self.settings_attrs(),
        )

    # -- overlays -------------------------------------------------------------------------------------------------

    def _visualize(self, slide: OpenedSlide, mask: np.ndarray, contours: Any, coords: np.ndarray, geometry: Any) -> None:
        w = self.config.write
        if not (w.visualize_grids or w.visualize_mask or w.visualize_contours):
            return
        from . import visualize

        out, stem, info = outputs.visualization_dir(w.output), slide.job.stem, slide.handle.info
        thumb = slide.handle.overlay_thumbnail(1024)
        if w.visualize_mask:
            visualize.write_mask_overlays(out, stem, thumb, mask)
        if w.visualize_contours:
            visualize.write_contour_overlay(out, stem, thumb, contours, mask.shape[:2])
        if w.visualize_grids:
            cfg = self.config.plan
            facts = {
                "Patches Extracted": str(len(coords)),
                "WSI Size": f"{info.width} x {info.height}",
                "Patch Size": str(cfg.patch_size),
                "Step Size": str(cfg.step),
                "Tissue Threshold": str(cfg.tissue_thresh),
            }
            visualize.write_grid_overlay(
                out, stem, thumb, (info.width, info.height), coords, geometry.patch_size_level0, facts
            )

    def detect_overlays(self, slide: OpenedSlide, mask: np.ndarray) -> list[Path]:
        """`detect-tissue`: `<stem>_mask.png` and `<stem>_mask_bw.png`."""
        from . import visualize

        thumb = slide.handle.overlay_thumbnail(1024)
        out = outputs.visualization_dir(self.config.write.output)
        return visualize.write_mask_overlays(out, slide.job.stem, thumb, mask)

    # -- pixels ---------------------------------------------------------------------------------------------------

    def iter_patches(self, plan: PatchPlan, patch_size: int, chunk: int, threads: int) -> Iterator[Any]:
        """Chunks (rows, pixels) of every planned patch, from the best reader for this slide.

        The iterator's `routes` tells which decoder read each level and why (for the run report).
        """
        from .readers import PatchIterator, make_patch_reader

        handle = plan.slide.handle
        reader = make_patch_reader(handle, threads, self.make_decoder())
        return PatchIterator(reader, reader.iter_patches(handle, plan.coords, patch_size, chunk))

    def save_images(self, plan: PatchPlan, rows: np.ndarray, pixels: np.ndarray) -> None:
        """`--save-images`: `<out>/images/<stem>/<stem>_x{X}_y{Y}.png`, written atomically."""
        from .images import save_patch_pngs

        stem = plan.slide.job.stem
        save_patch_pngs(outputs.images_dir(self.config.write.output, stem), stem, plan.coords[rows], pixels)

    # -- output ---------------------------------------------------------------------------------------------------

    def open_store(self, plan: PatchPlan) -> Any:
        """A new temporary H5 with coords (new slide) or the existing H5 (reuse)."""
        from .h5store import SlideH5

        w, batch = self.config.write, self.config.encode.batch_size
        if plan.slide.reuse is not None:
            return SlideH5.open_existing(plan.slide.reuse.h5_path, plan.num_patches, batch)
        return SlideH5.create(self.h5_path(plan.slide.job), plan.attrs, plan.coords, plan.slide.job.stem,
                              w.write_batch, batch)
