"""Magnification and level math, the patch lattice and the tissue tests (upstream §4), in pure numpy.

Everything here matches upstream atlas-patch 1.1.0 numerically:

- `plan_geometry` is upstream's `_prepare_geometry` (§4.1) with `optimal_level` (§4.2);
- `lattice_positions` is the slide-global lattice of PR #27 (§4.3) with the hole test and the four-point test
  (§4.4), except that every position is emitted once, at its first occurrence in upstream's order;
- `point_polygon_test` gives exactly what `cv2.pointPolygonTest(contour, pt, measureDist=False)` gives for integer
  contours and integer points (-1 outside, 0 on an edge or vertex, +1 inside), for many points at once.

No cv2, no I/O: contours are found in `backends/contours.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import SlideError

__all__ = [
    "Contours",
    "Geometry",
    "GeometryError",
    "bounding_rect",
    "coords_array",
    "lattice_positions",
    "optimal_level",
    "plan_geometry",
    "point_polygon_test",
    "scale_contours",
]

# Upstream's tolerance for "this level is the target downsample" (§4.2).
_LEVEL_TOLERANCE = 0.01


class GeometryError(SlideError, ValueError):
    """The slide's magnification does not allow the requested geometry (unknown base, or target above base)."""


@dataclass(frozen=True)
class Geometry:
    """Where and how big patches are, in level-0 pixels and at the read level (upstream §4.1).

    Attributes:
        base_mag: The slide's integer base magnification.
        target_mag: The requested magnification.
        patch_size: Patch side at the target magnification (what encoders see).
        step_size: Stride at the target magnification.
        level: The pyramid level patches are read from.
        level_downsample: That level's downsample.
        ps_src: `round(patch_size * ds)`: the level-0 footprint used for the grid and the tissue tests.
        step_src: `round(step_size * ds)`: the level-0 stride.
        read_size: `max(1, round(ps_src / level_downsample))`: side of the region read at `level`.
        patch_size_level0: `patch_size * base_mag // target_mag`: stored as an H5 attribute only (it may differ
            from `ps_src` by one pixel, as upstream's does).
        overlap: `max(0, patch_size - step_size)`.
    """

    base_mag: int
    target_mag: int
    patch_size: int
    step_size: int
    level: int
    level_downsample: float
    ps_src: int
    step_src: int
    read_size: int
    patch_size_level0: int
    overlap: int

    @property
    def downsample(self) -> float:
        """`base_mag / target_mag`, the level-0 pixels per target pixel."""
        return self.base_mag / self.target_mag


@dataclass(frozen=True)
class Contours:
    """Tissue polygons and their holes, in one coordinate frame (mask pixels or level 0).

    Attributes:
        tissue: One (K, 2) int32 (x, y) polygon per tissue region, in OpenCV contour order.
        holes: `holes[i]` are the (K, 2) int32 hole polygons of `tissue[i]`.
    """

    tissue: tuple[np.ndarray, ...]
    holes: tuple[tuple[np.ndarray, ...], ...]

    def __post_init__(self) -> None:
        if len(self.tissue) != len(self.holes):
            raise ValueError(f"{len(self.tissue)} tissue contours but {len(self.holes)} hole groups")

    def __len__(self) -> int:
        return len(self.tissue)


def optimal_level(downsamples: Sequence[float], target: float) -> int:
    """The pyramid level upstream reads from for a target downsample (upstream §4.2, exactly).

    Args:
        downsamples: The level downsamples, increasing, level 0 first.
        target: The wanted downsample (`base_mag / target_mag`).

    Returns:
        The first level within 0.01 of `target`; otherwise, when `target >= downsamples[0]`, the last level of the
        leading run with downsample <= target; otherwise the first level with downsample >= target.
    """
    ds = [float(d) for d in downsamples] or [1.0]
    for level, d in enumerate(ds):
        if abs(d - target) < _LEVEL_TOLERANCE:
            return level
    if target >= ds[0]:  # the level before the first one above target (upstream stops there), else the last
        return next((level - 1 for level, d in enumerate(ds) if d > target), len(ds) - 1)
    return next((level for level, d in enumerate(ds) if d >= target), 0)


