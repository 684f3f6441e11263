"""Pure geometry: level choice, footprints, scaling, point-in-polygon and the lattice against upstream's rules.

The reference is `tests/reference_upstream.py`, a loop over candidates calling `cv2.boundingRect` and
`cv2.pointPolygonTest` as upstream does; the package's vectorised code must agree row for row.
"""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest

from atlaspatch_stream.errors import SlideError
from atlaspatch_stream.geometry import (
    Contours,
    GeometryError,
    bounding_rect,
    coords_array,
    lattice_positions,
    optimal_level,
    plan_geometry,
    point_polygon_test,
    scale_contours,
)
from tests.reference_upstream import (
    random_mask,
    reference_mask_to_contours,
    reference_optimal_level,
    reference_positions,
    reference_scale,
)

# (base, target, patch, step, level downsamples, level-0 size for a 128 x 96 mask)
COMBOS = {
    "40to20": (40, 20, 256, 256, (1.0, 4.0, 16.0), (25607, 18243)),
    "40to15": (40, 15, 256, 256, (1.0, 4.0, 16.0), (30011, 22007)),
    "overlap": (20, 20, 64, 32, (1.0,), (1501, 1203)),
    "sparse": (40, 10, 32, 48, (1.0, 2.0, 4.0), (8001, 6007)),
    "tiny_patch_centre_only": (20, 20, 3, 2, (1.0,), (100, 70)),
    "one_pixel_patch": (20, 20, 1, 1, (1.0,), (51, 38)),
    "small_probe": (40, 40, 8, 8, (1.0,), (385, 290)),
    "80to30": (80, 30, 100, 70, (1.0, 2.0, 8.0), (9000, 7000)),
}


# --- magnification and level math ---------------------------------------------------------------------------


def test_worked_examples_of_the_reference() -> None:
    """A 40x slide with levels [1, 4, 16]: 20x, 10x, 5x and 15x at 256 give upstream's §4.1 numbers."""
    levels = (1.0, 4.0, 16.0)
    g20 = plan_geometry(40, 20, 256, 256, levels)
    assert (g20.level, g20.read_size, g20.ps_src, g20.patch_size_level0) == (0, 512, 512, 512)
    assert coords_array(np.array([[10, 20]]), g20).tolist() == [[10, 20, 512, 512, 0]]
    g10 = plan_geometry(40, 10, 256, 256, levels)
    assert (g10.level, g10.read_size) == (1, 256)
    g5 = plan_geometry(40, 5, 256, 256, levels)
    assert (g5.level, g5.read_size) == (1, 512)
    g15 = plan_geometry(40, 15, 256, 256, levels)
    assert (g15.ps_src, g15.patch_size_level0, g15.step_src, g15.level) == (683, 682, 683, 0)
    assert g15.read_size == 683


def test_footprints_use_pythons_half_to_even_rounding() -> None:
    """ps_src = round(p * ds) with Python's round: 255 at ds 1.5 is 382.5 -> 382, 257 -> 385.5 -> 386."""
    assert plan_geometry(30, 20, 255, 255, (1.0,)).ps_src == 382
    assert plan_geometry(30, 20, 257, 257, (1.0,)).ps_src == 386
    g = plan_geometry(40, 20, 256, 128, (1.0, 4.0))
    assert (g.step_src, g.overlap, g.downsample) == (256, 128, 2.0)
    assert plan_geometry(40, 20, 256, 300, (1.0,)).overlap == 0


def test_read_size_never_below_one() -> None:
    """A 1-px patch read from a coarse level still reads one pixel."""
    g = plan_geometry(40, 10, 1, 1, (1.0, 4.0, 16.0))
    assert g.level == 1 and g.ps_src == 4 and g.read_size == 1
    g = plan_geometry(40, 5, 1, 1, (1.0, 4.0, 16.0))
    assert g.ps_src == 8 and g.read_size == 2


@pytest.mark.parametrize(
    ("downsamples", "target", "expected"),
    [
        ((1.0, 4.0, 16.0), 2.0, 0),
        ((1.0, 4.0, 16.0), 4.0, 1),
        ((1.0, 4.0, 16.0), 4.005, 1),  # within 0.01: that level
        ((1.0, 4.0, 16.0), 8.0, 1),  # last level <= target
        ((1.0, 4.0, 16.0), 100.0, 2),
        ((1.0, 4.000012, 16.00024), 4.0, 1),  # real pyramids are never exact
        ((2.0, 4.0), 1.0, 0),  # target below level 0: first level >= target
        ((1.0, 3.0, 2.0, 8.0), 2.5, 0),  # non-increasing: the scan stops at the first level above target
    ],
)
def test_optimal_level_rules(downsamples: tuple[float, ...], target: float, expected: int) -> None:
    """Each branch of §4.2 picks the level upstream picks."""
    assert optimal_level(downsamples, target) == expected
    assert reference_optimal_level(list(downsamples), target) == expected


