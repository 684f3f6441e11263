"""`RealBackends`: the blocking work of every stage, composed of one part per `protocols` interface.

Each method is called by a stage in a worker thread. Third-party libraries are imported inside the methods' modules,
which are imported here lazily, so `import atlaspatch_stream` stays light.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__, outputs
from ..config import PipelineConfig, geometry_fingerprint
from ..geometry import Geometry
from ..items import OpenedSlide, PatchPlan, SlideJob
from ..outputs import ReuseDecision, SlideAttrs
from ..protocols import EncoderSet, Lock, Segmenter, SlideHandle, Store, TileDecoder
from ..sources import claims

log = logging.getLogger(__name__)


class SettingsRecord:
    """The attributes (new names) recording the settings that shaped a slide's coordinates.

    `segmenter_sha256` is read when needed (after the segmenter has loaded its weights).
    """

    def __init__(self, config: PipelineConfig, segmenter_sha256: Callable[[], str | None]) -> None:
        self.config = config
        self._sha = segmenter_sha256

    def attrs(self) -> dict[str, Any]:
        """patch size, magnification, step, thresholds, segmenter and its weights' hash, version, fingerprint."""
        plan, seg, sha = self.config.plan, self.config.segment, self._sha()
        return {
            "patch_size": plan.patch_size,
            "target_magnification": plan.target_mag,
            "overlap": max(0, plan.patch_size - plan.step),
            "step_size": plan.step,
            "tissue_thresh": float(plan.tissue_thresh),
            "fast_mode": int(plan.fast_mode),
            "segmenter": seg.segmenter,
            "segmenter_sha256": sha or "",
            "atlaspatch_stream_version": __version__,
            "settings_fingerprint": geometry_fingerprint(self.config, sha),
        }


def slide_attrs(slide: OpenedSlide, geometry: Geometry, settings: SettingsRecord) -> SlideAttrs:
    """The root attributes of a new slide's H5 (upstream's, then ours)."""
    info, job = slide.handle.info, slide.job
    return SlideAttrs(
        patch_size=geometry.patch_size,
        patch_size_level0=geometry.patch_size_level0,
        level0_magnification=geometry.base_mag,
        target_magnification=geometry.target_mag,
        overlap=geometry.overlap,
        level0_width=info.width,
        level0_height=info.height,
        wsi_path=job.recorded_path,
        filename=job.recorded_filename,
        mpp=info.mpp,
        magnification=info.magnification,
        vendor=info.vendor,
        institution=None if job.pseudonym else info.institution,  # an identifier of the site: not with pseudonyms
        stain=info.stain,
        extra={**settings.attrs(), "source_size": _file_size(job.path)},
    )


def _file_size(path: Path) -> int | None:
    """The slide file's byte size, recorded so `atlaspatch check` can tell a replaced slide (None for a folder)."""
    try:
        return os.stat(path).st_size if os.path.isfile(path) else None
    except OSError:
        return None


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
    """Contours and upstream's patch lattice from a tissue mask, plus the overlays (`Planner`)."""

    def __init__(self, config: PipelineConfig, settings: SettingsRecord, pixels: TilePixels | None = None) -> None:
        self.config = config
        self.settings = settings
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
        return PatchPlan(slide, geometry, coords, slide_attrs(slide, geometry, self.settings))

    def _filter(self, slide: OpenedSlide, coords: np.ndarray) -> np.ndarray:
        """`--no-fast-mode`: drop black and white patches (upstream §4.5), keeping row order."""
        from .filters import keep_patches
        from .readers import make_patch_reader

        cfg = self.config.plan
        keep = np.zeros(len(coords), dtype=bool)
        reader = make_patch_reader(slide.handle, self.config.read.reader_threads, self.pixels.decoder())
        for rows, pixels in reader.iter_patches(slide.handle, coords, cfg.patch_size, self.config.read.chunk_patches):
            keep[rows] = keep_patches(pixels, cfg.white_thresh, cfg.black_thresh)
        return coords[keep]

    def _visualize(self, slide: OpenedSlide, mask: np.ndarray, contours: Any, coords: np.ndarray,
                   geometry: Geometry) -> None:
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


class TilePixels:
    """The tile-once patch reader, or `read_region` threads where it cannot read a slide (`PixelSource`).

    One tile decoder (`--decoder`) is built on first use and shared by every slide's reader.
    """

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
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

    def iter_patches(self, plan: PatchPlan, patch_size: int, chunk: int, threads: int) -> Iterator[
            tuple[np.ndarray, np.ndarray]]:
        """Chunks (rows, pixels) of every planned patch, from the best reader for this slide.

        The iterator's `routes` tells which decoder read each level and why (for the run report).
        """
        from .readers import PatchIterator, make_patch_reader

        handle, decoder = plan.slide.handle, self.decoder()
        # A GPU decoder's patches stay on its device all the way to the encoders.
        reader = make_patch_reader(handle, threads, decoder, device_output=decoder.device != "cpu")
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


