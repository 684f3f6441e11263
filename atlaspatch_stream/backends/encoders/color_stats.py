"""`color_stats`: a weight-free patch encoder of colour statistics, for QC and stain checks.

It lets the whole pipeline run anywhere (no weights, no download) and gives features that mean something: how
bright, how saturated, how much haematoxylin/eosin-like optical density a patch has. Deterministic.

Two implementations of one definition (the torch formulas in `_module_class`):
- on CPU, one compiled pass over each patch's pixels (`color_kernels.patch_sums`, numba) and tables: RGB, value and
  optical density are functions of a channel level, so those pixels are only counted, and the float work happens
  once per level (tables computed with the torch formulas). Saturation comes from a table of the (max, min) pair.
  Hue is n6 / (6 chroma) for an integer n6 per pixel, divided in float32 (the exact rational rounded once); its bin
  is floor(8 hue), except for the colours exactly on a bin edge, which take the torch formula's bin from a table.
  Histograms equal the torch formulas bit for bit; means and standard deviations come from float64 sums (so within
  float32 rounding, ~1e-6, of the torch path's float32 reductions). Parts of a batch run on several threads.
- on CUDA, the torch ops themselves, on the device tensor (no host copy).
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from .spec import EncoderSpec

BINS = 8
OD_MAX = 2.5  # optical-density histogram range [0, OD_MAX); log10(256) ~ 2.41 is the largest possible value
SPACES = ("rgb", "hsv", "od")
DIM = len(SPACES) * 3 * (2 + BINS)  # 90


def feature_names() -> list[str]:
    """The name of each of the 90 columns, in order (see `ColorStats`)."""
    names = [f"{s}_{c}_{stat}" for stat in ("mean", "std") for s in SPACES for c in _channels(s)]
    names += [f"{s}_{c}_hist{b}" for s in SPACES for c in _channels(s) for b in range(BINS)]
    return names


def _channels(space: str) -> tuple[str, str, str]:
    return {"rgb": ("r", "g", "b"), "hsv": ("h", "s", "v"), "od": ("od_r", "od_g", "od_b")}[space]


def _hsv(rgb: Any) -> Any:
    """Hue, saturation, value (B, 3, N) of float RGB (B, 3, N) in [0, 1]: the definition both paths follow."""
    import torch

    r, g, b = rgb.unbind(dim=1)
    value, argmax = rgb.max(dim=1)
    delta = value - rgb.min(dim=1).values
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hue = torch.where(argmax == 0, ((g - b) / safe) % 6,
                      torch.where(argmax == 1, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = torch.where(delta > 0, hue / 6.0, torch.zeros_like(hue))
    sat = torch.where(value > 0, delta / torch.where(value > 0, value, torch.ones_like(value)), torch.zeros_like(value))
    return torch.stack([hue, sat, value], dim=1)


def _optical_density(rgb: Any) -> Any:
    import torch

    return -torch.log10((rgb * 255.0 + 1.0) / 256.0)


def _bin_index(values: Any, top: float) -> Any:
    return (values / top * BINS).floor().clamp(0, BINS - 1).long()


def _module_class() -> type:
    import torch
    import torch.nn as nn

    class ColorStats(nn.Module):
        """Per-patch colour statistics, 90 float32 values.

        Input: float (B, 3, H, W) RGB in [0, 1] (the runtime's uint8 / 255, no resize, no normalisation), or with
        `encode_uint8` the uint8 (B, H, W, 3) batch itself (numpy or torch).

        Layout (column ranges):
        - 0-8:   means   of R, G, B, H, S, V, OD_R, OD_G, OD_B
        - 9-17:  standard deviations (population, over pixels) of the same nine channels
        - 18-41: RGB histograms, 8 equal bins over [0, 1] per channel (R bins, then G, then B), fractions of pixels
        - 42-65: HSV histograms, 8 bins over [0, 1] per channel (hue scaled to [0, 1), 0 = red)
        - 66-89: optical-density histograms, 8 bins over [0, 2.5) per channel

        RGB values are in [0, 1]. HSV follows the usual hexcone definition with all three in [0, 1]; the hue of a grey
        pixel is 0, and the hue mean is a plain (non-circular) mean. Optical density is
        OD = -log10((255 * I + 1) / 256), 0 for white, about 2.41 for black. Every histogram row sums to 1.
        """

        takes_uint8 = True

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            rgb = x.float().flatten(2)  # (B, 3, N)
            spaces = [rgb, _hsv(rgb), _optical_density(rgb)]
            means = torch.cat([s.mean(dim=2) for s in spaces], dim=1)
            stds = torch.cat([s.std(dim=2, correction=0) for s in spaces], dim=1)
            hists = [_histogram(rgb, 1.0), _histogram(spaces[1], 1.0), _histogram(spaces[2], OD_MAX)]
            return torch.cat([means, stds, *hists], dim=1)

        def encode_uint8(self, pixels: Any) -> np.ndarray:
            """uint8 (B, H, W, 3) -> float32 (B, 90): the compiled pass on the host (on as many threads as torch's
            intra-op pool, the cores every CPU encoder is given), torch ops for CUDA tensors."""
            if isinstance(pixels, torch.Tensor) and pixels.device.type != "cpu":
                with torch.inference_mode():
                    x = pixels.permute(0, 3, 1, 2).float().div_(255.0)
                    return self(x).cpu().numpy()
            host = pixels.numpy() if isinstance(pixels, torch.Tensor) else pixels
            return cpu_color_stats(np.asarray(host), threads=torch.get_num_threads())

    def _histogram(values: torch.Tensor, top: float) -> torch.Tensor:
        index = _bin_index(values, top)  # (B, 3, N)
        counts = torch.zeros(*index.shape[:2], BINS, device=values.device, dtype=torch.float32)
        counts.scatter_add_(2, index, torch.ones_like(index, dtype=torch.float32))
        return (counts / values.shape[2]).flatten(1)

    return ColorStats


# ---------------------------------------------------------------------------------------------------------------
# CPU: one compiled pass per patch, then per-key tables


class _Tables:
    """What depends only on a key, computed once with the torch formulas (float32, as the module computes them).

    - `level`, `od`: (256, 2 + BINS) float64 key tables of a channel level: its value (the level / 255, or its
      optical density), its square, and a one-hot of its bin; per-row level counts (B, 256) times the table give
      sums, sums of squares and bin counts in one product (exact: integers below 2**53).
    - `sat_value`, `sat_bin`: the saturation of each (max, min) pair (float32, key max * 256 + min) and its bin.
    - `edge_codes`, `edge_bins`: the colours whose hue lies exactly on a bin edge, and the torch formula's bin of each.
    """

    def __init__(self) -> None:
        import torch

        from .color_kernels import edge_colours

        levels = torch.arange(256, dtype=torch.float32).div_(255.0)  # exactly the runtime's uint8 / 255
        self.level = _key_table(levels, _bin_index(levels, 1.0))
        od = _optical_density(levels)
        self.od = _key_table(od, _bin_index(od, OD_MAX))
        hi, lo = torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij")
        pair = torch.stack([levels[hi.flatten()], levels[lo.flatten()], levels[lo.flatten()]]).unsqueeze(0)
        sat = _hsv(pair)[0, 1]
        self.sat_value, self.sat_bin = sat.numpy(), _bin_index(sat, 1.0).numpy().astype(np.uint8)
        self.edge_codes = edge_colours()
        rgb = torch.stack([levels[torch.from_numpy(self.edge_codes >> s & 255).long()] for s in (16, 8, 0)])
        self.edge_bins = _bin_index(_hsv(rgb.unsqueeze(0))[0, 0], 1.0).numpy().astype(np.uint8)


def _key_table(values: Any, bins: Any) -> np.ndarray:
    v = values.double().numpy()
    table = np.zeros((v.shape[0], 2 + BINS), dtype=np.float64)
    table[:, 0], table[:, 1] = v, v * v
    table[np.arange(v.shape[0]), 2 + bins.numpy()] = 1.0
    return table


@functools.cache
def _tables() -> _Tables:
    """The tables, built once (at the first batch: the encoder's warm-up)."""
    return _Tables()


def _summary(sums: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, population std and bin fractions per row from (B, 2 + BINS) sums of value, value² and bin counts."""
    mean = sums[:, 0] / n
    std = np.sqrt(np.maximum(sums[:, 1] / n - mean * mean, 0.0))
    return mean, std, sums[:, 2:] / n


def cpu_color_stats(pixels: np.ndarray, threads: int = 1) -> np.ndarray:
    """The 90 `ColorStats` values of uint8 (B, H, W, 3) RGB patches on the CPU, float32 (B, 90).

    Equal to the torch module's output: histograms exactly, means and stds to float32 rounding. Each patch is
    reduced to level counts and hue and saturation sums in one compiled pass (`color_kernels.patch_sums`); the
    float work per level happens once, in the tables. `threads` parts of the batch run at once.
    """
    if pixels.ndim != 4 or pixels.shape[-1] != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"color_stats: expected uint8 (B, H, W, 3), got {pixels.dtype} {pixels.shape}")
    batch, n = pixels.shape[0], pixels.shape[1] * pixels.shape[2]
    if batch == 0:
        return np.zeros((0, DIM), dtype=np.float32)
    from .color_kernels import patch_sums

    t = _tables()
    flat = np.ascontiguousarray(pixels).reshape(batch, n * 3)
    levels = np.zeros((batch, 4, 256), np.int32)
    hue, sat = np.zeros((batch, 2 + BINS)), np.zeros((batch, 2 + BINS))

    def part(rows: slice) -> None:
        patch_sums(flat[rows], t.sat_value, t.sat_bin, t.edge_codes, t.edge_bins, levels[rows], hue[rows], sat[rows])

    _on_threads(part, batch, threads)
    counts = levels.transpose(1, 0, 2).astype(np.float64)  # (4, B, 256)
    channels = [_summary(c @ t.level, n) for c in counts[:3]]
    channels += [_summary(hue, n), _summary(sat, n), _summary(counts[3] @ t.level, n)]
    channels += [_summary(c @ t.od, n) for c in counts[:3]]
    means, stds, hists = zip(*channels, strict=True)
    return np.concatenate([np.stack(means, 1), np.stack(stds, 1), *hists], axis=1).astype(np.float32)


def _on_threads(work: Callable[[slice], None], batch: int, threads: int) -> None:
    """`work` over `threads` contiguous parts of the batch at once: the first part on this thread, the others on the
    helper threads (the kernel releases the GIL)."""
    bounds = np.linspace(0, batch, max(1, min(threads, batch)) + 1).astype(int).tolist()
    first, *others = (slice(a, b) for a, b in itertools.pairwise(bounds))
    running = [_helpers(len(others), os.getpid()).submit(work, rows) for rows in others] if others else []
    work(first)
    for done in running:
        done.result()


@functools.cache
def _helpers(threads: int, pid: int) -> ThreadPoolExecutor:
    """The threads that take the other parts of a batch, started at the first batch that needs them and kept for
    the process (starting them per batch cost 0.2 ms, 2 % of a 64-patch batch). Keyed by `pid`: a forked child
    gets threads of its own (a fork copies none)."""
    return ThreadPoolExecutor(threads, thread_name_prefix="color-stats")


def build() -> Any:
    """A new `ColorStats` module (no parameters)."""
    return _module_class()()


def specs() -> list[EncoderSpec]:
    """The weight-free `color_stats` encoder."""
    return [EncoderSpec(name="color_stats", dim=DIM, preprocess=None, build=build, family="color", params_m=0.0,
                        licence="Apache-2.0 (part of atlaspatch-stream)",
                        notes="weight-free: RGB/HSV/optical-density means, stds and 8-bin histograms (90 values)")]
