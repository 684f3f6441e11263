"""Mask -> contours -> coords with real OpenCV: upstream's §3.5 contour rules and the whole chain to `coords`."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from atlaspatch_stream.backends.contours import mask_to_contours, plan_coordinates
from atlaspatch_stream.geometry import plan_geometry
from tests.conftest import real_slide
from tests.reference_upstream import random_mask, reference_coords, reference_mask_to_contours

CHAIN = [
    # (base, target, patch, step, level downsamples, level-0 size for a 128 x 96 mask)
    (40, 20, 256, 256, (1.0, 4.0, 16.0), (25607, 18243)),
    (40, 15, 256, 256, (1.0, 4.0, 16.0), (30011, 22007)),
    (20, 20, 64, 32, (1.0,), (1501, 1203)),
    (20, 10, 16, 16, (1.0, 2.0), (700, 515)),
    (20, 20, 3, 3, (1.0,), (130, 99)),
]


def _same_contours(got: tuple[np.ndarray, ...], ref: list[np.ndarray]) -> None:
    assert len(got) == len(ref)
    for g, r in zip(got, ref, strict=True):
        assert g.dtype == np.int32 and g.ndim == 2 and g.shape[1] == 2
        np.testing.assert_array_equal(g, r.reshape(-1, 2))


@pytest.mark.parametrize("tissue_thresh", [0.0, 0.002, 0.05])
@pytest.mark.parametrize("seed", range(16))
def test_contours_match_upstream_rules(seed: int, tissue_thresh: float) -> None:
    """Random masks and thresholds: the same tissue contours, in OpenCV order, with the same holes under each."""
    mask = random_mask(seed)
    got = mask_to_contours(mask, tissue_thresh)
    tissue, holes = reference_mask_to_contours(mask, tissue_thresh)
    _same_contours(got.tissue, tissue)
    assert len(got.holes) == len(holes)
    for g, r in zip(got.holes, holes, strict=True):
        _same_contours(g, r)


def test_mask_dtypes_bool_float_and_uint8_agree() -> None:
    """A bool mask, a 0/1 float mask, a 0/255 uint8 mask give the same contours; 0.5 itself is not tissue."""
    mask = random_mask(5)
    ref = mask_to_contours(mask, 0.0)
    for variant in (mask.astype(np.float32), mask.astype(np.uint8) * 255, mask.astype(np.float64) * 0.51):
        got = mask_to_contours(variant, 0.0)
        _same_contours(got.tissue, list(ref.tissue))
    assert len(mask_to_contours(mask.astype(np.float32) * 0.5, 0.0)) == 0


def _square_holes(sizes: list[int]) -> np.ndarray:
    """A big tissue block on a 200 x 300 mask with square holes of the given sides along two rows."""
    m = np.zeros((200, 300), dtype=np.uint8)
    m[5:195, 5:295] = 255
    for i, side in enumerate(sizes):
        x, y = 15 + (i % 12) * 23, 20 + (i // 12) * 60
        m[y : y + side, x : x + side] = 0
    return m


def test_holes_are_capped_globally_to_the_ten_largest() -> None:
    """14 holes of distinct sizes plus two below 16 px: the 10 largest survive, the tiny ones never count."""
    sides = [3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]  # 3x3 (4 px area) is below 16
    m = _square_holes(sides)
    got = mask_to_contours(m, 0.0)
    assert len(got.tissue) == 1 and len(got.holes[0]) == 10
    kept_areas = sorted(cv2.contourArea(h) for h in got.holes[0])
    all_areas = sorted(cv2.contourArea(h) for h in mask_to_contours(m, 0.0, max_n_holes=100).holes[0])
    assert kept_areas == all_areas[-10:]
    assert min(all_areas) >= 16  # the area filter removed the 3x3 hole (contour area 4)
    assert len(mask_to_contours(m, 0.0, hole_min_area=0, max_n_holes=100).holes[0]) == len(sides)


def test_equal_area_holes_tie_in_contour_order() -> None:
    """Twelve identical holes and a cap of 10: the result is deterministic and follows OpenCV contour order."""
    m = _square_holes([8] * 12)
    first = mask_to_contours(m, 0.0)
    again = mask_to_contours(m.copy(), 0.0)
    every = mask_to_contours(m, 0.0, max_n_holes=100).holes[0]
    assert len(first.holes[0]) == 10
    _same_contours(first.holes[0], list(every[:10]))
    _same_contours(again.holes[0], list(first.holes[0]))


def test_cap_is_global_across_tissue_and_dropped_tissue_loses_its_holes() -> None:
    """Two tissue blocks: the cap counts holes of both; raising tissue_thresh drops the small block and its
    holes, and islands inside holes are tissue of their own."""
    m = np.zeros((200, 400), dtype=np.uint8)
    m[10:190, 10:250] = 255  # big block: 6 holes of side 12
    m[10:60, 300:390] = 255  # small block: 6 holes of side 6
    for i in range(6):
        m[20 + i * 28 : 32 + i * 28, 20:32] = 0
        m[15:21, 305 + i * 14 : 311 + i * 14] = 0
    m[100:140, 100:140] = 0  # a large hole with an island
    m[115:125, 115:125] = 255
    got = mask_to_contours(m, 0.0)
    assert len(got.tissue) == 3  # two blocks and the island
    assert sum(len(h) for h in got.holes) == 10  # 13 holes in all: the 3 smallest are dropped
    island = next(t for t in got.tissue if t.min(axis=0).tolist() == [115, 115])
    assert len(island) > 0
    big_only = mask_to_contours(m, 0.1)  # 0.1 * 80000 = 8000 px: only the big block survives
    assert len(big_only.tissue) == 1 and len(big_only.holes[0]) == 7


def test_empty_and_full_masks() -> None:
    """No tissue: no contours and no coords. All tissue (60 x 50 -> 600 x 500, contour edge at 590 x 490):
    the last row/column is the last whose near probes (corner + 32 - 16) still touch the contour."""
    geometry = plan_geometry(20, 20, 64, 64, (1.0,))
    empty = np.zeros((50, 60), dtype=bool)
    contours, coords = plan_coordinates(empty, (600, 500), geometry, 0.0)
    assert len(contours) == 0 and coords.shape == (0, 5) and coords.dtype == np.int32
    full = np.ones((50, 60), dtype=bool)
    contours, coords = plan_coordinates(full, (600, 500), geometry, 0.0)
    assert len(contours) == 1
    np.testing.assert_array_equal(coords, reference_coords(full, (600, 500), 20, 20, 64, 64, (1.0,)))
    assert (
        coords[:, 0].max() == 512 and coords[:, 1].max() == 448
    )  # 576 + 16 = 592 > 590; 512 + 16 = 528 > 490
    assert len(coords) == 9 * 8


@pytest.mark.parametrize("combo", range(len(CHAIN)))
@pytest.mark.parametrize("seed", range(10))
def test_plan_coordinates_matches_upstream_chain(seed: int, combo: int) -> None:
    """Mask -> contours -> float32 scaling -> global lattice -> tests -> coords: identical rows and order to the
    loop reference, for several magnifications, patch sizes and steps (overlap and non-integer ds included)."""
    base, target, patch, step, levels, size0 = CHAIN[combo]
    mask = random_mask(100 + seed)
    geometry = plan_geometry(base, target, patch, step, levels)
    tissue_thresh = 0.001 if seed % 2 else 0.0
    contours, coords = plan_coordinates(mask, size0, geometry, tissue_thresh)
    expected = reference_coords(mask, size0, base, target, patch, step, levels, tissue_thresh)
    assert coords.dtype == np.int32
    np.testing.assert_array_equal(coords, expected)
    assert len(contours) == len(reference_mask_to_contours(mask, tissue_thresh)[0])


def test_real_slide_thumbnail_mask_gives_upstream_coords() -> None:
    """CMU-1-Small-Region (20x, 2220 x 2967): a saturation mask of its thumbnail, then 20x/256 and 10x/128
    coordinates equal the reference's."""
    tiffslide = pytest.importorskip("tiffslide")
    with tiffslide.TiffSlide(real_slide("aperio/CMU-1-Small-Region.svs")) as slide:
        thumb = np.asarray(slide.get_thumbnail((256, 256)).convert("RGB"))
        size0 = slide.dimensions
    mask = cv2.cvtColor(thumb, cv2.COLOR_RGB2HSV)[..., 1] > 30
    assert 0.05 < mask.mean() < 0.95
    for target, patch in ((20, 256), (10, 128), (20, 64)):
        geometry = plan_geometry(20, target, patch, patch, (1.0,))
        _, coords = plan_coordinates(mask, size0, geometry, 0.0)
        np.testing.assert_array_equal(coords, reference_coords(mask, size0, 20, target, patch, patch, (1.0,)))
        assert len(coords) > 0


def test_malformed_masks_are_rejected() -> None:
    """A 3-D or zero-sized mask is a ValueError naming the shape, not an OpenCV error."""
    with pytest.raises(ValueError, match="2-D"):
        mask_to_contours(np.zeros((4, 4, 3), bool), 0.0)
    with pytest.raises(ValueError, match="empty"):
        mask_to_contours(np.zeros((0, 4), bool), 0.0)
