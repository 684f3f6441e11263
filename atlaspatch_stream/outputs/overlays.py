"""The images under `<out>`: overlay PNGs of upstream's `--visualize-*` flags and `detect-tissue` (upstream §6.4),
written for the planner through `OverlayFiles`, and the QC thumbnails and cards (`--qc`, `atlaspatch report`).

Every overlay is drawn on a caller-supplied RGB thumbnail (upstream uses OpenSlide's `get_thumbnail((1024, 1024))`):

- `<stem>_mask.png`: green at alpha 80/255 where the mask is tissue; `<stem>_mask_bw.png`: the 0/255 mask;
  the mask is NEAREST-resized (Pillow's NEAREST, pixel-centre sampling) to the thumbnail size;
- `<stem>.png`: each patch as a 1-px black rectangle, plus an info box at the top right;
- `<stem>_contours.png`: tissue contours red (thickness 2), holes blue (thickness 1), scaled from the mask.

Files appear complete or not at all: each is written under a temporary name in the same folder, then renamed.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from ..geometry import Contours, scale_contours

__all__ = ["OverlayFiles", "draw_qc_card", "read_qc_image", "write_contour_overlay", "write_grid_overlay",
           "write_mask_overlays", "write_qc_card", "write_qc_thumbnail"]

MASK_GREEN = np.array([0, 255, 0], dtype=np.uint16)
MASK_ALPHA = 80  # out of 255
INFO_ALPHA = 230  # out of 255
TISSUE_RGB = (255, 0, 0)
HOLE_RGB = (0, 0, 255)
_FONT = cv2.FONT_HERSHEY_SIMPLEX
QC_THUMB_MAX = 512  # px, long side of `--qc` thumbnails
GRID_RGB = (20, 20, 20)


def write_mask_overlays(out_dir: Path, stem: str, thumb: np.ndarray, mask: np.ndarray) -> list[Path]:
    """Write `<stem>_mask.png` (green tissue overlay) and `<stem>_mask_bw.png` (0/255 mask) at thumbnail size.

    Args:
        out_dir: The visualization folder (created when missing).
        stem: The slide's stem.
        thumb: (h, w, 3) uint8 RGB overlay thumbnail.
        mask: (mh, mw) tissue mask (bool, or > 0.5 is tissue).

    Returns:
        [mask overlay path, binary mask path].
    """
    rgb = _rgb(thumb)
    bw = resize_mask_nearest(mask, (rgb.shape[1], rgb.shape[0]))
    on = bw > 0
    blended = rgb.astype(np.uint16)
    blended[on] = (blended[on] * (255 - MASK_ALPHA) + MASK_GREEN * MASK_ALPHA + 127) // 255
    out = Path(out_dir)
    return [
        _write_png(out / f"{stem}_mask.png", blended.astype(np.uint8)),
        _write_png(out / f"{stem}_mask_bw.png", bw),
    ]


def resize_mask_nearest(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The binary mask as uint8 0/255, NEAREST-resized (Pillow) to `size` = (width, height).

    Args:
        mask: (mh, mw) tissue mask (bool, or > 0.5 is tissue).
        size: (width, height) of the result.

    Returns:
        (height, width) uint8 of 0 and 255.
    """
    binary = np.where(np.asarray(mask) > 0.5, 255, 0).astype(np.uint8)
    if binary.ndim != 2:
        raise ValueError(f"a tissue mask must be 2-D, got shape {binary.shape}")
    return np.asarray(Image.fromarray(binary).resize(size, Image.Resampling.NEAREST))


def write_grid_overlay(
    out_dir: Path,
    stem: str,
    thumb: np.ndarray,
    level0_size: tuple[int, int],
    coords: np.ndarray,
    patch_size_level0: int,
    info: Mapping[str, str],
) -> Path:
    """Write `<stem>.png`: every patch as a 1-px black rectangle and an info box at the top right.

    Args:
        out_dir: The visualization folder (created when missing).
        stem: The slide's stem.
        thumb: (h, w, 3) uint8 RGB overlay thumbnail.
        level0_size: The slide's level-0 (width, height).
        coords: (N, >=2) level-0 (x, y, ...) rows, as in the H5.
        patch_size_level0: The patch footprint in level-0 pixels (the H5 attribute).
        info: Lines of the info box, e.g. {"Patches Extracted": "1234", "WSI Size": "W x H", ...}.

    Returns:
        The PNG's path.
    """
    img = _rgb(thumb).copy()
    _draw_patch_grid(img, level0_size, coords, patch_size_level0, (0, 0, 0))
    _draw_info_box(img, [f"{key}: {value}" for key, value in info.items()])
    return _write_png(Path(out_dir) / f"{stem}.png", img)


