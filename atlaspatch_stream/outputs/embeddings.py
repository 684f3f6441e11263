"""Slide and patient embeddings written into the output folder: `SlideEmbedderH5` (stage `embed`'s blocking work:
slide encoders over finished slide H5s) and `PatientEmbedder` (one case's slide H5s -> `patient_features/<encoder>/
<case_id>.h5`, under `<case_id>.lock`). The encoders are given (`assembly` builds them)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from ..errors import SlideError
from ..items import SlideJob
from ..protocols import Lock, SlideEncoder, SlideInputs
from . import claims
from . import embeddings_h5 as store
from .layout import lock_path


class _Encoders:
    """Slide encoders writing into one output folder (`force`: never reuse what is there)."""

    def __init__(self, encoders: list[SlideEncoder], output: Path, force: bool) -> None:
        self.encoders = encoders
        self.output = output
        self.force = force

    def warm_up(self) -> None:
        """Load every model."""
        for encoder in self.encoders:
            encoder.warm_up()

    def close(self) -> None:
        """Free every model."""
        for encoder in self.encoders:
            encoder.close()


class SlideEmbedderH5(_Encoders):
    """Each slide encoder's embedding of one slide, reused when current (upstream's rules) unless `force`."""

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
            if not self.force and store.slide_embedding_current(h5_path, encoder.name, encoder.dim, slide,
                                                                encoder.patch_encoder):
                continue
            embedding = encoder.encode([slide])
            attrs = store.slide_attrs(encoder.name, slide, encoder.patch_encoder, embedding)
            store.write_slide_embedding(h5_path, encoder.name, embedding, attrs)
            written.append(encoder.name)
        return tuple(written)


CaseStatus = Literal["done", "reused", "locked"]


class PatientEmbedder(_Encoders):
    """Patient encoders on the feature device, writing into one output folder."""

    def __init__(self, encoders: list[SlideEncoder], output: Path, manifest: Path, force: bool) -> None:
        super().__init__(encoders, output, force)
        self.manifest = manifest

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
        path = store.patient_path(self.output, encoder.name, case_id)
        lock = claims.try_claim(path.with_suffix(".lock"), slide=case_id, purpose="patient-embedding")
        if lock is None:
            return "locked"
        try:
            slides = [store.read_slide_inputs(p, encoder.patch_encoder) for p in h5_paths]
            wanted = store.patient_attrs(encoder.name, encoder.patch_encoder, self.manifest, slides, {})
            if not self.force and path.exists() and store.patient_current(path, encoder.dim, wanted):
                return "reused"
            embedding = encoder.encode(slides)
            attrs = store.patient_attrs(encoder.name, encoder.patch_encoder, self.manifest, slides, embedding.attrs)
            store.write_patient(path, embedding, attrs)
            return "done"
        finally:
            lock.release()
