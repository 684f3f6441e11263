"""Cross-slide batch assembly: plain functions, no event loop (tested without one).

Pixels are host numpy, or torch tensors on the feature device (the GPU path, where they never return to the host
between decode and encoder); a batch may mix both (slides read through `read_region` come as numpy).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import cast

import numpy as np

from .buffers import BufferPool
from .items import PatchBatch, Pixels


def concat(parts: list[PatchBatch], buffers: BufferPool | None = None) -> PatchBatch:
    """One batch holding the rows of `parts` in order (host pixels copied into a buffer of `buffers`, if given)."""
    if len(parts) == 1:
        return parts[0]
    return PatchBatch(
        np.concatenate([p.slide_ids for p in parts]),
        np.concatenate([p.rows for p in parts]),
        concat_pixels([p.pixels for p in parts], buffers),
        read_seconds=sum(p.read_seconds for p in parts),
        encoders=_union([p.encoders for p in parts]),
    )


def concat_pixels(arrays: Sequence[Pixels], buffers: BufferPool | None = None) -> Pixels:
    """Rows of every array in order: numpy (in a buffer of `buffers`, if given) when all are numpy, else one torch
    tensor on the tensors' device."""
    hosts = [a for a in arrays if isinstance(a, np.ndarray)]
    if len(hosts) == len(arrays):
        if buffers is None:
            return np.concatenate(hosts)
        shape = (sum(a.shape[0] for a in hosts), *hosts[0].shape[1:])
        return np.concatenate(hosts, out=buffers.empty(shape, hosts[0].dtype))
    torch = sys.modules["torch"]  # a tensor is among them, so torch is loaded (this module never imports it)
    device = next(a.device for a in arrays if not isinstance(a, np.ndarray))
    tensors = [torch.as_tensor(a, device=device) if isinstance(a, np.ndarray) else a for a in arrays]
    return cast(Pixels, torch.cat(tensors))


def to_host(pixels: Pixels) -> np.ndarray:
    """Pixels as a host numpy array: numpy as it is, a torch tensor (on any device) copied back."""
    if isinstance(pixels, np.ndarray):
        return pixels
    return np.asarray(pixels.cpu().numpy())


def _union(sets: list[frozenset[str] | None]) -> frozenset[str] | None:
    """Encoders needed by any part (None, meaning all, wins)."""
    if any(s is None for s in sets):
        return None
    return frozenset().union(*sets)  # type: ignore[arg-type]


def split(batch: PatchBatch, n: int) -> tuple[PatchBatch, PatchBatch]:
    """The first `n` rows and the rest (read time shared by row count)."""
    share = batch.read_seconds * n / max(1, len(batch))
    head = PatchBatch(batch.slide_ids[:n], batch.rows[:n], batch.pixels[:n], read_seconds=share,
                      encoders=batch.encoders)
    tail = PatchBatch(batch.slide_ids[n:], batch.rows[n:], batch.pixels[n:], read_seconds=batch.read_seconds - share,
                      encoders=batch.encoders)
    return head, tail


class Batcher:
    """Fills batches of exactly `size` rows from chunks of any slides; rows keep their (slide_id, row) labels.

    A batch of one chunk is that chunk; one joined from several (at a slide's end, and after it while chunks and
    batches are out of step) is copied into a buffer of `buffers`, if given.
    """

    def __init__(self, size: int, buffers: BufferPool | None = None) -> None:
        self.size = size
        self.buffers = buffers
        self._parts: list[PatchBatch] = []
        self._rows = 0

    def __len__(self) -> int:
        return self._rows

    def add(self, chunk: PatchBatch) -> list[PatchBatch]:
        """Take a chunk; return every batch that is now full."""
        full: list[PatchBatch] = []
        while len(chunk):
            head, chunk = split(chunk, min(len(chunk), self.size - self._rows))
            self._parts.append(head)
            self._rows += len(head)
            if self._rows == self.size:
                full.append(self.flush())
        return full

    def flush(self) -> PatchBatch:
        """Whatever is buffered, as one batch (empty buffer -> empty batch)."""
        parts, self._parts, self._rows = self._parts, [], 0
        if not parts:
            return PatchBatch(np.empty(0, np.int64), np.empty(0, np.int64), np.empty((0, 0, 0, 3), np.uint8))
        return concat(parts, self.buffers)


def slide_chunk(
    slide_id: int, rows: np.ndarray, pixels: Pixels | None, seconds: float, encoders: frozenset[str] | None
) -> PatchBatch:
    """One reader chunk of a single slide; `pixels=None` sends only the row labels (no encoder runs)."""
    ids = np.full(rows.shape[0], slide_id, dtype=np.int64)
    px = pixels if pixels is not None else np.empty((rows.shape[0], 0, 0, 3), dtype=np.uint8)
    return PatchBatch(ids, rows.astype(np.int64, copy=False), px, read_seconds=seconds, encoders=encoders)


def split_by_slide(slide_ids: np.ndarray) -> list[tuple[int, np.ndarray, float]]:
    """(slide_id, row selector, share of the batch) for each slide present in a batch."""
    total = max(1, int(slide_ids.shape[0]))
    out = []
    for slide_id in np.unique(slide_ids).tolist():
        sel = slide_ids == slide_id
        out.append((int(slide_id), sel, float(np.count_nonzero(sel)) / total))
    return out


class RowTally:
    """Which of a slide's N rows have arrived (rows may arrive in any order, in any number of batches)."""

    def __init__(self, n: int) -> None:
        self._seen = np.zeros(n, dtype=bool)

    def mark(self, rows: np.ndarray) -> None:
        """Record `rows` as arrived."""
        self._seen[rows] = True

    @property
    def complete(self) -> bool:
        """True when every row has arrived."""
        return bool(self._seen.all())