def plan_geometry(
    base_mag: int | None,
    target_mag: int,
    patch_size: int,
    step_size: int,
    level_downsamples: Sequence[float],
) -> Geometry:
    """Upstream's `_prepare_geometry` (§4.1): level, footprints and read size for one slide.

    Args:
        base_mag: The slide's base magnification, None when unknown.
        target_mag: The requested magnification.
        patch_size: Patch side at the target magnification.
        step_size: Stride at the target magnification.
        level_downsamples: The slide's level downsamples (`[1.0]` for plain images).

    Returns:
        The slide's `Geometry`.

    Raises:
        GeometryError: `base_mag` is None, or the target magnification exceeds it.
    """
    if base_mag is None:
        raise GeometryError("WSI base magnification is required for patch extraction but is unknown",
                            kind="no_magnification")
    if int(target_mag) > int(base_mag):
        raise GeometryError(
            f"target magnification {int(target_mag)}x exceeds the slide's base magnification {int(base_mag)}x"
        )
    if patch_size <= 0 or step_size <= 0 or target_mag <= 0:
        raise ValueError(f"patch size {patch_size}, step {step_size} and target {target_mag} must be > 0")
    ds = int(base_mag) / int(target_mag)
    downsamples = tuple(float(d) for d in level_downsamples) or (1.0,)
    level = optimal_level(downsamples, ds)
    ps_src = round(patch_size * ds)  # Python's round (half to even), as upstream
    return Geometry(
        base_mag=int(base_mag),
        target_mag=int(target_mag),
        patch_size=int(patch_size),
        step_size=int(step_size),
        level=level,
        level_downsample=downsamples[level],
        ps_src=ps_src,
        step_src=round(step_size * ds),
        read_size=max(1, round(ps_src / downsamples[level])),
        patch_size_level0=int(patch_size) * int(base_mag) // int(target_mag),
        overlap=max(0, int(patch_size) - int(step_size)),
    )


def scale_contours(c: Contours, sx: float, sy: float) -> Contours:
    """Scale contours as upstream does (§3.5 step 7): float32 multiply, then truncate to int32.

    Args:
        c: Contours, e.g. in mask pixels.
        sx: x factor, e.g. `W0 / mask_w`.
        sy: y factor, e.g. `H0 / mask_h`.

    Returns:
        The scaled contours.
    """
    factor = np.array([sx, sy], dtype=np.float32)

    def scale(poly: np.ndarray) -> np.ndarray:
        return (np.asarray(poly, dtype=np.float32).reshape(-1, 2) * factor).astype(np.int32)

    return Contours(
        tissue=tuple(scale(t) for t in c.tissue),
        holes=tuple(tuple(scale(h) for h in group) for group in c.holes),
    )


def bounding_rect(poly: np.ndarray) -> tuple[int, int, int, int]:
    """`cv2.boundingRect` of an integer polygon: (x, y, w, h) with `w = max_x - min_x + 1`.

    Args:
        poly: (K, 2) integer (x, y) points, K >= 1.

    Returns:
        (x, y, w, h).
    """
    p = np.asarray(poly).reshape(-1, 2)
    if p.shape[0] == 0:
        return (0, 0, 0, 0)
    lo = p.min(axis=0)
    hi = p.max(axis=0)
    return (int(lo[0]), int(lo[1]), int(hi[0] - lo[0] + 1), int(hi[1] - lo[1] + 1))


def coords_array(xy: np.ndarray, geometry: Geometry) -> np.ndarray:
    """The H5 `coords` rows (x, y, read_w, read_h, level) for level-0 top-left corners.

    Args:
        xy: (N, 2) level-0 (x, y) corners.
        geometry: The slide's geometry.

    Returns:
        (N, 5) int32.
    """
    xy = np.asarray(xy, dtype=np.int64).reshape(-1, 2)
    out = np.empty((xy.shape[0], 5), dtype=np.int32)
    out[:, :2] = xy
    out[:, 2:4] = geometry.read_size
    out[:, 4] = geometry.level
    return out


# --- the lattice ---------------------------------------------------------------------------------------------


def lattice_positions(contours: Contours, geometry: Geometry) -> np.ndarray:
    """Accepted level-0 patch corners in upstream 1.1.0's order, each position once (§4.3, §4.4).

    Per tissue contour (in order): the slide-global lattice over the contour's bounding box enlarged by one
    footprint, row-major; a candidate is rejected when its centre is strictly inside a hole of that contour,
    and accepted when any of the four quarter probes (or the centre, when the probe offset is 0) is inside or
    on the contour. A position already emitted for an earlier contour is not repeated.

    Args:
        contours: Tissue contours and holes in level-0 pixels (int32).
        geometry: The slide's geometry (`ps_src`, `step_src`).

    Returns:
        (N, 2) int64 (x, y).
    """
    parts = [
        _contour_positions(tissue, holes, geometry.ps_src, geometry.step_src)
        for tissue, holes in zip(contours.tissue, contours.holes, strict=True)
    ]
    if not parts:
        return np.zeros((0, 2), dtype=np.int64)
    if len(parts) == 1:  # one contour's lattice has no repeats
        return parts[0].astype(np.int64)
    return _first_occurrences(np.concatenate(parts, axis=0))