def test_optimal_level_matches_reference_on_random_pyramids() -> None:
    """Random increasing pyramids and targets: same level as the loop reference."""
    rng = np.random.default_rng(7)
    for _ in range(500):
        ds = np.cumprod(np.r_[1.0, rng.uniform(1.0, 4.5, size=int(rng.integers(0, 5)))])
        ds = ds * rng.choice([1.0, 1.0 + rng.uniform(-0.02, 0.02)])
        target = float(rng.choice([rng.uniform(0.5, 70.0), rng.choice(ds) + rng.uniform(-0.012, 0.012)]))
        assert optimal_level(tuple(ds), target) == reference_optimal_level(list(ds), target)


def test_missing_or_too_low_base_magnification_is_a_slide_error() -> None:
    """No base magnification, or a target above it, raises GeometryError (a SlideError and a ValueError)."""
    with pytest.raises(GeometryError, match="base magnification"):
        plan_geometry(None, 20, 256, 256, (1.0,))
    with pytest.raises(GeometryError, match="40x exceeds .* 20x"):
        plan_geometry(20, 40, 256, 256, (1.0,))
    assert issubclass(GeometryError, SlideError) and issubclass(GeometryError, ValueError)
    assert plan_geometry(20, 20, 256, 256, ()).level_downsample == 1.0  # plain images: [1.0]


# --- scaling and bounding boxes -------------------------------------------------------------------------------


def test_scale_contours_truncates_a_float32_product() -> None:
    """x * (W0/w) and y * (H0/h) in float32, truncated, exactly as the reference computes it."""
    rng = np.random.default_rng(1)
    poly = rng.integers(0, 1024, size=(200, 2)).astype(np.int32)
    c = Contours(tissue=(poly,), holes=((poly[:5],),))
    sx, sy = 98765 / 1024, 54321 / 1023
    out = scale_contours(c, sx, sy)
    assert out.tissue[0].dtype == np.int32
    np.testing.assert_array_equal(out.tissue[0], reference_scale(poly, sx, sy))
    np.testing.assert_array_equal(out.holes[0][0], reference_scale(poly[:5], sx, sy))
    # float32 really differs from float64 here, so the test would notice a float64 product
    assert not np.array_equal(out.tissue[0], (poly * np.array([sx, sy])).astype(np.int32))


def test_bounding_rect_is_cv2s() -> None:
    """Random integer point sets, single points included: same (x, y, w, h) as cv2.boundingRect."""
    rng = np.random.default_rng(2)
    for _ in range(200):
        poly = rng.integers(0, 5000, size=(int(rng.integers(1, 30)), 2)).astype(np.int32)
        assert bounding_rect(poly) == tuple(cv2.boundingRect(poly))


# --- point in polygon -----------------------------------------------------------------------------------------


def test_point_polygon_test_is_cv2s_on_random_polygons() -> None:
    """Random (often self-intersecting, sometimes degenerate) integer polygons probed on a dense grid that covers
    edges and vertices: the result equals cv2.pointPolygonTest(measureDist=False) point for point."""
    rng = np.random.default_rng(3)
    gy, gx = np.mgrid[-2:23, -2:23]
    for _ in range(150):
        poly = rng.integers(0, 21, size=(int(rng.integers(1, 14)), 2)).astype(np.int32)
        got = point_polygon_test(poly, gx, gy)
        ref = [
            cv2.pointPolygonTest(poly, (float(x), float(y)), False)
            for x, y in zip(gx.ravel(), gy.ravel(), strict=True)
        ]
        np.testing.assert_array_equal(got.ravel(), np.array(ref, dtype=np.int8))


def test_point_polygon_test_on_large_level0_contours() -> None:
    """Scaled CHAIN_APPROX_NONE contours with level-0 sized coordinates and random probes: same as cv2."""
    tissue, _ = reference_mask_to_contours(random_mask(11), 0.0)
    rng = np.random.default_rng(4)
    for contour in tissue:
        poly = reference_scale(contour, 123.4, 98.7).reshape(-1, 2)
        x0, y0, w, h = cv2.boundingRect(poly)
        qx = rng.integers(x0 - 50, x0 + w + 50, size=300)
        qy = rng.integers(y0 - 50, y0 + h + 50, size=300)
        qx[:50], qy[:50] = poly[rng.integers(0, len(poly), 50)].T  # vertices: on the contour
        ref = [cv2.pointPolygonTest(poly, (float(x), float(y)), False) for x, y in zip(qx, qy, strict=True)]
        np.testing.assert_array_equal(point_polygon_test(poly, qx, qy), np.array(ref, dtype=np.int8))


# --- the lattice ----------------------------------------------------------------------------------------------


def _level0_contours(mask: np.ndarray, size0: tuple[int, int]) -> tuple[Contours, list, list]:
    """Reference contours of `mask` scaled to level 0, as package Contours and as cv2 arrays."""
    tissue, holes = reference_mask_to_contours(mask, 0.0)
    sx, sy = size0[0] / mask.shape[1], size0[1] / mask.shape[0]
    tissue0 = [reference_scale(c, sx, sy) for c in tissue]
    holes0 = [[reference_scale(h, sx, sy) for h in group] for group in holes]
    contours = Contours(
        tissue=tuple(t.reshape(-1, 2) for t in tissue0),
        holes=tuple(tuple(h.reshape(-1, 2) for h in group) for group in holes0),
    )
    return contours, tissue0, holes0


