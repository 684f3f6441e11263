"""Tile planning for the tile-once patch reader: pure numpy, no I/O.

Given patch rectangles at one pyramid level and the level's tile grid, decide the order in which patches are cut
(row bands: top to bottom, then left to right), which tiles each patch overlaps, and after which patch each tile is
no longer needed, so that a reader decodes every touched tile once and keeps it only while a patch still needs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TileGrid:
    """The tile layout of one pyramid level (sizes in level pixels)."""

    width: int
    height: int
    tile_w: int
    tile_h: int

    @property
    def across(self) -> int:
        """Number of tile columns."""
        return -(-self.width // self.tile_w)

    @property
    def down(self) -> int:
        """Number of tile rows."""
        return -(-self.height // self.tile_h)

    @property
    def count(self) -> int:
        """Number of tiles in the level."""
        return self.across * self.down

    def origin(self, tile: int) -> tuple[int, int]:
        """Top-left (x, y) in level pixels of tile number `tile` (row-major, as TIFF numbers tiles)."""
        row, col = divmod(int(tile), self.across)
        return col * self.tile_w, row * self.tile_h

    def valid_size(self, tile: int) -> tuple[int, int]:
        """(w, h) of the part of `tile` that lies inside the level; edge tiles are padded in the file."""
        x, y = self.origin(tile)
        return min(self.tile_w, self.width - x), min(self.tile_h, self.height - y)


@dataclass(frozen=True)
class LevelPlan:
    """Patches of one level in cutting order, with the tiles each needs.

    Arrays indexed by position in cutting order: `rows` (row of coords), `rx`/`ry` (top-left in level pixels, may
    lie outside the level), `rw`/`rh` (read size). Patch `i` needs tiles `tiles[starts[i]:starts[i + 1]]`;
    `last_use[t]` is the last position that needs tile `t` (-1 if none).
    """

    grid: TileGrid
    rows: np.ndarray
    rx: np.ndarray
    ry: np.ndarray
    rw: np.ndarray
    rh: np.ndarray
    tiles: np.ndarray
    starts: np.ndarray
    last_use: np.ndarray

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def tiles_of(self, begin: int, end: int) -> np.ndarray:
        """Distinct tiles needed by the patches at positions [begin, end), ascending."""
        return np.unique(self.tiles[self.starts[begin] : self.starts[end]])

    def done_after(self, end: int, candidates: np.ndarray) -> np.ndarray:
        """Those of `candidates` that no patch at position >= `end` needs."""
        return candidates[self.last_use[candidates] < end]


def level_origins(x: np.ndarray, y: np.ndarray, downsample: float) -> tuple[np.ndarray, np.ndarray]:
    """Level-pixel top-left of level-0 points, as tiffslide maps them: `int(x / downsample)` (truncation)."""
    ds = float(downsample)
    rx = np.trunc(np.asarray(x, dtype=np.float64) / ds).astype(np.int64)
    ry = np.trunc(np.asarray(y, dtype=np.float64) / ds).astype(np.int64)
    return rx, ry


def tile_spans(
    rx: np.ndarray, ry: np.ndarray, rw: np.ndarray, rh: np.ndarray, grid: TileGrid
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Half-open tile column and row ranges (tx0, tx1, ty0, ty1) each rectangle overlaps, clipped to the level.

    A rectangle wholly outside the level gets an empty range (tx0 == tx1 or ty0 == ty1).
    """
    x0 = np.clip(rx, 0, grid.width)
    x1 = np.clip(rx + rw, 0, grid.width)
    y0 = np.clip(ry, 0, grid.height)
    y1 = np.clip(ry + rh, 0, grid.height)
    tx0, ty0 = x0 // grid.tile_w, y0 // grid.tile_h
    tx1 = np.where(x1 > x0, (x1 - 1) // grid.tile_w + 1, tx0)
    ty1 = np.where(y1 > y0, (y1 - 1) // grid.tile_h + 1, ty0)
    return tx0, tx1, ty0, ty1


def _patch_tiles(
    spans: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], across: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flattened (patch position, tile id) pairs of every patch, plus per-patch start offsets (len P + 1)."""
    tx0, tx1, ty0, ty1 = spans
    nx = tx1 - tx0
    ny = np.where(nx > 0, ty1 - ty0, 0)
    counts = nx * ny
    starts = np.zeros(counts.shape[0] + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    owner = np.repeat(np.arange(counts.shape[0], dtype=np.int64), counts)
    local = np.arange(int(starts[-1]), dtype=np.int64) - starts[owner]
    safe_nx = np.maximum(nx, 1)[owner]
    tiles = (ty0[owner] + local // safe_nx) * across + tx0[owner] + local % safe_nx
    return owner, tiles, starts


def plan_level(rows: np.ndarray, coords: np.ndarray, downsample: float, grid: TileGrid) -> LevelPlan:
    """Plan the patches `coords[rows]` (all at one level) for tile-once reading.

    Args:
        rows: Row indices into `coords` of the patches at this level.
        coords: int (N, 5) array of x, y, read_w, read_h, level (level-0 top-left).
        downsample: The level's downsample, as the slide handle reports it.
        grid: The level's tile grid.

    Returns:
        The plan, patches sorted in row bands (by level y, then x) so decoded tiles can be dropped early.
    """
    sub = np.asarray(coords)[rows].astype(np.int64, copy=False)
    rx, ry = level_origins(sub[:, 0], sub[:, 1], downsample)
    order = np.lexsort((rx, ry))
    rows, rx, ry = np.asarray(rows, dtype=np.int64)[order], rx[order], ry[order]
    rw, rh = sub[order, 2], sub[order, 3]
    owner, tiles, starts = _patch_tiles(tile_spans(rx, ry, rw, rh, grid), grid.across)
    last_use = np.full(grid.count, -1, dtype=np.int64)
    # owner is ascending, so the last write per tile wins is not guaranteed by numpy: use a max reduction.
    np.maximum.at(last_use, tiles, owner)
    return LevelPlan(grid, rows, rx, ry, rw, rh, tiles, starts, last_use)


def chunk_bounds(total: int, chunk: int) -> list[tuple[int, int]]:
    """Consecutive [begin, end) ranges of at most `chunk` positions covering `total`."""
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    return [(b, min(total, b + chunk)) for b in range(0, total, chunk)]
