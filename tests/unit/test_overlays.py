"""Overlay PNGs (upstream §6.4): names, sizes, the binary mask, rectangles, contour colours, atomic writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from atlaspatch_stream.backends.contours import mask_to_contours, plan_coordinates
from atlaspatch_stream.geometry import plan_geometry
from atlaspatch_stream.outputs.overlays import (
    write_contour_overlay,
    write_grid_overlay,
    write_mask_overlays,
)
from tests.conftest import real_slide
from tests.reference_upstream import random_mask


def _thumb(h: int = 150, w: int = 200, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(60, 200, size=(h, w, 3), dtype=np.uint8)


def _nearest(mask: np.ndarray, w: int, h: int) -> np.ndarray:
    """Pixel-centre nearest neighbour, written out: dst (i, j) takes src (floor((i+.5) mh/h), floor((j+.5) mw/w))."""
    mh, mw = mask.shape
    rows = np.floor((np.arange(h) + 0.5) * mh / h).astype(int)
    cols = np.floor((np.arange(w) + 0.5) * mw / w).astype(int)
    return np.where(mask[rows][:, cols], 255, 0).astype(np.uint8)


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB") if img.mode not in ("L", "RGB") else img)


def _no_temp_files(folder: Path) -> None:
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("thumb_hw", [(150, 200), (77, 101), (300, 400)])
def test_mask_overlays_sizes_binary_mask_and_green_tint(tmp_path: Path, thumb_hw: tuple[int, int]) -> None:
    """A 96 x 128 mask over thumbnails smaller, odd-sized and larger than it: both PNGs have the thumbnail size,
    the bw PNG is the 0/255 mask resized with Pillow's NEAREST (as upstream's PIL thumbnails), and only tissue pixels are tinted green (alpha 80)."""
    h, w = thumb_hw
    thumb, mask = _thumb(h, w), random_mask(3)
    mask_png, bw_png = write_mask_overlays(tmp_path / "vis", "slide", thumb, mask)
    assert (mask_png.name, bw_png.name) == ("slide_mask.png", "slide_mask_bw.png")
    bw = _read(bw_png)
    assert bw.shape == (h, w) and set(np.unique(bw).tolist()) <= {0, 255}
    pil = Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.Resampling.NEAREST)
    np.testing.assert_array_equal(bw, np.asarray(pil))
    # Pillow's fixed-point sampling may differ from the exact pixel-centre rule only on exact ties
    assert (bw != _nearest(mask, w, h)).mean() < 0.002
    overlay = _read(mask_png).astype(int)
    assert overlay.shape == (h, w, 3)
    on = bw > 0
    np.testing.assert_array_equal(overlay[~on], thumb[~on])
    expected = (thumb[on].astype(int) * 175 + np.array([0, 255, 0]) * 80 + 127) // 255
    np.testing.assert_array_equal(overlay[on], expected)
    _no_temp_files(tmp_path / "vis")


def test_float_mask_threshold_is_half(tmp_path: Path) -> None:
    """A float mask: 0.5 is background, 0.6 is tissue."""
    mask = np.full((10, 10), 0.5, dtype=np.float32)
    mask[:5] = 0.6
    _, bw_png = write_mask_overlays(tmp_path, "f", _thumb(20, 20), mask)
    bw = _read(bw_png)
    assert (bw[:10] == 255).all() and (bw[10:] == 0).all()


def test_grid_overlay_draws_black_rectangles_and_an_info_box(tmp_path: Path) -> None:
    """Coordinates of a random mask at 20x/64 on a 2000 x 1500 slide, drawn on an 800 x 600 thumbnail: each
    rectangle's top-left corner is black (outside the info box), and the top-right corner holds the bright box."""
    size0 = (2000, 1500)
    geometry = plan_geometry(20, 20, 64, 64, (1.0,))
    _, coords = plan_coordinates(random_mask(8), size0, geometry, 0.0)
    assert len(coords) > 20
    thumb = _thumb(600, 800)
    info = {"Patches Extracted": str(len(coords)), "WSI Size": "2000 x 1500", "Patch Size": "64"}
    path = write_grid_overlay(tmp_path, "slide", thumb, size0, coords, geometry.patch_size_level0, info)
    assert path.name == "slide.png"
    img = _read(path)
    assert img.shape == thumb.shape
    x = (coords[:, 0] * 800 / 2000).astype(int)
    y = (coords[:, 1] * 600 / 1500).astype(int)
    visible = ~((x >= 600) & (y < 80)) & (x < 800) & (y < 600)
    assert visible.sum() > 20
    assert (img[y[visible], x[visible]] == 0).all()
    box = img[:30, -60:].reshape(-1, 3)
    assert (box.min(axis=1) >= 200).mean() > 0.5  # mostly white (alpha 230 over the thumbnail), with text
    assert (box.max(axis=1) == 0).any()  # black text or border
    _no_temp_files(tmp_path)