@pytest.mark.parametrize("combo", sorted(COMBOS))
@pytest.mark.parametrize("seed", range(24))
def test_lattice_matches_upstream_loop(seed: int, combo: str) -> None:
    """Random masks (blobs with holes and islands, 1-px lines, dots, border contact), scaled to level 0 with
    non-integer factors; for each magnification/patch/step combination the vectorised lattice returns exactly
    the loop reference's rows, in the same order."""
    base, target, patch, step, levels, size0 = COMBOS[combo]
    geometry = plan_geometry(base, target, patch, step, levels)
    contours, tissue0, holes0 = _level0_contours(random_mask(seed), size0)
    got = lattice_positions(contours, geometry)
    ref = reference_positions(tissue0, holes0, geometry.ps_src, geometry.step_src)
    assert got.dtype == np.int64 and got.shape == (len(ref), 2)
    np.testing.assert_array_equal(got, np.array(ref, dtype=np.int64).reshape(-1, 2))


def test_overlapping_contours_emit_each_position_once_at_first_occurrence() -> None:
    """Two overlapping tissue squares: upstream 1.1.0 repeats the shared lattice points; we keep the first."""
    a = np.array([[100, 100], [100, 700], [700, 700], [700, 100]], dtype=np.int32)
    b = a + 300
    geometry = plan_geometry(20, 20, 256, 256, (1.0,))
    raw = reference_positions([a, b], [[], []], geometry.ps_src, geometry.step_src, dedupe=False)
    ref = reference_positions([a, b], [[], []], geometry.ps_src, geometry.step_src)
    assert len(raw) > len(ref)  # the scenario really has duplicates
    got = lattice_positions(Contours(tissue=(a, b), holes=((), ())), geometry)
    np.testing.assert_array_equal(got, np.array(ref))
    assert len({tuple(r) for r in got.tolist()}) == len(got)


def test_hole_rejects_only_centres_strictly_inside_and_only_for_its_own_contour() -> None:
    """A hole of contour A does not reject B's patches; A's patches whose centre is inside it are rejected."""
    a = np.array([[0, 0], [0, 2000], [2000, 2000], [2000, 0]], dtype=np.int32)
    hole = np.array([[500, 500], [500, 1500], [1500, 1500], [1500, 500]], dtype=np.int32)
    geometry = plan_geometry(20, 20, 100, 100, (1.0,))
    with_hole = lattice_positions(Contours(tissue=(a,), holes=((hole,),)), geometry)
    without = lattice_positions(Contours(tissue=(a,), holes=((),)), geometry)
    centres = with_hole + 50
    strictly_inside = (centres > 500).all(axis=1) & (centres < 1500).all(axis=1)
    assert not strictly_inside.any() and len(without) > len(with_hole)
    # the same square as a second contour without holes brings the rejected positions back, after A's rows
    both = lattice_positions(Contours(tissue=(a, a.copy()), holes=((hole,), ())), geometry)
    np.testing.assert_array_equal(both[: len(with_hole)], with_hole)
    assert len(both) == len(without)


def test_empty_contours_and_coords_array() -> None:
    """No tissue: no rows; coords rows carry read size and level as int32."""
    geometry = plan_geometry(40, 10, 256, 256, (1.0, 4.0))
    empty = lattice_positions(Contours(tissue=(), holes=()), geometry)
    assert empty.shape == (0, 2)
    assert coords_array(empty, geometry).shape == (0, 5)
    rows = coords_array(np.array([[0, 0], [1024, 2048]]), geometry)
    assert rows.dtype == np.int32 and rows.tolist() == [[0, 0, 256, 256, 1], [1024, 2048, 256, 256, 1]]


def test_lattice_speed_on_a_1024_mask_with_big_contours() -> None:
    """A 1024^2 mask with two large blobs and holes, scaled to a 100k x 80k slide at 40x -> 20x/256: the
    lattice (about 15k positions) takes well under a second (generous bound for a shared machine)."""
    m = np.zeros((1024, 1024), np.uint8)
    cv2.ellipse(m, (400, 500), (330, 420), 20, 0, 360, 255, -1)
    cv2.ellipse(m, (860, 300), (120, 250), 10, 0, 360, 255, -1)
    for centre in [(300, 400), (500, 600), (420, 250)]:
        cv2.circle(m, centre, 40, 0, -1)
    contours, _, _ = _level0_contours(m > 0, (100_000, 80_000))
    geometry = plan_geometry(40, 20, 256, 256, (1.0, 4.0, 16.0))
    start = time.perf_counter()
    xy = lattice_positions(contours, geometry)
    elapsed = time.perf_counter() - start
    assert len(xy) > 10_000
    assert elapsed < 2.0, f"lattice took {elapsed:.2f} s"
