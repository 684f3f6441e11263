"""`EncoderGroup`: the requested encoders run together on each decoded batch (the `EncoderSet` of the pipeline)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ...protocols import Encoder


class EncoderGroup:
    """Every requested encoder; each batch is decoded once and handed to all of them in turn."""

    def __init__(self, encoders: Sequence[Encoder]) -> None:
        self.encoders = list(encoders)

    @property
    def names(self) -> tuple[str, ...]:
        """Encoder names, in the order requested."""
        return tuple(e.name for e in self.encoders)

    @property
    def dims(self) -> Mapping[str, int]:
        """Declared output width of each encoder."""
        return {e.name: int(e.dim) for e in self.encoders}

    def warm_up(self) -> None:
        """Load every model, in the order requested (a bad weight file fails before any slide)."""
        for encoder in self.encoders:
            encoder.warm_up()

    def encode(self, pixels: np.ndarray, names: frozenset[str] | None) -> dict[str, np.ndarray]:
        """float32 (B, D) per encoder in `names` (None: all; reused slides need only their missing sets)."""
        return {e.name: e.encode(pixels) for e in self.encoders if names is None or e.name in names}

    def close(self) -> None:
        """Free every model's memory, even when one close fails."""
        errors = []
        for encoder in self.encoders:
            try:
                encoder.close()
            except Exception as exc:  # noqa: BLE001 - close the others, then report the first failure
                errors.append(exc)
        if errors:
            raise errors[0]
