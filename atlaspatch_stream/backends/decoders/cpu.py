"""`cpu`: the reference decoder. imagecodecs (libjpeg-turbo, OpenJPEG, zlib, ...) per tile, in the reader's threads.

Its pixels equal tiffslide's (tifffile decodes the same bytes with the same codecs): every other backend is tested
against this one.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from ...protocols import DecodedTiles
from ..tiles import TilePageMeta, decode_tile
from .base import Counters


class CpuDecoder:
    """Decodes each tile with `tiles.decode_tile` (imagecodecs) in the calling thread; handles every codec.

    `batch_size` is 1, so the reader spreads tiles over its own threads, one call each: libjpeg-turbo releases the
    GIL, and decoding overlaps reading.
    """

    name = "cpu"
    device = "cpu"
    batch_size = 1

    def __init__(self) -> None:
        self._counters = Counters()

    def warm_up(self) -> None:
        """Nothing to build."""

    def unsupported(self, meta: TilePageMeta) -> str | None:
        """None: the reference decodes every codec the tile reader accepts."""
        return None

    def decode_batch(self, raws: Sequence[bytes], meta: TilePageMeta) -> DecodedTiles:
        """Decode each tile in turn to numpy uint8 (h, w, 3)."""
        started = time.perf_counter()
        pixels = [decode_tile(raw, meta) for raw in raws]
        self._counters.add(len(raws), time.perf_counter() - started)
        return DecodedTiles(pixels)

    def statistics(self) -> dict[str, Any]:
        """Tiles and calls decoded, seconds spent (summed over threads)."""
        return {"decoder": self.name, "device": self.device, **self._counters.snapshot()}

    def close(self) -> None:
        """Nothing to release."""
