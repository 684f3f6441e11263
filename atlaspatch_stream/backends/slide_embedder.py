"""`SlideEmbedderH5`: stage `embed`'s blocking work: slide encoders over finished slide H5s."""

from __future__ import annotations

from pathlib import Path

from ..config import PipelineConfig
from ..errors import ConfigError, SlideError
from ..items import SlideJob
from ..outputs import lock_path
from ..protocols import Lock, SlideEncoder, SlideInputs
from ..sources import claims
from . import embeddings_h5 as store


class SlideEmbedderH5:
    """Each slide encoder's embedding of one slide, reused when current (upstream's rules) unless `force`."""

    def __init__(self, encoders: list[SlideEncoder], output: Path, force: bool) -> None:
        self.encoders = encoders
        self.output = output
        self.force = force

    def warm_up(self) -> None:
        """Load every model."""
        for encoder in self.encoders:
            encoder.warm_up()

    def claim(self, job: SlideJob) -> Lock | None:
        """`patches/<stem>.lock` with purpose `slide-embedding`, as upstream."""
        return claims.try_claim(lock_path(self.output, job.stem), slide=str(job.path), purpose="slide-embedding")

    def embed(self, h5_path: Path) -> tuple[str, ...]:
        """Write the missing or outdated slide embeddings of one finished H5; the names written."""
        inputs: dict[str, SlideInputs] = {}
        written = []
        for encoder in self.encoders:
            if encoder.patch_encoder not in inputs:
                inputs[encoder.patch_encoder] = store.read_slide_inputs(h5_path, encoder.patch_encoder)
            slide = inputs[encoder.patch_encoder]
            if not slide.num_patches:
                raise SlideError(f"{h5_path}: no patches, so no slide embedding")
            if not self.force and store.slide_embedding_current(
                    store.existing_slide_embedding(h5_path, encoder.name), encoder.dim, slide, encoder.patch_encoder):
                continue
            embedding = encoder.encode([slide])
            attrs = store.slide_attrs(encoder.name, slide, encoder.patch_encoder, embedding)
            store.write_slide_embedding(h5_path, encoder.name, embedding, attrs)
            written.append(encoder.name)
        return tuple(written)

    def close(self) -> None:
        """Free every model."""
        for encoder in self.encoders:
            encoder.close()


def make_slide_embedder(config: PipelineConfig) -> SlideEmbedderH5:
    """The run's slide encoders on the feature device, extras and weights checked (not yet warmed up).

    Raises:
        ConfigError: an unknown slide encoder, or its patch encoder is not among `encode.extractors`.
        MissingExtraError, WeightsError: before any slide.
    """
    from .bundle import feature_device
    from .encoders.slide_registry import build_slide_registry

    enc = config.encode
    registry = build_slide_registry(config, feature_device(config))
    for name in enc.slide_encoders:
        needed = registry.spec(name).patch_encoder
        if needed not in enc.extractors:
            raise ConfigError(f"slide encoder {name} reads features/{needed}: add {needed} to the feature extractors")
    registry.prepare(enc.slide_encoders)
    encoders = [registry.create(name) for name in enc.slide_encoders]
    return SlideEmbedderH5(encoders, config.write.output, force=not config.write.skip_existing)
