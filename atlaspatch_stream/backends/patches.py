"""Patches cut from decoded tiles and resized to `patch_size` in torch, on the tiles' own device (CPU or CUDA).

One code path for both: CI runs it on CPU tensors against cv2, the GPU path runs it where the decoder left the tiles,
so pixels never return to the host between decode and encoder.

Cutting is two gathers (gpu.md §4.4): each patch's neighbourhood of tiles is gathered into a canvas (a zero tile
stands in for missing and out-of-level tiles), then the patch window is taken out of the canvas with broadcast index
vectors. Pixels outside the level are zeroed by a mask, which also hides the padding of edge tiles, exactly as
`tiles.cut_patch` does on numpy.

Resizing reproduces upstream's `cv2.resize(rgb, (S, S))` (INTER_LINEAR on uint8):
- read size 2S or 4S: integer means of the 2×2 block (4S: of its central 2×2), equal to cv2 bit for bit;
- otherwise: cv2's fixed-point arithmetic replayed in int32 (11-bit coefficients rounded from float32 positions, the
  horizontal pass, then the vertical pass as OpenCV's SIMD kernel computes it: `(S >> 4) * beta >> 16`, summed,
  `+ 2 >> 2`). Measured equal to cv2 on downscales; within one grey level on upscales (first and last rows).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..tileplan import TileGrid

_COEF_BITS = 11
_COEF_SCALE = 1 << _COEF_BITS
# Canvas bytes per sub-batch: bounds the gather's temporary on small GPUs and on CPU.
CANVAS_BUDGET = 96 << 20


def linear_coefficients(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """cv2 INTER_LINEAR's source indices and 11-bit weights along one axis: (i0, i1, w0, w1), each (dst,).

    Positions are computed as OpenCV does: `float((d + 0.5) * scale - 0.5)` with a double scale, clamped at both
    borders (weight 0 on the missing neighbour), weights `round(w * 2048)`.
    """
    scale = src / dst
    pos = ((np.arange(dst, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    i0 = np.floor(pos).astype(np.int64)
    frac = (pos - i0.astype(np.float32)).astype(np.float32)
    low, high = i0 < 0, i0 >= src - 1
    frac[low | high] = 0.0
    i0[low], i0[high] = 0, src - 1
    w1 = np.rint(frac * np.float32(_COEF_SCALE)).astype(np.int64)
    w0 = np.rint((np.float32(1.0) - frac) * np.float32(_COEF_SCALE)).astype(np.int64)
    return i0, np.minimum(i0 + 1, src - 1), w0, w1


def resize_linear(x: Any, size: int) -> Any:
    """Resize uint8 (P, H, W, 3) patches to (P, size, size, 3) as `cv2.resize(..., INTER_LINEAR)`, on x's device."""
    height, width = int(x.shape[1]), int(x.shape[2])
    if (height, width) == (size, size):
        return x
    if height == width == 2 * size:
        return _block_mean(x, size, 2, 0)
    if height == width == 4 * size:
        return _block_mean(x, size, 4, 1)
    return _fixed_point(x, size)


def _block_mean(x: Any, size: int, factor: int, start: int) -> Any:
    """(a + b + c + d + 2) >> 2 over the 2×2 pixels at offset `start` of each factor×factor block."""
    import torch

    blocks = x.reshape(x.shape[0], size, factor, size, factor, 3)[:, :, start : start + 2, :, start : start + 2]
    total = blocks.to(torch.int32).sum(dim=(2, 4))
    return ((total + 2) >> 2).to(torch.uint8)


def _fixed_point(x: Any, size: int) -> Any:
    import torch

    dev = x.device
    i0, i1, w0, w1 = (torch.from_numpy(a).to(dev) for a in linear_coefficients(int(x.shape[2]), size))
    j0, j1, v0, v1 = (torch.from_numpy(a).to(dev) for a in linear_coefficients(int(x.shape[1]), size))
    xi = x.to(torch.int32)
    wa, wb = w0.to(torch.int32).view(1, 1, -1, 1), w1.to(torch.int32).view(1, 1, -1, 1)
    rows = xi[:, :, i0] * wa + xi[:, :, i1] * wb  # (P, H, size, 3), at most 255 * 2048
    va, vb = v0.to(torch.int32).view(1, -1, 1, 1), v1.to(torch.int32).view(1, -1, 1, 1)
    mixed = ((rows[:, j0] >> 4) * va >> 16) + ((rows[:, j1] >> 4) * vb >> 16)
    return ((mixed + 2) >> 2).clamp_(0, 255).to(torch.uint8)