def test_grid_overlay_with_no_patches(tmp_path: Path) -> None:
    """Zero patches still writes the thumbnail with its info box."""
    path = write_grid_overlay(
        tmp_path, "empty", _thumb(), (2000, 1500), np.zeros((0, 5), np.int32), 64, {"N": "0"}
    )
    assert _read(path).shape == (150, 200, 3)


def test_contour_overlay_red_tissue_blue_holes(tmp_path: Path) -> None:
    """A block with a hole on a 100 x 100 mask, drawn on a 300 x 200 thumbnail: red along the scaled tissue
    outline, blue along the scaled hole, both absent from a gray thumbnail before drawing."""
    mask = np.zeros((100, 100), dtype=bool)
    mask[20:80, 10:90] = True
    mask[40:60, 40:60] = False
    contours = mask_to_contours(mask, 0.0)
    thumb = np.full((200, 300, 3), 128, dtype=np.uint8)
    path = write_contour_overlay(tmp_path, "slide", thumb, contours, mask.shape)
    assert path.name == "slide_contours.png"
    img = _read(path)
    assert img.shape == (200, 300, 3)
    red = (img == [255, 0, 0]).all(axis=2)
    blue = (img == [0, 0, 255]).all(axis=2)
    assert red[40, 30:270].any() and red[40, 30] and red[100, 30]  # top edge y = 20*2, left edge x = 10*3
    # the hole's contour runs on the tissue pixels around it (39..60): x = 39*3 = 117, y = 39*2 = 78
    assert blue[100, 117] and blue[78, 150] and not blue[100, 150]
    assert red.sum() > blue.sum() > 0
    _no_temp_files(tmp_path)


def test_overlays_on_a_real_slide_thumbnail(tmp_path: Path) -> None:
    """CMU-1-Small-Region's 1024-px thumbnail (tiffslide) with a 256-px saturation mask: all four PNGs exist at
    the thumbnail's size."""
    tiffslide = pytest.importorskip("tiffslide")
    import cv2

    with tiffslide.TiffSlide(real_slide("aperio/CMU-1-Small-Region.svs")) as slide:
        thumb = np.asarray(slide.get_thumbnail((1024, 1024)).convert("RGB"))
        small = np.asarray(slide.get_thumbnail((256, 256)).convert("RGB"))
        size0 = slide.dimensions
    mask = cv2.cvtColor(small, cv2.COLOR_RGB2HSV)[..., 1] > 30
    geometry = plan_geometry(20, 20, 256, 256, (1.0,))
    contours, coords = plan_coordinates(mask, size0, geometry, 0.0)
    out = tmp_path / "visualization"
    paths = write_mask_overlays(out, "CMU-1-Small-Region", thumb, mask)
    paths.append(write_grid_overlay(out, "CMU-1-Small-Region", thumb, size0, coords, 256, {"Patches": "n"}))
    paths.append(write_contour_overlay(out, "CMU-1-Small-Region", thumb, contours, mask.shape))
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths)
    for p in paths:
        assert _read(p).shape[:2] == thumb.shape[:2]