def _draw_patch_grid(
    img: np.ndarray, level0_size: tuple[int, int], coords: np.ndarray, ps0: int, color: tuple[int, int, int]
) -> None:
    """Each patch (level-0 corner `coords[:, :2]`, side `ps0`) as a 1-px rectangle of `color`, scaled to `img`."""
    coords = np.asarray(coords)
    if coords.size == 0:
        return
    sx, sy = img.shape[1] / level0_size[0], img.shape[0] / level0_size[1]
    xy = coords.reshape(coords.shape[0], -1)[:, :2].astype(np.float64)
    x1, y1 = (xy[:, 0] * sx).astype(np.int32), (xy[:, 1] * sy).astype(np.int32)
    x2, y2 = ((xy[:, 0] + ps0) * sx).astype(np.int32), ((xy[:, 1] + ps0) * sy).astype(np.int32)
    corners = np.stack(
        [np.stack([x1, y1], 1), np.stack([x2, y1], 1), np.stack([x2, y2], 1), np.stack([x1, y2], 1)], 1
    )
    cv2.polylines(img, list(corners), isClosed=True, color=color, thickness=1)


def _draw_tissue(img: np.ndarray, contours: Contours, mask_shape: tuple[int, ...]) -> Contours:
    """Draw the tissue contours (mask pixels, `mask_shape` (h, w)) red, 2 px, on `img`; returns them scaled."""
    scaled = scale_contours(contours, img.shape[1] / mask_shape[1], img.shape[0] / mask_shape[0])
    if scaled.tissue:
        cv2.drawContours(img, list(scaled.tissue), -1, TISSUE_RGB, 2)
    return scaled


def _draw_info_box(img: np.ndarray, lines: list[str]) -> None:
    """A white (alpha 230) box with a black border and black text, in the image's top-right corner."""
    if not lines:
        return
    scale, pad, gap = 0.4, 6, 4
    sizes = [cv2.getTextSize(line, _FONT, scale, 1) for line in lines]
    line_h = max(s[0][1] + s[1] for s in sizes)
    box_w = min(img.shape[1], max(s[0][0] for s in sizes) + 2 * pad)
    box_h = min(img.shape[0], len(lines) * (line_h + gap) - gap + 2 * pad)
    x0, y0 = img.shape[1] - box_w, 0
    region = img[y0 : y0 + box_h, x0 : x0 + box_w].astype(np.uint16)
    img[y0 : y0 + box_h, x0 : x0 + box_w] = (
        (region * (255 - INFO_ALPHA) + 255 * INFO_ALPHA + 127) // 255
    ).astype(np.uint8)
    cv2.rectangle(img, (x0, y0), (x0 + box_w - 1, y0 + box_h - 1), (0, 0, 0), 1)
    for i, (line, ((_, text_h), _)) in enumerate(zip(lines, sizes, strict=True)):
        baseline_y = y0 + pad + i * (line_h + gap) + text_h
        cv2.putText(img, line, (x0 + pad, baseline_y), _FONT, scale, (0, 0, 0), 1, cv2.LINE_AA)


def write_contour_overlay(
    out_dir: Path, stem: str, thumb: np.ndarray, contours: Contours, mask_shape: tuple[int, int]
) -> Path:
    """Write `<stem>_contours.png`: tissue contours red (2 px) and holes blue (1 px), scaled mask -> thumbnail.

    Args:
        out_dir: The visualization folder (created when missing).
        stem: The slide's stem.
        thumb: (h, w, 3) uint8 RGB overlay thumbnail.
        contours: Contours in mask pixels (from `mask_to_contours`).
        mask_shape: The mask's (height, width).

    Returns:
        The PNG's path.
    """
    img = _rgb(thumb).copy()
    scaled = _draw_tissue(img, contours, mask_shape)
    holes = [h for group in scaled.holes for h in group]
    if holes:
        cv2.drawContours(img, holes, -1, HOLE_RGB, 1)
    return _write_png(Path(out_dir) / f"{stem}_contours.png", img)


