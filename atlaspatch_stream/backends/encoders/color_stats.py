"""`color_stats`: a weight-free patch encoder of colour statistics, for QC and stain checks.

It lets the whole pipeline run anywhere (no weights, no download) and gives features that mean something: how
bright, how saturated, how much haematoxylin/eosin-like optical density a patch has. Deterministic, pure torch ops
on the encoder's device.
"""

from __future__ import annotations

from typing import Any

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


def _module_class() -> type:
    import torch
    import torch.nn as nn

    class ColorStats(nn.Module):
        """Per-patch colour statistics, 90 float32 values.

        Input: float (B, 3, H, W) RGB in [0, 1] (the runtime's uint8 / 255, no resize, no normalisation).

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

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            rgb = x.float().flatten(2)  # (B, 3, N)
            spaces = [rgb, _hsv(rgb), _optical_density(rgb)]
            means = torch.cat([s.mean(dim=2) for s in spaces], dim=1)
            stds = torch.cat([s.std(dim=2, correction=0) for s in spaces], dim=1)
            hists = [_histogram(rgb, 1.0), _histogram(spaces[1], 1.0), _histogram(spaces[2], OD_MAX)]
            return torch.cat([means, stds, *hists], dim=1)

    def _hsv(rgb: torch.Tensor) -> torch.Tensor:
        r, g, b = rgb.unbind(dim=1)
        value, argmax = rgb.max(dim=1)
        delta = value - rgb.min(dim=1).values
        safe = torch.where(delta > 0, delta, torch.ones_like(delta))
        hue = torch.where(
            argmax == 0,
            ((g - b) / safe) % 6,
            torch.where(argmax == 1, (b - r) / safe + 2, (r - g) / safe + 4),
        )
        hue = torch.where(delta > 0, hue / 6.0, torch.zeros_like(hue))
        sat = torch.where(
            value > 0, delta / torch.where(value > 0, value, torch.ones_like(value)), torch.zeros_like(value)
        )
        return torch.stack([hue, sat, value], dim=1)

    def _optical_density(rgb: torch.Tensor) -> torch.Tensor:
        return -torch.log10((rgb * 255.0 + 1.0) / 256.0)

    def _histogram(values: torch.Tensor, top: float) -> torch.Tensor:
        index = (values / top * BINS).floor().clamp(0, BINS - 1).long()  # (B, 3, N)
        counts = torch.zeros(*index.shape[:2], BINS, device=values.device, dtype=torch.float32)
        counts.scatter_add_(2, index, torch.ones_like(index, dtype=torch.float32))
        return (counts / values.shape[2]).flatten(1)

    return ColorStats


def build() -> Any:
    """A new `ColorStats` module (no parameters)."""
    return _module_class()()


def specs() -> list[EncoderSpec]:
    """The weight-free `color_stats` encoder."""
    return [
        EncoderSpec(
            name="color_stats",
            dim=DIM,
            preprocess=None,
            build=build,
            licence="Apache-2.0 (part of atlaspatch-stream)",
            family="color",
            params_m=0.0,
            notes="weight-free: RGB/HSV/optical-density means, stds and 8-bin histograms (90 values)",
        )
    ]
