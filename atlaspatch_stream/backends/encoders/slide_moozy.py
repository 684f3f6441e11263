"""MOOZY (`moozy` package): slide and patient embeddings from `lunit_vit_small_patch8_dino` features.

The model is built by the package's own loader from the checkpoint `moozy.pt` (its shape is read from the
checkpoint), and each slide is read by the package's own H5 reader, run on the H5 thread. As upstream 1.1 does, a
slide embedding is MOOZY's case embedding of a one-slide case (the case transformer's CLS), in float32.

MOOZY caps the tokens per slide by the card's memory (no cap on the CPU), subsampling larger slides
deterministically, so a large slide's embedding depends on the card: the cap used and whether the slide was
subsampled are recorded as the attributes `token_cap` and `subsampled`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import MissingExtraError
from ...protocols import Embedding, SlideEncoder, SlideInputs
from ..weights import fetch_hf_file
from .slide_spec import BuildContext, H5Call, SlideEncoderSpec, call_here

REPO_ID = "AtlasAnalyticsLab/MOOZY"
CHECKPOINT = "moozy.pt"


def _require_package() -> None:
    try:
        import moozy  # noqa: F401
    except ImportError as exc:
        raise MissingExtraError(
            "slide encoder moozy needs the 'moozy' extra: pip install --no-deps 'moozy>=0.1.1' (its declared wandb "
            "and scikit-survival are not needed for inference)", extra="moozy") from exc


def checkpoint_path(context: BuildContext) -> Path:
    """`--weights moozy=PATH`, else `moozy.pt` from the Hugging Face cache (downloaded when online)."""
    if context.weights is not None:
        return context.weights
    return fetch_hf_file(REPO_ID, CHECKPOINT, local_flag="--weights moozy=PATH")


def prepare(spec: SlideEncoderSpec, context: BuildContext) -> None:
    """The package is installed and the checkpoint is found (MissingExtraError / WeightsError otherwise)."""
    _require_package()
    checkpoint_path(context)


def build(spec: SlideEncoderSpec, context: BuildContext) -> SlideEncoder:
    """A MOOZY encoder on the context's device (loaded by `warm_up`)."""
    prepare(spec, context)
    return MoozyEncoder(spec, checkpoint_path(context), context.device, context.h5_call)


class MoozyEncoder:
    """MOOZY's slide encoder and case transformer (`protocols.SlideEncoder`)."""

    def __init__(self, spec: SlideEncoderSpec, checkpoint: Path, device: str, h5_call: H5Call = call_here) -> None:
        self.name = spec.name
        self.patch_encoder = spec.patch_encoder
        self.dim = spec.dim
        self.checkpoint = checkpoint
        self.device = device
        self.h5_call = h5_call  # the package reads each slide's H5 itself: on the output's H5 thread
        self.model: Any = None
        self.token_cap = 0

    def warm_up(self) -> None:
        """Build the model from the checkpoint (the package's loader) and read the card's token cap."""
        import torch
        from moozy.data.features import INFERENCE_TOKEN_PRESETS, resolve_vram_token_cap
        from moozy.models.factory import load_stage2_inference_model

        device = torch.device(self.device)
        self.model = load_stage2_inference_model(str(self.checkpoint), device=device)
        self.dim = int(self.model.slide_encoder.d_model)
        self.token_cap = int(resolve_vram_token_cap(presets=INFERENCE_TOKEN_PRESETS, device=device))

    def encode(self, slides: Sequence[SlideInputs]) -> Embedding:
        """The case CLS of `slides` (one slide: its slide embedding), float32."""
        import torch
        from moozy.encoding import run_case_encoding

        samples = [self.h5_call(self._sample, s.h5_path) for s in slides]
        outputs = run_case_encoding(self.model, samples, device=torch.device(self.device), mixed_precision=False)
        vector = outputs["cls"].detach().float().cpu().numpy().reshape(-1).astype(np.float32)
        subsampled = self.token_cap > 0 and any(s.num_patches > self.token_cap for s in slides)
        return Embedding(vector, {"token_cap": self.token_cap, "subsampled": int(subsampled)})

    def _sample(self, h5_path: Path) -> Any:
        """The package's slide sample (grid, coords, patch size), read on the H5 thread."""
        from moozy.data.stage2 import load_stage2_slide_sample

        return load_stage2_slide_sample(h5_path.name, str(h5_path), include_geometry_meta=True,
                                        max_valid_tokens_per_slide=self.token_cap, feature_h5_format="auto",
                                        feature_h5_key=self.patch_encoder)

    def close(self) -> None:
        """Drop the model."""
        self.model = None