class OverlayFiles:
    """The `--visualize-*` and `detect-tissue` overlays of every slide, in one folder (`OverlayWriter`).

    Args:
        folder: `<out>/visualization` (created on the first write).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def mask(self, stem: str, thumb: np.ndarray, mask: np.ndarray) -> list[Path]:
        """`<stem>_mask.png` and `<stem>_mask_bw.png` (`write_mask_overlays`)."""
        return write_mask_overlays(self.folder, stem, thumb, mask)

    def contours(self, stem: str, thumb: np.ndarray, contours: Contours, mask_shape: tuple[int, int]) -> Path:
        """`<stem>_contours.png` (`write_contour_overlay`)."""
        return write_contour_overlay(self.folder, stem, thumb, contours, mask_shape)

    def grid(self, stem: str, thumb: np.ndarray, level0_size: tuple[int, int], coords: np.ndarray,
             patch_size_level0: int, info: Mapping[str, str]) -> Path:
        """`<stem>.png` (`write_grid_overlay`)."""
        return write_grid_overlay(self.folder, stem, thumb, level0_size, coords, patch_size_level0, info)


def _rgb(thumb: np.ndarray) -> np.ndarray:
    """The thumbnail as contiguous (h, w, 3) uint8 RGB (gray is expanded, an alpha channel dropped)."""
    arr = np.asarray(thumb)
    if arr.dtype != np.uint8:
        raise ValueError(f"the overlay thumbnail must be uint8, got {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"the overlay thumbnail must be (h, w, 3) RGB, got shape {arr.shape}")
    return np.ascontiguousarray(arr[:, :, :3])


def _write_png(path: Path, pixels: np.ndarray, image_format: str = "PNG", **options: int) -> Path:
    """Write a PNG (or `image_format`) atomically: a temporary name in the same folder, then `os.replace`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        Image.fromarray(pixels).save(tmp, format=image_format, **options)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# -- QC (`process --qc`, `atlaspatch report`) -----------------------------------------------------------------------


def write_qc_thumbnail(folder: Path, stem: str, thumb: np.ndarray, mask: np.ndarray) -> tuple[Path, Path]:
    """Write `<stem>.jpg` (the segmented thumbnail, at most `QC_THUMB_MAX` px) and `<stem>.mask.png` (its tissue
    mask, 0/255, same size) into `folder`; both atomically."""
    small = _shrunk(thumb, QC_THUMB_MAX)
    bw = resize_mask_nearest(mask, (small.shape[1], small.shape[0]))
    return (_write_png(Path(folder) / f"{stem}.jpg", small, "JPEG", quality=85),
            _write_png(Path(folder) / f"{stem}.mask.png", bw))


def _shrunk(thumb: np.ndarray, max_size: int) -> np.ndarray:
    """The thumbnail as RGB, BILINEAR-shrunk to at most `max_size` px on its long side (a writable copy)."""
    image = Image.fromarray(_rgb(thumb))
    image.thumbnail((max_size, max_size), Image.Resampling.BILINEAR)
    return np.array(image)


def read_qc_image(path: Path) -> np.ndarray:
    """A QC thumbnail (RGB) or mask (grey) as saved by `write_qc_thumbnail`."""
    with Image.open(path) as image:
        return np.asarray(image.convert("L" if path.suffix == ".png" else "RGB"))


def draw_qc_card(thumb: np.ndarray, tissue: tuple[Contours, tuple[int, int]] | None, level0_size: tuple[int, int],
                 coords: np.ndarray, patch_size_level0: int, max_size: int = QC_THUMB_MAX) -> np.ndarray:
    """A card image: the thumbnail (at most `max_size` px; a `--qc` thumbnail is already that small) with the patch
    grid (1 px, dark) and the tissue contours (red, 2 px) drawn on it. `tissue`: the contours and the (height, width)
    of the mask they were found in (None: no contours). Returns RGB uint8."""
    img = _shrunk(thumb, max_size)
    _draw_patch_grid(img, level0_size, coords, patch_size_level0, GRID_RGB)
    if tissue is not None:
        _draw_tissue(img, *tissue)
    return img


def write_qc_card(path: Path, card: np.ndarray) -> Path:
    """Write a card image as JPEG, atomically."""
    return _write_png(Path(path), card, "JPEG", quality=80)
