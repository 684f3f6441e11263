"""`RealBackends` (the blocking work of every stage) and the slide and patient embedders, composed of the real
backends and the H5 outputs.

The one place the `backends/` parts and the `outputs/` store meet: backends know nothing of the output layout (the
planner is handed the attribute builder and the overlay folder), the outputs nothing of slides or models. Backend
modules are imported inside the methods, so importing this module stays light.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from .backends.bundle import LatticePlanner, TiffSlides, TilePixels, feature_device
from .config import PipelineConfig
from .errors import ConfigError
from .outputs import visualization_dir
from .outputs.h5outputs import H5Outputs, SettingsRecord, slide_attrs
from .outputs.overlays import OverlayFiles
from .protocols import EncoderSet, Segmenter

if TYPE_CHECKING:
    from .backends.encoders.registry import EncoderRegistry
    from .outputs.embeddings import PatientEmbedder, SlideEmbedderH5


class RealBackends:
    """The real backends: tiffslide/openslide/Pillow slides, SAM2 or Otsu, tile-once reader, timm/torch encoders, h5py."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.segmenter: Segmenter | None = None
        self.settings = SettingsRecord(config, self.segmenter_sha256)
        self.slides = TiffSlides(config)
        self.pixels = TilePixels(config)
        self.planner = LatticePlanner(config, partial(slide_attrs, settings=self.settings),
                                      OverlayFiles(visualization_dir(config.write.output)), self.pixels)
        self.outputs = H5Outputs(config, self.settings)

    def segmenter_sha256(self) -> str | None:
        """The segmenter weights' hash once loaded (None for weight-free segmenters)."""
        return self.segmenter.weights_sha256 if self.segmenter is not None else None

    def make_segmenter(self) -> Segmenter:
        """The configured tissue segmenter (not yet warmed up)."""
        seg = self.config.segment
        if seg.segmenter == "otsu":
            from .backends.segment_otsu import OtsuSegmenter

            self.segmenter = OtsuSegmenter(seg.otsu_median, seg.otsu_close, seg.otsu_min_saturation)
        else:
            from .backends.segment_sam2 import Sam2Segmenter

            self.segmenter = Sam2Segmenter(seg.device, seg.seg_precision, seg.seg_weights, seg.seg_batch_size)
        return self.segmenter

    def make_registry(self) -> EncoderRegistry:
        """The encoder registry with built-ins and plugins."""
        from .backends.encoders.registry import build_registry

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
        from .backends.encoders.group import CudaEncoderGroup, EncoderGroup

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
            return CudaEncoderGroup(encoders, device, batch_size=enc.batch_size,
                                    patch_size=self.config.plan.patch_size, memory_budget=enc.gpu_memory_budget)
        return EncoderGroup(encoders)


def make_slide_embedder(config: PipelineConfig) -> SlideEmbedderH5:
    """The run's slide encoders on the feature device, extras and weights checked (not yet warmed up).

    Raises:
        ConfigError: an unknown slide encoder, or its patch encoder is not among `encode.extractors`.
        MissingExtraError, WeightsError: before any slide.
    """
    from .backends.encoders.slide_registry import build_slide_registry
    from .outputs.embeddings import SlideEmbedderH5
    from .outputs.h5thread import h5_executor

    enc = config.encode
    registry = build_slide_registry(config, feature_device(config), h5_executor().submit)
    for name in enc.slide_encoders:
        needed = registry.spec(name).patch_encoder
        if needed not in enc.extractors:
            raise ConfigError(f"slide encoder {name} reads features/{needed}: add {needed} to the feature extractors")
    registry.prepare(enc.slide_encoders)
    encoders = [registry.create(name) for name in enc.slide_encoders]
    return SlideEmbedderH5(encoders, config.write.output, force=not config.write.skip_existing)


def make_patient_embedder(config: PipelineConfig, names: Sequence[str], manifest: Path) -> PatientEmbedder:
    """The requested patient encoders on the feature device (extras and weights checked), not yet warmed up."""
    from .backends.encoders.slide_registry import build_slide_registry
    from .outputs.embeddings import PatientEmbedder
    from .outputs.h5thread import h5_executor

    registry = build_slide_registry(config, feature_device(config), h5_executor().submit)
    registry.prepare(names)
    encoders = [registry.create(name) for name in names]
    return PatientEmbedder(encoders, config.write.output, manifest, force=not config.write.skip_existing)
