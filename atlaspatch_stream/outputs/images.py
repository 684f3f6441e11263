"""Patch PNGs for `--save-images` (upstream §2.1 naming), written atomically from already-decoded pixels."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from ..errors import output_error


def save_patch_pngs(folder: Path, stem: str, coords: np.ndarray, pixels: np.ndarray) -> list[Path]:
    """Write `<folder>/<stem>_x{X}_y{Y}.png` for each row (RGB uint8 patches, X/Y level-0 coordinates).

    Raises:
        OutputError: the output filesystem refused a write (full, read-only, ...); no temporary file is left.
    """
    written = []
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for (x, y), patch in zip(coords[:, :2].tolist(), pixels, strict=True):
            ok, data = cv2.imencode(".png", np.ascontiguousarray(patch[..., ::-1]))
            if not ok:  # pragma: no cover - cv2 failure on valid uint8 input
                raise OSError(f"PNG encoding failed for {stem} at ({x}, {y})")
            final = folder / f"{stem}_x{x}_y{y}.png"
            tmp = final.with_name(f".{final.name}.tmp")
            try:
                tmp.write_bytes(data.tobytes())
                os.replace(tmp, final)
            finally:
                tmp.unlink(missing_ok=True)
            written.append(final)
    except OSError as exc:
        error = output_error(exc, folder)
        if error is None:
            raise
        raise error from exc
    return written
