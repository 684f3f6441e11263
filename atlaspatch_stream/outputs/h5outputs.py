"""`H5Outputs`, the `OutputStore` the pipeline writes through, and what a new slide's H5 records about it.

Upstream's layout under `<out>`: lock files (claims), reuse decisions, H5 files, patch PNGs. h5py and cv2 are
imported by the methods that need them, so importing this module stays light.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from .. import __version__
from ..batching import to_host
from ..config import PipelineConfig, geometry_fingerprint
from ..geometry import Geometry
from ..items import OpenedSlide, PatchPlan, Pixels, ReuseDecision, SlideJob
from ..protocols import Lock, Store
from . import claims
from .layout import SlideAttrs, decide_reuse, h5_path, images_dir, lock_path, qc_thumbs_dir


class SettingsRecord:
    """The attributes (new names) recording the settings that shaped a slide's coordinates.

    `segmenter_sha256` is read when needed (after the segmenter has loaded its weights).
    """

    def __init__(self, config: PipelineConfig, segmenter_sha256: Callable[[], str | None]) -> None:
        self.config = config
        self._sha = segmenter_sha256

    def attrs(self) -> dict[str, object]:
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


class H5Outputs:
    """Upstream's output layout: lock files, reuse decisions, H5 files, patch PNGs (`OutputStore`).

    `purpose` is what the claims record: the Ray engine tags them `process ray:<run id>`, so a retry of its run
    can take over at once the claim of a worker that died.
    """

    def __init__(self, config: PipelineConfig, settings: SettingsRecord, purpose: str = "process") -> None:
        self.config = config
        self.settings = settings
        self.purpose = purpose

    def h5_path(self, job: SlideJob) -> Path:
        """The slide's final H5 path."""
        return h5_path(self.config.write.output, job.stem)

    def lock_path(self, job: SlideJob) -> Path:
        """The slide's lock file."""
        return lock_path(self.config.write.output, job.stem)

    def acquire_lock(self, job: SlideJob) -> Lock | None:
        """Take the slide's lock (a `claims.Claim`, taking over a stale one), or None when a live process holds it.

        Raises:
            OutputError: the lock cannot be written (disk full, read-only, ...).
        """
        return claims.try_claim(self.lock_path(job), slide=str(job.path), purpose=self.purpose)

    def reuse_decision(self, job: SlideJob, encoders: Sequence[str]) -> ReuseDecision:
        """Skip, reuse, refuse or process anew (upstream §2.6 plus the geometry check)."""
        from .h5store import inspect_h5

        path = self.h5_path(job)
        existing = inspect_h5(path) if path.exists() else None
        return decide_reuse(existing, encoders, self.settings.attrs())

    def save_qc_thumbnail(self, stem: str, thumbnail: np.ndarray, mask: np.ndarray) -> None:
        """`--qc`: `<out>/qc/thumbs/<stem>.jpg` and `<stem>.mask.png` (what `atlaspatch report` draws cards from)."""
        from .overlays import write_qc_thumbnail

        write_qc_thumbnail(qc_thumbs_dir(self.config.write.output), stem, thumbnail, mask)

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

    def save_images(self, plan: PatchPlan, rows: np.ndarray, pixels: Pixels) -> None:
        """`--save-images`: `<out>/images/<stem>/<stem>_x{X}_y{Y}.png`, written atomically."""
        from .images import save_patch_pngs

        stem = plan.slide.job.stem
        save_patch_pngs(images_dir(self.config.write.output, stem), stem, plan.coords[rows], to_host(pixels))

    def sweep_orphans(self) -> None:
        """Remove temporary H5s and stale locks of processes that no longer run (logged when anything goes)."""
        claims.sweep_orphans(self.config.write.output)

    def settings_fingerprint(self) -> str:
        """The geometry fingerprint every new H5 records."""
        return str(self.settings.attrs()["settings_fingerprint"])