class H5Outputs:
    """Upstream's output layout: lock files, reuse decisions, H5 files, patch PNGs (`OutputStore`)."""

    def __init__(self, config: PipelineConfig, settings: SettingsRecord) -> None:
        self.config = config
        self.settings = settings

    def h5_path(self, job: SlideJob) -> Path:
        """The slide's final H5 path."""
        return outputs.h5_path(self.config.write.output, job.stem)

    def lock_path(self, job: SlideJob) -> Path:
        """The slide's lock file."""
        return outputs.lock_path(self.config.write.output, job.stem)

    def acquire_lock(self, job: SlideJob) -> Lock | None:
        """Take the slide's lock (a `claims.Claim`, taking over a stale one), or None when a live process holds it.

        Raises:
            OutputError: the lock cannot be written (disk full, read-only, ...).
        """
        return claims.try_claim(self.lock_path(job), slide=str(job.path), purpose="process")

    def reuse_decision(self, job: SlideJob, encoders: Sequence[str]) -> ReuseDecision:
        """Skip, reuse, refuse or process anew (upstream §2.6 plus the geometry check)."""
        from .h5store import inspect_h5

        path = self.h5_path(job)
        existing = inspect_h5(path) if path.exists() else None
        return outputs.decide_reuse(existing, encoders, self.settings.attrs())

    def save_qc_thumbnail(self, stem: str, thumbnail: np.ndarray, mask: np.ndarray) -> None:
        """`--qc`: `<out>/qc/thumbs/<stem>.jpg` and `<stem>.mask.png` (what `atlaspatch report` draws cards from)."""
        from .visualize import write_qc_thumbnail

        write_qc_thumbnail(outputs.qc_thumbs_dir(self.config.write.output), stem, thumbnail, mask)

    def read_coords(self, path: Path) -> np.ndarray:
        """The `coords` of a complete H5."""
        from .h5store import read_coords

        return read_coords(path)

    def open_store(self, plan: PatchPlan, feature_dims: Mapping[str, int]) -> Store:
        """A new temporary H5 with coords (new slide), checked to have room for them and `feature_dims`; or the
        existing H5 (reuse: each added set is checked when it begins)."""
        from .h5store import SlideH5

        w, batch, job = self.config.write, self.config.encode.batch_size, plan.slide.job
        if plan.slide.reuse is not None:
            return SlideH5.open_existing(plan.slide.reuse.h5_path, plan.num_patches, batch)
        assert plan.attrs is not None, "a new slide's plan carries its attributes"
        return SlideH5.create(self.h5_path(job), plan.attrs, plan.coords, job.stem, w.write_batch, batch,
                              feature_dims=feature_dims)

    def save_images(self, plan: PatchPlan, rows: np.ndarray, pixels: np.ndarray) -> None:
        """`--save-images`: `<out>/images/<stem>/<stem>_x{X}_y{Y}.png`, written atomically."""
        from .images import save_patch_pngs
        from .patches import to_host

        stem = plan.slide.job.stem
        save_patch_pngs(outputs.images_dir(self.config.write.output, stem), stem, plan.coords[rows], to_host(pixels))

    def sweep_orphans(self) -> None:
        """Remove temporary H5s and stale locks of processes that no longer run (logged when anything goes)."""
        claims.sweep_orphans(self.config.write.output)

    def settings_fingerprint(self) -> str:
        """The geometry fingerprint every new H5 records."""
        return str(self.settings.attrs()["settings_fingerprint"])


class RealBackends:
    """The real backends: tiffslide/openslide/Pillow slides, SAM2 or Otsu, tile-once reader, timm/torch encoders, h5py."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.segmenter: Segmenter | None = None
        self.settings = SettingsRecord(config, self.segmenter_sha256)
        self.slides = TiffSlides(config)
        self.pixels = TilePixels(config)
        self.planner = LatticePlanner(config, self.settings, self.pixels)
        self.outputs = H5Outputs(config, self.settings)

    def segmenter_sha256(self) -> str | None:
        """The segmenter weights' hash once loaded (None for weight-free segmenters)."""
        return self.segmenter.weights_sha256 if self.segmenter is not None else None

    def make_segmenter(self) -> Segmenter:
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
        from .encoders.registry import build_registry

        enc = self.config.encode
        return build_registry(
            device=feature_device(self.config),
            precision=enc.precision,
            weights=dict(enc.weights),
            plugins=enc.plugins,
            num_workers=self.config.read.reader_threads,
            compile=enc.compile,
        )

    def make_encoders(self) -> EncoderSet:
        """Every requested encoder, weights resolved (errors before any slide), not yet warmed up.

        The tile decoder is built here too, so a missing decoder extra fails before any slide, as a missing weight
        file does.
        """
        from .encoders.group import EncoderGroup, StreamedEncoders

        names = self.config.encode.extractors
        if not names:
            return EncoderGroup([])
        self.pixels.decoder()
        registry = self.make_registry()
        registry.prepare(names)
        encoders = [registry.create(name) for name in names]
        device = feature_device(self.config)
        if device.startswith("cuda"):
            enc = self.config.encode
            return StreamedEncoders(encoders, device, batch_size=enc.batch_size,
                                    patch_size=self.config.plan.patch_size, memory_budget=enc.gpu_memory_budget)
        return EncoderGroup(encoders)
