"""Start-up colour probes: what a decoder backend gets right, measured on tiny tiles against the CPU reference.

Whether nvJPEG on a given GPU honours APP14 for 3-component images, or whether the SYCC route works through the
hardware engine, is not documented (gpu.md §6.1). Rather than trusting a table, each GPU backend decodes one small
tile per codec family at warm-up and compares it with the `cpu` decoder: a family whose colours come out wrong is
routed to `cpu`, and the measured difference is the recorded reason.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...tileplan import TileGrid
from ..tiles import JPEG, TilePageMeta
from .base import Codec

_APERIO_JP2K_RGB = 33005
_SIZE = 64
# A decoder within this mean |difference| of the reference decodes a family's colours right; colour-space mistakes
# give tens of grey levels (Aperio RGB read as YCbCr: up to 254), IDCT differences well under one.
MEAN_TOLERANCE = 1.5


@dataclass(frozen=True)
class ProbeResult:
    """One family's probe: the mean and max |difference| from the CPU reference, and whether it passes."""

    codec: Codec
    mean_abs: float
    max_abs: int

    @property
    def ok(self) -> bool:
        """True when the colours agree with the reference (see MEAN_TOLERANCE)."""
        return self.mean_abs <= MEAN_TOLERANCE


def probe_pixels() -> np.ndarray:
    """A deterministic H&E-coloured 64×64 RGB tile: pink and purple gradients plus noise (colour mistakes show)."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:_SIZE, 0:_SIZE].astype(np.float32) / _SIZE
    pink, purple = np.array([234, 160, 200], np.float32), np.array([128, 72, 160], np.float32)
    mix = (0.5 + 0.5 * np.sin(6.0 * xx + 3.0 * yy))[..., None]
    image = pink * (1 - mix) + purple * mix + rng.normal(0, 6, (_SIZE, _SIZE, 3))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


PROBE_FILE = Path(__file__).with_name("probe_tiles.npz")
_FAMILIES: dict[Codec, tuple[int, int, int | None]] = {  # compression, photometric, forced JPEG colour space
    "jpeg_rgb": (JPEG, 2, 2),
    "jpeg_ycbcr": (JPEG, 6, None),
    "jpeg2000": (_APERIO_JP2K_RGB, 2, None),
}


def probe_meta(codec: Codec) -> TilePageMeta:
    """The level description of one probe tile (a single 64×64 tile)."""
    compression, photometric, colorspace = _FAMILIES[codec]
    empty = np.zeros(1, np.int64)
    return TilePageMeta("<probe>", 0, 1.0, TileGrid(_SIZE, _SIZE, _SIZE, _SIZE), compression, photometric, 1, None,
                        colorspace, empty, empty)


def aperio_jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
    """RGB samples JPEG-coded as Aperio writes them: no APP0/APP14 marker, component ids 0, 1, 2."""
    import imagecodecs

    data = bytes(imagecodecs.jpeg8_encode(pixels, level=quality, colorspace="RGB", outcolorspace="RGB"))
    out, pos = bytearray(data[:2]), 2
    while pos < len(data):
        marker, length = data[pos + 1], int.from_bytes(data[pos + 2 : pos + 4], "big")
        segment = bytearray(data[pos : pos + 2 + length])
        pos += 2 + length
        if marker in (0xE0, 0xEE):
            continue
        if marker == 0xC0:  # frame header: component ids
            for i in range(3):
                segment[10 + 3 * i] = i
        if marker == 0xDA:  # scan header: component selectors, then the entropy-coded data to the end
            for i in range(3):
                segment[5 + 2 * i] = i
            return bytes(out + segment + data[pos:])
        out += segment
    raise ValueError("JPEG encoder produced no scan")


def encode_probe_tiles() -> dict[Codec, bytes]:
    """The probe tiles, freshly encoded (scripts/make_probe_tiles.py stores them with their references)."""
    import imagecodecs

    pixels = probe_pixels()
    return {
        "jpeg_rgb": aperio_jpeg(pixels),
        "jpeg_ycbcr": bytes(imagecodecs.jpeg8_encode(pixels, level=90, subsampling=(2, 2))),
        "jpeg2000": bytes(imagecodecs.jpeg2k_encode(pixels, level=40, codecformat="J2K", reversible=False)),
    }


@functools.lru_cache(maxsize=1)
def probe_tiles() -> dict[Codec, tuple[bytes, TilePageMeta, np.ndarray]]:
    """The shipped probe tiles: (encoded bytes, level description, the `cpu` decoder's pixels) per family."""
    with np.load(PROBE_FILE) as stored:
        return {codec: (stored[f"{codec}_bytes"].tobytes(), probe_meta(codec), stored[f"{codec}_pixels"])
                for codec in _FAMILIES}


def compare(codec: Codec, got: np.ndarray | None, want: np.ndarray) -> ProbeResult:
    """The probe result of one decoded tile (None or a wrong shape counts as a total failure)."""
    if got is None or got.shape != want.shape:
        return ProbeResult(codec, 255.0, 255)
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    return ProbeResult(codec, round(float(diff.mean()), 3), int(diff.max()))