def tile_bank(tiles: dict[int, Any], grid: TileGrid, device: Any) -> tuple[Any, np.ndarray]:
    """Decoded tiles stacked as (T + 1, tile_h, tile_w, 3) uint8 on `device`, the last one zeros, and their ids.

    Missing tiles (None) are left out (they read as the zero tile); tiles stored cropped are padded to full size.
    """
    import torch

    ids = np.array(sorted(t for t, px in tiles.items() if px is not None), dtype=np.int64)
    bank = torch.zeros((len(ids) + 1, grid.tile_h, grid.tile_w, 3), dtype=torch.uint8, device=device)
    for slot, tile in enumerate(ids.tolist()):
        px = torch.as_tensor(tiles[tile]).to(device, non_blocking=True)
        h, w = min(grid.tile_h, int(px.shape[0])), min(grid.tile_w, int(px.shape[1]))
        bank[slot, :h, :w] = px[:h, :w]
    return bank, ids


def _slots(ids: np.ndarray, grid: TileGrid, rx: np.ndarray, ry: np.ndarray, nx: int, ny: int) -> np.ndarray:
    """Bank slot of every tile in each patch's ny×nx neighbourhood (the zero slot outside the level or missing)."""
    cols = (rx // grid.tile_w)[:, None] + np.arange(nx)  # (P, nx); floor division keeps negatives left of 0
    rows = (ry // grid.tile_h)[:, None] + np.arange(ny)  # (P, ny)
    inside = ((rows >= 0) & (rows < grid.down))[:, :, None] & ((cols >= 0) & (cols < grid.across))[:, None, :]
    wanted = rows[:, :, None] * grid.across + cols[:, None, :]
    if len(ids) == 0:
        return np.zeros(wanted.shape, dtype=np.int64)
    pos = np.minimum(np.searchsorted(ids, wanted), len(ids) - 1)
    return np.where(inside & (ids[pos] == wanted), pos, len(ids))


def cut_patches(tiles: dict[int, Any], grid: TileGrid, rects: np.ndarray, patch_size: int, device: Any) -> Any:
    """Cut level-pixel rectangles from decoded tiles and resize them as upstream, as one torch batch on `device`.

    Args:
        tiles: Decoded tiles by tile id (uint8 (h, w, 3), numpy or torch; None = missing, black); every tile a
            rectangle overlaps must be present as a key.
        grid: The level's tile grid.
        rects: int (P, 4): x, y, w, h in level pixels (may extend past the level); all of one size (w, h).
        patch_size: The output edge.
        device: The torch device of the result (and of the work).

    Returns:
        uint8 (P, patch_size, patch_size, 3) on `device`; equal to `tiles.cut_patch` + `tiles.resize_patch` at read
        sizes patch_size, 2·patch_size and 4·patch_size, within one grey level otherwise.
    """
    import torch

    rects = np.asarray(rects, dtype=np.int64)
    if rects.shape[0] == 0:
        return torch.zeros((0, patch_size, patch_size, 3), dtype=torch.uint8, device=device)
    widths, heights = np.unique(rects[:, 2]), np.unique(rects[:, 3])
    if widths.size != 1 or heights.size != 1:
        raise ValueError("cut_patches takes rectangles of one size; group them first")
    bank, ids = tile_bank(tiles, grid, device)
    w, h = int(widths[0]), int(heights[0])
    per_patch = (h + grid.tile_h) * (w + grid.tile_w) * 3
    step = max(1, CANVAS_BUDGET // per_patch)
    parts = [_cut_group(bank, ids, grid, rects[k : k + step], w, h, patch_size) for k in range(0, len(rects), step)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _cut_group(bank: Any, ids: np.ndarray, grid: TileGrid, rects: np.ndarray, w: int, h: int, size: int) -> Any:
    import torch

    dev = bank.device
    rx, ry = rects[:, 0], rects[:, 1]
    nx = int(((rx + w - 1) // grid.tile_w - rx // grid.tile_w).max()) + 1
    ny = int(((ry + h - 1) // grid.tile_h - ry // grid.tile_h).max()) + 1
    slots = torch.from_numpy(_slots(ids, grid, rx, ry, nx, ny)).to(dev)
    p = rects.shape[0]
    canvas = bank[slots].permute(0, 1, 3, 2, 4, 5).reshape(p, ny * grid.tile_h, nx * grid.tile_w, 3)
    ox = torch.from_numpy(rx - (rx // grid.tile_w) * grid.tile_w).to(dev)
    oy = torch.from_numpy(ry - (ry // grid.tile_h) * grid.tile_h).to(dev)
    cols = ox[:, None] + torch.arange(w, device=dev)  # (P, w) canvas columns
    rows = oy[:, None] + torch.arange(h, device=dev)  # (P, h)
    patch = canvas[torch.arange(p, device=dev)[:, None, None], rows[:, :, None], cols[:, None, :]]
    level_x = torch.from_numpy(rx).to(dev)[:, None] + torch.arange(w, device=dev)
    level_y = torch.from_numpy(ry).to(dev)[:, None] + torch.arange(h, device=dev)
    inside = ((level_y >= 0) & (level_y < grid.height))[:, :, None] & ((level_x >= 0) & (level_x < grid.width))[:, None]
    patch = patch * inside[..., None].to(torch.uint8)
    return resize_linear(patch, size)
