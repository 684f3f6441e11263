"""Host buffers for patch chunks and batches, reused once nothing refers to them (numpy and the standard library).

A fresh multi-megabyte array costs page faults, and under a fixed mmap threshold an mmap/munmap pair, each time; a
pool hands the same memory out again. It is safe by construction: a buffer goes back to the pool only when the array
handed out, every view of it and every tensor made from it (`torch.from_numpy` keeps the array) are gone, so features
can never be computed from pixels a later chunk has overwritten.
"""

from __future__ import annotations

import math
import threading
import weakref
from typing import Any

import numpy as np


class _Lease:
    """The owner of one handed-out array: it lends the pool's buffer and lives exactly as long as any view of it."""

    __slots__ = ("__array_interface__", "__weakref__", "buffer")

    def __init__(self, buffer: np.ndarray, shape: tuple[int, ...], dtype: np.dtype[Any]) -> None:
        self.buffer = buffer
        self.__array_interface__ = {"shape": shape, "typestr": dtype.str, "version": 3,
                                    "data": (buffer.ctypes.data, False)}


class BufferPool:
    """Up to `keep` free host buffers, handed out as numpy arrays of any shape that fits.

    Every buffer has the size of the largest request so far (a smaller one coming back is dropped), so one pool
    serves one kind of array: a reader's chunks, or a batcher's batches. `empty` never waits: with no free buffer it
    allocates one, so the pool bounds what is kept, never what is in use (the streams bound that).

    Args:
        keep: Free buffers kept for reuse: how many of its arrays are alive at once, from the queue depths.
            0 = a plain `np.empty` each time.
    """

    def __init__(self, keep: int) -> None:
        if keep < 0:
            raise ValueError(f"keep must be >= 0, got {keep}")
        self.keep = keep
        self.allocated = 0  # buffers allocated (requests no free buffer served)
        self.reused = 0  # requests served by a buffer given back
        self._free: list[np.ndarray] = []
        self._size = 0
        self._lock = threading.Lock()

    def empty(self, shape: tuple[int, ...], dtype: Any = np.uint8) -> np.ndarray:
        """An uninitialised C-contiguous array of `shape` and `dtype` (like `np.empty`), on a reused buffer if free."""
        kind = np.dtype(dtype)
        if self.keep == 0:
            return np.empty(shape, kind)
        buffer = self._take(math.prod(shape) * kind.itemsize)
        lease = _Lease(buffer, tuple(shape), kind)
        weakref.finalize(lease, self._give_back, buffer).atexit = False
        return np.asarray(lease)

    def _take(self, nbytes: int) -> np.ndarray:
        """A free buffer of at least `nbytes`, or a new one of the largest size asked for."""
        with self._lock:
            if nbytes > self._size:
                self._size, self._free = nbytes, []  # every kept buffer is outgrown
            if self._free:
                self.reused += 1
                return self._free.pop()
            self.allocated += 1
            size = self._size
        return np.empty(max(1, size), np.uint8)

    def _give_back(self, buffer: np.ndarray) -> None:
        """Keep `buffer` for reuse (called when its last view is gone), unless full or outgrown."""
        with self._lock:
            if len(self._free) < self.keep and buffer.nbytes >= self._size:
                self._free.append(buffer)