def _axis_starts(lo: int, extent: int, ps: int, step: int) -> np.ndarray:
    """Upstream 1.1.0's lattice along one axis: `range(max(0, ((lo - ps)//step)*step), lo + extent, step)`."""
    return np.arange(max(0, ((lo - ps) // step) * step), lo + extent, step, dtype=np.int64)


def _contour_positions(tissue: np.ndarray, holes: Sequence[np.ndarray], ps: int, step: int) -> np.ndarray:
    """The accepted corners of one tissue contour, row-major."""
    x0, y0, w, h = bounding_rect(tissue)
    xs = _axis_starts(x0, w, ps, step)
    ys = _axis_starts(y0, h, ps, step)
    gx, gy = np.meshgrid(xs, ys)  # row-major: x varies fastest, as upstream's inner loop
    corners = np.stack([gx.ravel(), gy.ravel()], axis=1)
    centres = corners + ps // 2
    keep = _any_probe_touches(tissue, centres, int((ps // 2) * 0.5))
    for hole in holes:
        idx = np.flatnonzero(keep)
        inside = point_polygon_test(hole, centres[idx, 0], centres[idx, 1]) > 0
        keep[idx[inside]] = False
    return corners[keep]


def _any_probe_touches(poly: np.ndarray, centres: np.ndarray, s: int) -> np.ndarray:
    """Upstream's four-point test: any of `c ± (s, s)`, `c ± (s, -s)` inside or on `poly` (centre only if s == 0).

    Probes are tested one after another on the candidates not yet accepted: most candidates inside tissue are
    settled by the first probe, which saves work without changing the result of an "any".
    """
    if s == 0:
        return np.asarray(point_polygon_test(poly, centres[:, 0], centres[:, 1]) >= 0, dtype=bool)
    accepted = np.zeros(centres.shape[0], dtype=bool)
    for dx, dy in ((-s, -s), (s, s), (s, -s), (-s, s)):
        todo = np.flatnonzero(~accepted)
        if todo.size == 0:
            break
        hit = point_polygon_test(poly, centres[todo, 0] + dx, centres[todo, 1] + dy) >= 0
        accepted[todo[hit]] = True
    return accepted


def _first_occurrences(xy: np.ndarray) -> np.ndarray:
    """Drop repeated rows, keeping each at its first position (positions are non-negative lattice points)."""
    if xy.shape[0] < 2:
        return xy.astype(np.int64)
    key = xy[:, 1].astype(np.int64) * (int(xy[:, 0].max()) + 1) + xy[:, 0]
    _, first = np.unique(key, return_index=True)  # return_index sorts stably: the first occurrence wins
    return xy[np.sort(first)].astype(np.int64)


# --- point in polygon, exactly as cv2.pointPolygonTest(measureDist=False) on integers ------------------------


def point_polygon_test(poly: np.ndarray, qx: np.ndarray, qy: np.ndarray) -> np.ndarray:
    """`cv2.pointPolygonTest(poly, (x, y), False)` for many integer points at once, bit-exact.

    OpenCV's integer branch counts the edges that cross the horizontal ray to the right of the point, with a
    half-open rule on y (an edge counts for rows `min_y <= y < max_y` when its crossing is strictly right of the
    point), and returns 0 for any point on an edge or vertex. Both are computed here per probe row with exact
    integer arithmetic: crossings become integer keys `ceil(x_cross) - 1` (`x_cross > px` iff `key >= px`) and
    edges on a row become closed integer intervals, then points are classified with `searchsorted`.
    Self-intersecting and degenerate polygons (one point, back-and-forth lines) behave as in OpenCV.

    Args:
        poly: (K, 2) integer (x, y) polygon.
        qx: Integer x of the points.
        qy: Integer y of the points (same shape as `qx`).

    Returns:
        int8 array shaped like `qx`: -1 outside, 0 on the boundary, 1 inside.
    """
    qx = np.asarray(qx, dtype=np.int64)
    qy = np.asarray(qy, dtype=np.int64)
    shape = qx.shape
    qx, qy = qx.ravel(), qy.ravel()
    p = np.asarray(poly, dtype=np.int64).reshape(-1, 2)
    if p.shape[0] == 0 or qx.size == 0:
        return np.full(shape, -1, dtype=np.int8)
    rows, q_row = _row_index(qy)
    edges = _oriented_edges(p)
    cross_row, cross_key = _crossings(edges, rows)
    on_row, on_lo, on_hi = _boundary_intervals(edges, rows)
    right = _count_at_least(cross_row, cross_key, q_row, qx)
    # on an edge: more intervals start at or before x than end before x
    on_edge = _count_below(on_row, on_lo, q_row, qx + 1) - _count_below(on_row, on_hi, q_row, qx) > 0
    out = np.where(right % 2 == 1, 1, -1).astype(np.int8)
    out[on_edge] = 0
    return out.reshape(shape)


def _row_index(qy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct rows, each query's index into them); a lookup table beats sorting when rows are dense."""
    lo, hi = int(qy.min()), int(qy.max())
    if hi - lo > 8 * qy.size + 4096:
        rows, inverse = np.unique(qy, return_inverse=True)
        return rows, inverse.ravel()
    present = np.zeros(hi - lo + 1, dtype=bool)
    present[qy - lo] = True
    rank = np.cumsum(present) - 1
    return np.flatnonzero(present) + lo, rank[qy - lo]


@dataclass(frozen=True)
class _Edges:
    """Polygon edges oriented bottom-up: (xa, ya) has the smaller y; (xb, yb) the larger (or equal) y."""

    xa: np.ndarray
    ya: np.ndarray
    xb: np.ndarray
    yb: np.ndarray


def _oriented_edges(p: np.ndarray) -> _Edges:
    """The closed polygon's edges (last vertex to first included), each oriented so that ya <= yb."""
    a = np.roll(p, 1, axis=0)
    swap = a[:, 1] > p[:, 1]
    lo = np.where(swap[:, None], p, a)
    hi = np.where(swap[:, None], a, p)
    return _Edges(xa=lo[:, 0], ya=lo[:, 1], xb=hi[:, 0], yb=hi[:, 1])


def _edge_row_pairs(rows: np.ndarray, lo: np.ndarray, hi: np.ndarray, closed: bool) -> tuple[np.ndarray, ...]:
    """All (edge, row) index pairs with `lo <= rows[row] < hi` (or `<= hi` when closed)."""
    start = np.searchsorted(rows, lo, side="left")
    end = np.searchsorted(rows, hi, side="right" if closed else "left")
    n = np.maximum(end - start, 0)
    edge = np.repeat(np.arange(lo.size), n)
    offset = np.arange(edge.size) - np.repeat(np.cumsum(n) - n, n)
    return edge, start[edge] + offset


def _crossings(e: _Edges, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row index, key) of every ray crossing: non-horizontal edges, rows in [ya, yb), key = ceil(x) - 1."""
    edge, row = _edge_row_pairs(rows, e.ya, e.yb, closed=False)  # horizontal edges give empty ranges
    num, dy = _crossing_fraction(e, edge, rows[row])
    return row, -((-num) // dy) - 1


def _crossing_fraction(e: _Edges, edge: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The crossing x of `edge` at row `y` as an exact fraction num / dy (dy > 0)."""
    xa, ya = e.xa[edge], e.ya[edge]
    dy = e.yb[edge] - ya
    return xa * dy + (y - ya) * (e.xb[edge] - xa), dy


def _boundary_intervals(e: _Edges, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row index, lo, hi) closed integer x intervals of the boundary on each probe row."""
    flat = e.ya == e.yb
    f_edge, f_row = _edge_row_pairs(rows, e.ya[flat], e.yb[flat], closed=True)
    f_xa, f_xb = e.xa[flat][f_edge], e.xb[flat][f_edge]
    s_idx = np.flatnonzero(~flat)
    s_edge, s_row = _edge_row_pairs(rows, e.ya[s_idx], e.yb[s_idx], closed=True)
    num, dy = _crossing_fraction(e, s_idx[s_edge], rows[s_row])
    exact = num % dy == 0  # only lattice points lie on a sloped edge
    s_x = num[exact] // dy[exact]
    row = np.concatenate([f_row, s_row[exact]])
    lo = np.concatenate([np.minimum(f_xa, f_xb), s_x])
    hi = np.concatenate([np.maximum(f_xa, f_xb), s_x])
    return row, lo, hi


def _count_at_least(key_row: np.ndarray, keys: np.ndarray, q_row: np.ndarray, qx: np.ndarray) -> np.ndarray:
    """For each query, how many keys on its row are >= its x."""
    per_row = np.bincount(key_row, minlength=int(q_row.max()) + 1)
    return per_row[q_row] - _count_below(key_row, keys, q_row, qx)


def _count_below(key_row: np.ndarray, keys: np.ndarray, q_row: np.ndarray, qx: np.ndarray) -> np.ndarray:
    """For each query, how many keys on its row are < its x.

    Rows and keys are folded into one sorted int64 (`row * span + key - kmin`); query x values are clipped into
    the key range first, which keeps them inside their row's band without changing the count.
    """
    if keys.size == 0:
        return np.zeros(q_row.shape, dtype=np.int64)
    kmin, kmax = int(keys.min()), int(keys.max())
    span = kmax - kmin + 2
    folded = np.sort(key_row.astype(np.int64) * span + (keys - kmin))
    row_start = np.searchsorted(folded, np.arange(int(q_row.max()) + 1, dtype=np.int64) * span, side="left")
    q = q_row.astype(np.int64) * span + (np.clip(qx, kmin, kmax + 1) - kmin)
    return np.searchsorted(folded, q, side="left") - row_start[q_row]
