"""`mean-<patch encoder>`: a slide (or case) embedding as the mean of its patch features (weight-free)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ...errors import SlideError
from ...protocols import Embedding, SlideInputs


class MeanPooling:
    """The float64 mean of every patch feature of the given slides, stored as float32 (`protocols.SlideEncoder`)."""

    def __init__(self, name: str, patch_encoder: str, dim: int = 0) -> None:
        self.name = name
        self.patch_encoder = patch_encoder
        self.dim = dim  # 0 until known: the patch encoder's width

    def warm_up(self) -> None:
        """Nothing to load."""

    def encode(self, slides: Sequence[SlideInputs]) -> Embedding:
        """The mean over all patches of `slides`.

        Raises:
            SlideError: the slides hold no patch.
        """
        features = [s.features for s in slides if s.num_patches]
        if not features:
            raise SlideError(f"{self.name}: no patches to pool in {', '.join(str(s.h5_path) for s in slides)}")
        vector = np.concatenate(features).astype(np.float64).mean(axis=0).astype(np.float32)
        return Embedding(vector, {})

    def close(self) -> None:
        """Nothing to free."""
