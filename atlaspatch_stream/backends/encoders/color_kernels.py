"""The compiled CPU kernels of `color_stats` (numba): one pass over each patch's pixels, and the colours whose hue
lies exactly on a bin edge.

Imported only when `color_stats` runs on a CPU, at its first batch (the encoder's warm-up). numba compiles each
kernel once, in about 3 s, and caches the machine code beside this file (or in its user cache), so later processes
load it in a fraction of a second. Every kernel releases the GIL, so `cpu_color_stats` runs parts of a batch on
several threads at once.
"""

from __future__ import annotations

import numpy as np
from numba import njit

BLOCK = 256  # pixels summed in float64 on their own before the patch's totals: short sums, small rounding


@njit(cache=True, inline="always")
def hue_numerator(r: int, g: int, b: int, hi: int, chroma: int) -> int:
    """n6, with hue = n6 / (6 chroma): g - b (plus 6 chroma when negative) where red is the maximum, b - r + 2 chroma
    where green is, r - g + 4 chroma where blue is. Where two channels tie for the maximum both give the same n6."""
    red = g - b + 6 * chroma if g < b else g - b
    return red if r == hi else (b - r + 2 * chroma if g == hi else r - g + 4 * chroma)


@njit(cache=True, nogil=True)
def patch_sums(pixels: np.ndarray, sat_value: np.ndarray, sat_bin: np.ndarray, edge_codes: np.ndarray,
               edge_bins: np.ndarray, levels: np.ndarray, hue: np.ndarray, sat: np.ndarray) -> None:
    """Each patch's counts and sums, in one pass over its pixels.

    Args:
        pixels: uint8 (B, N * 3), each row one patch's RGB pixels.
        sat_value, sat_bin: float32 and uint8 (65536,), the saturation and its bin of each (max, min) pair, at
            max * 256 + min.
        edge_codes, edge_bins: sorted int32 codes r<<16 | g<<8 | b of the colours whose hue lies on a bin edge
            (`edge_colours`), and the bin the torch formula gives each.
        levels: int32 (B, 4, 256), zeroed: gets the counts of R, G, B and max levels.
        hue, sat: float64 (B, 2 + bins), zeroed: get the sum, the sum of squares and the bin counts.

    Hue is n6 / (6 chroma) divided in float32 (the exact rational rounded once), 0 for grey; its bin is
    floor(8 hue), except on a bin edge, where float32 rounding of the torch formula decides between the two
    neighbouring bins. Sums run in float64 over blocks of `BLOCK` pixels: the sums of hue and saturation are exact
    (multiples of 2**-34 below 2**19), their squares rounded within a block and once per block.
    """
    n = pixels.shape[1] // 3
    for i in range(pixels.shape[0]):
        row, counts = pixels[i], levels[i]
        hue_bins, sat_bins = np.zeros(hue.shape[1] - 2, np.int64), np.zeros(sat.shape[1] - 2, np.int64)
        hue_sum, hue_squares, sat_sum, sat_squares = 0.0, 0.0, 0.0, 0.0
        for start in range(0, n, BLOCK):
            h1, h2, s1, s2 = 0.0, 0.0, 0.0, 0.0
            for j in range(start, min(start + BLOCK, n)):
                r, g, b = np.int32(row[3 * j]), np.int32(row[3 * j + 1]), np.int32(row[3 * j + 2])
                hi, lo = max(r, g, b), min(r, g, b)
                counts[0, r] += 1
                counts[1, g] += 1
                counts[2, b] += 1
                counts[3, hi] += 1
                key = hi * 256 + lo
                s = np.float64(sat_value[key])
                s1 += s
                s2 += s * s
                sat_bins[sat_bin[key]] += 1
                chroma = hi - lo
                n6 = hue_numerator(r, g, b, hi, chroma)
                h = np.float32(n6) / np.float32(max(6 * chroma, 1))
                eighths = h * np.float32(8.0)
                k = np.int32(eighths)
                if eighths == k and n6 > 0:
                    k = np.int32(edge_bins[np.searchsorted(edge_codes, (r << 16) | (g << 8) | b)])
                hue_bins[k] += 1
                w = np.float64(h)
                h1 += w
                h2 += w * w
            hue_sum, hue_squares, sat_sum, sat_squares = hue_sum + h1, hue_squares + h2, sat_sum + s1, sat_squares + s2
        hue[i, 0], hue[i, 1], sat[i, 0], sat[i, 1] = hue_sum, hue_squares, sat_sum, sat_squares
        hue[i, 2:] = hue_bins
        sat[i, 2:] = sat_bins


@njit(cache=True)
def _on_edge(code: int) -> bool:
    r, g, b = code >> 16, (code >> 8) & 255, code & 255
    hi = max(r, g, b)
    chroma = hi - min(r, g, b)
    n6 = hue_numerator(r, g, b, hi, chroma)
    return n6 > 0 and (4 * n6) % (3 * chroma) == 0


@njit(cache=True)
def edge_colours() -> np.ndarray:
    """Sorted int32 codes r<<16 | g<<8 | b of every colour whose hue lies exactly on a bin edge: 8 n6 / (6 chroma) an
    integer with n6 > 0, about 97k colours. Elsewhere the bin is floor(8 hue) whatever the rounding: the nearest
    edge is at least 1 / (24 chroma) away."""
    found = 0
    for code in range(1 << 24):
        found += _on_edge(code)
    codes = np.empty(found, np.int32)
    found = 0
    for code in range(1 << 24):
        if _on_edge(code):
            codes[found] = code
            found += 1
    return codes
