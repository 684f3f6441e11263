"""A plain, loop-based statement of upstream atlas-patch 1.1.0's coordinate rules, for tests only.

Written from the behaviour reference (upstream-atlaspatch.md §3.5, §4.1-§4.4), one candidate at a time with
`cv2.boundingRect` and `cv2.pointPolygonTest`, as upstream does. It is deliberately slow and obvious; the
package's vectorised implementation must give the same rows in the same order. The only departure from
upstream is the one atlaspatch-stream makes on purpose: a position is emitted once, at its first occurrence.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np


def reference_optimal_level(downsamples: Sequence[float], target: float) -> int:
    """§4.2, as a straight loop."""
    for i, d in enumerate(downsamples):
        if abs(d - target) < 0.01:
            return i
    if target >= downsamples[0]:
        level = 0
        for i, d in enumerate(downsamples):
            if d > target:
                break
            level = i
        return level
    for i, d in enumerate(downsamples):
        if d >= target:
            return i
    return 0


def reference_mask_to_contours(
    mask: np.ndarray, tissue_thresh: float, hole_min_area: int = 16, max_n_holes: int = 10
) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """§3.5 steps 1-5: (tissue contours, holes per tissue), OpenCV (K, 1, 2) int32 arrays."""
    binary = (np.asarray(mask) > 0.5).astype(np.uint8) * 255
    contours, hierarchy = cv2.findContours(binary, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if hierarchy is None:
        return [], []
    hierarchy = hierarchy.reshape(-1, 4)
    total_area = binary.shape[0] * binary.shape[1]
    tissue_idx, hole_list = [], []
    for i, c in enumerate(contours):
        area = cv2.contourArea(c)
        if hierarchy[i][3] == -1:
            if area >= tissue_thresh * total_area:
                tissue_idx.append(i)
        elif area >= hole_min_area:
            hole_list.append((area, i))
    # Global cap: the largest holes over the whole slide; equal areas keep contour order.
    hole_list.sort(key=lambda t: (-t[0], t[1]))
    kept = sorted(i for _, i in hole_list[:max_n_holes])
    tissue = [contours[i] for i in tissue_idx]
    holes = [[contours[h] for h in kept if hierarchy[h][3] == t] for t in tissue_idx]
    return tissue, holes


def reference_scale(contour: np.ndarray, sx: float, sy: float) -> np.ndarray:
    """§3.5 step 7: float32 multiply, truncate to int32."""
    return (contour.astype(np.float32) * np.array([sx, sy], dtype=np.float32)).astype(np.int32)


def reference_positions(
    tissue: Sequence[np.ndarray],
    holes: Sequence[Sequence[np.ndarray]],
    ps: int,
    step: int,
    dedupe: bool = True,
) -> list[tuple[int, int]]:
    """§4.3-§4.4 on level-0 contours: upstream's candidate loop, then (unless `dedupe` is False, which gives
    upstream 1.1.0's raw rows) first-occurrence de-duplication."""
    rows: list[tuple[int, int]] = []
    for contour, contour_holes in zip(tissue, holes, strict=True):
        x0, y0, w, h = cv2.boundingRect(contour)
        for y in range(max(0, ((y0 - ps) // step) * step), y0 + h, step):
            for x in range(max(0, ((x0 - ps) // step) * step), x0 + w, step):
                if _in_tissue(contour, contour_holes, x, y, ps):
                    rows.append((x, y))
    if not dedupe:
        return rows
    seen: set[tuple[int, int]] = set()
    unique = []
    for row in rows:
        if row not in seen:
            seen.add(row)
            unique.append(row)
    return unique


def _in_tissue(contour: np.ndarray, holes: Sequence[np.ndarray], x: int, y: int, ps: int) -> bool:
    cx, cy = x + ps // 2, y + ps // 2
    for hole in holes:
        if cv2.pointPolygonTest(hole, (float(cx), float(cy)), False) > 0:
            return False
    s = int((ps // 2) * 0.5)
    probes = (
        [(cx, cy)] if s == 0 else [(cx - s, cy - s), (cx + s, cy + s), (cx + s, cy - s), (cx - s, cy + s)]
    )
    return any(cv2.pointPolygonTest(contour, (float(px), float(py)), False) >= 0 for px, py in probes)


def reference_coords(
    mask: np.ndarray,
    level0_size: tuple[int, int],
    base_mag: int,
    target_mag: int,
    patch_size: int,
    step_size: int,
    level_downsamples: Sequence[float],
    tissue_thresh: float = 0.0,
) -> np.ndarray:
    """The whole chain, mask to `coords` (N, 5) int32, as upstream 1.1.0 computes it (minus duplicates)."""
    ds = base_mag / target_mag
    level = reference_optimal_level(list(level_downsamples), ds)
    ps_src = round(patch_size * ds)
    step_src = round(step_size * ds)
    read = max(1, round(ps_src / level_downsamples[level]))
    tissue, holes = reference_mask_to_contours(mask, tissue_thresh)
    sx, sy = level0_size[0] / mask.shape[1], level0_size[1] / mask.shape[0]
    tissue = [reference_scale(c, sx, sy) for c in tissue]
    holes = [[reference_scale(h, sx, sy) for h in group] for group in holes]
    rows = [(x, y, read, read, level) for x, y in reference_positions(tissue, holes, ps_src, step_src)]
    return np.array(rows, dtype=np.int32).reshape(-1, 5)


# --- random masks for the comparison tests ------------------------------------------------------------------


def random_mask(seed: int, shape: tuple[int, int] = (96, 128)) -> np.ndarray:
    """A bool mask drawn from `seed`: filled ellipses, holes cut in them, islands in the holes, 1-px lines and dots.

    Every third seed has tissue along the top edge and every fourth along the right edge, so contours touching
    the image border are covered.
    """
    rng = np.random.default_rng(seed)
    h, w = shape
    m = np.zeros(shape, dtype=np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        centre, axes = _ellipse(m, rng, 255, (int(rng.integers(0, w)), int(rng.integers(0, h))), (0.15, 0.45))
        for _ in range(int(rng.integers(1, 5))):
            inside = (
                centre[0] + int(rng.integers(-axes[0], axes[0] + 1)) // 2,
                centre[1] + int(rng.integers(-axes[1], axes[1] + 1)) // 2,
            )
            hole, hole_axes = _ellipse(m, rng, 0, inside, (0.03, 0.12))  # a hole, or a bite out of the edge
            if rng.random() < 0.6 and min(hole_axes) > 3:
                _ellipse(m, rng, 255, hole, (0.005, 0.02))  # an island inside the hole
    for _ in range(int(rng.integers(0, 3))):
        p1 = tuple(int(v) for v in rng.integers(0, [w, h]))
        p2 = tuple(int(v) for v in rng.integers(0, [w, h]))
        cv2.line(m, p1, p2, 255, 1)  # thin shapes: one pixel wide, traced out and back by findContours
    for _ in range(int(rng.integers(0, 4))):
        m[int(rng.integers(0, h)), int(rng.integers(0, w))] = 255  # single-pixel contours
    if seed % 3 == 0:
        m[: int(rng.integers(1, h // 3)), :] = 255
    if seed % 4 == 1:
        m[:, w - int(rng.integers(1, w // 4)) :] = 255
    return m > 0


def _ellipse(
    m: np.ndarray, rng: np.random.Generator, value: int, centre: tuple[int, int], size: tuple[float, float]
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Fill a randomly sized and rotated ellipse at `centre`; returns (centre, axes)."""
    h, w = m.shape
    axes = (int(w * rng.uniform(*size)) + 1, int(h * rng.uniform(*size)) + 1)
    cv2.ellipse(m, centre, axes, float(rng.uniform(0, 180)), 0, 360, value, -1)
    return centre, axes
