"""Tissue mask -> contours -> patch coordinates (upstream §3.5 and §4), with OpenCV's contour finder.

The contour rules are upstream's `mask_to_contours`; the lattice and tissue tests are the pure-numpy
`geometry.lattice_positions`.

Hole cap: holes that pass the area filter are ranked over the whole slide by area (largest first; equal areas
in OpenCV contour order) and only the first `max_n_holes` survive; then holes whose tissue contour was dropped
by `tissue_thresh` are discarded. With the CLI's default `tissue_thresh` of 0 no tissue is dropped, so the
order of these two steps only matters for positive thresholds.
"""

from __future__ import annotations

import cv2
import numpy as np

from ..geometry import Contours, Geometry, coords_array, lattice_positions, scale_contours

__all__ = ["mask_to_contours", "plan_coordinates"]


def mask_to_contours(
    mask: np.ndarray, tissue_thresh: float, hole_min_area: int = 16, max_n_holes: int = 10
) -> Contours:
    """Upstream's `mask_to_contours` (§3.5): tissue contours and their holes, in mask pixels.

    Args:
        mask: (H, W) tissue mask: bool, or numbers where > 0.5 is tissue.
        tissue_thresh: Minimum tissue contour area as a fraction of the whole mask area (H * W).
        hole_min_area: Minimum hole area in mask pixels.
        max_n_holes: How many holes survive over the whole slide (the largest ones).

    Returns:
        Contours in mask pixels; tissue in OpenCV order, holes grouped under their tissue.
    """
    binary = _binarise(mask)
    found, hierarchy = cv2.findContours(binary, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if hierarchy is None or len(found) == 0:
        return Contours(tissue=(), holes=())
    parents = np.asarray(hierarchy).reshape(-1, 4)[:, 3]
    areas = [float(cv2.contourArea(c)) for c in found]
    min_tissue = tissue_thresh * binary.shape[0] * binary.shape[1]
    tissue = [i for i, p in enumerate(parents) if p < 0 and areas[i] >= min_tissue]
    holes = _capped_holes(parents, areas, hole_min_area, max_n_holes)
    return Contours(
        tissue=tuple(_points(found[i]) for i in tissue),
        holes=tuple(tuple(_points(found[h]) for h in holes if parents[h] == t) for t in tissue),
    )


def _binarise(mask: np.ndarray) -> np.ndarray:
    """`mask > 0.5` as uint8 0/255 (a bool True counts as tissue)."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"a tissue mask must be 2-D, got shape {m.shape}")
    if m.size == 0:
        raise ValueError(f"the tissue mask is empty (shape {m.shape})")
    on = m if m.dtype == np.bool_ else m > 0.5
    return np.ascontiguousarray(on, dtype=np.uint8) * np.uint8(255)


def _capped_holes(parents: np.ndarray, areas: list[float], min_area: int, cap: int) -> list[int]:
    """Indices of the holes that survive: area >= min_area, then the `cap` largest (ties in contour order)."""
    candidates = [i for i, p in enumerate(parents) if p >= 0 and areas[i] >= min_area]
    ranked = sorted(candidates, key=lambda i: (-areas[i], i))[: max(0, cap)]
    return sorted(ranked)


def _points(contour: np.ndarray) -> np.ndarray:
    """An OpenCV contour (K, 1, 2) as a (K, 2) int32 polygon."""
    return np.ascontiguousarray(contour.reshape(-1, 2), dtype=np.int32)


def plan_coordinates(
    mask: np.ndarray,
    level0_size: tuple[int, int],
    geometry: Geometry,
    tissue_thresh: float,
    hole_min_area: int = 16,
    max_n_holes: int = 10,
) -> tuple[Contours, np.ndarray]:
    """Mask -> contours -> the H5 `coords` of one slide (upstream §3.5 and §4, 1.1.0 lattice, no duplicates).

    Args:
        mask: (h, w) tissue mask at thumbnail resolution.
        level0_size: The slide's level-0 (width, height).
        geometry: The slide's geometry from `plan_geometry`.
        tissue_thresh: Minimum tissue contour area as a fraction of the mask area.
        hole_min_area: Minimum hole area in mask pixels.
        max_n_holes: Global cap on the number of holes.

    Returns:
        (contours in mask pixels, coords (N, 5) int32 = x, y, read_w, read_h, level).
    """
    contours = mask_to_contours(mask, tissue_thresh, hole_min_area, max_n_holes)
    mask_h, mask_w = np.asarray(mask).shape[:2]
    width0, height0 = level0_size
    level0 = scale_contours(contours, width0 / mask_w, height0 / mask_h)
    return contours, coords_array(lattice_positions(level0, geometry), geometry)
