"""Patient embeddings: one case's slide H5s -> `patient_features/<encoder>/<case_id>.h5`, under `<case_id>.lock`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from ..config import PipelineConfig
from ..protocols import SlideEncoder
from ..sources import claims
from . import embeddings_h5 as store

CaseStatus = Literal["done", "reused", "locked"]


class PatientEmbedder:
    """Patient encoders on the feature device, writing into one output folder."""

    def __init__(self, encoders: list[SlideEncoder], output: Path, manifest: Path, force: bool) -> None:
        self.encoders = encoders
        self.output = output
        self.manifest = manifest
        self.force = force

    def warm_up(self) -> None:
        """Load every model and sweep what killed runs left in the patient folders."""
        for encoder in self.encoders:
            encoder.warm_up()
            claims.sweep_folder(self.output / store.PATIENT_FOLDER / encoder.name)

    def embed_case(self, encoder: SlideEncoder, case_id: str, h5_paths: Sequence[Path]) -> CaseStatus:
        """Write (or reuse) one case's file for `encoder`; `locked` when another process holds `<case_id>.lock`.

        Raises:
            SlideError: a slide's H5 lacks its patch features; OutputError: the write failed.
        """
        lock = claims.try_claim(store.patient_lock_path(self.output, encoder.name, case_id), slide=case_id,
                                purpose="patient-embedding")
        if lock is None:
            return "locked"
        try:
            slides = [store.read_slide_inputs(p, encoder.patch_encoder) for p in h5_paths]
            path = store.patient_path(self.output, encoder.name, case_id)
            wanted = store.patient_attrs(encoder.name, encoder.patch_encoder, self.manifest, slides, {})
            if not self.force and path.exists() and store.patient_current(path, encoder.dim, wanted):
                return "reused"
            embedding = encoder.encode(slides)
            attrs = store.patient_attrs(encoder.name, encoder.patch_encoder, self.manifest, slides, embedding.attrs)
            store.write_patient(path, embedding, attrs)
            return "done"
        finally:
            lock.release()

    def close(self) -> None:
        """Free every model."""
        for encoder in self.encoders:
            encoder.close()


def make_patient_embedder(config: PipelineConfig, names: Sequence[str], manifest: Path) -> PatientEmbedder:
    """The requested patient encoders on the feature device (extras and weights checked), not yet warmed up."""
    from .bundle import feature_device
    from .encoders.slide_registry import build_slide_registry

    registry = build_slide_registry(config, feature_device(config))
    registry.prepare(names)
    encoders = [registry.create(name) for name in names]
    return PatientEmbedder(encoders, config.write.output, manifest, force=not config.write.skip_existing)
