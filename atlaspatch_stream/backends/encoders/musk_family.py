"""MUSK (the "musk" extra): torchscale's BEiT-3 large, with upstream's multi-scale (`ms_aug`) pooling written here.

The architecture is PyPI `torchscale`'s `BEiT3` (which reproduces MUSK's vendored copy key for key, reference N10);
install it with `pip install --no-deps torchscale fairscale` because torchscale pins an old timm. Do not
`pip install musk`: that PyPI name is an unrelated package.

Upstream calls MUSK with `ms_aug=True, with_head=False, out_norm=False, return_global=True`. That output is
2048 wide (CLS at 384 px ++ mean CLS of the 2x2 tiles of the 768 px bicubic upscale), although upstream declares
1024; we declare 2048 because that is what is stored.

Importing this module, and calling `specs()`, imports neither torch nor torchscale.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from atlaspatch_stream.backends.encoders.loading import import_extra, load_tower, read_state_dict
from atlaspatch_stream.backends.encoders.spec import HALF, EncoderSpec, Preprocess, WeightsSource
from atlaspatch_stream.errors import WeightsError

# BEiT-3 large as MUSK configures it (img 384, patch 16, vocab 64010, multiway, 1024/24/16, FFN 4096).
MUSK_CONFIG: dict[str, Any] = {
    "img_size": 384,
    "patch_size": 16,
    "vocab_size": 64010,
    "multiway": True,
    "layernorm_embedding": False,
    "normalize_output": True,
    "no_output_layer": True,
    "drop_path_rate": 0.0,
    "encoder_embed_dim": 1024,
    "encoder_attention_heads": 16,
    "encoder_ffn_embed_dim": 4096,
    "encoder_layers": 24,
    "checkpoint_activations": False,
}
SCALES: tuple[int, ...] = (1, 2)


def _torchscale() -> Any:
    """Import torchscale's BEiT3 and EncoderConfig, or say how to install them."""
    missing = (
        "encoder musk needs the 'musk' extra: pip install --no-deps torchscale fairscale "
        "(not 'pip install musk', an unrelated package)"
    )
    config = import_extra("torchscale.architecture.config", missing).EncoderConfig
    return import_extra("torchscale.model.BEiT3", missing).BEiT3, config


def _module_class() -> type:
    """The wrapper class, defined on first use so that torch is imported lazily."""
    import torch

    class MuskVision(torch.nn.Module):
        """MUSK's image path: `beit3` (same key names as the published file) and the multi-scale CLS pooling."""

        def __init__(self, config: Mapping[str, Any], scales: Sequence[int]) -> None:
            super().__init__()
            beit3_cls, config_cls = _torchscale()
            self.beit3 = beit3_cls(config_cls(**dict(config)))
            self.scales = tuple(scales)
            self.img_size = int(config["img_size"])

        def cls_token(self, x: torch.Tensor) -> torch.Tensor:
            """The CLS token after the final LayerNorm, for images at the model's own size."""
            return self.beit3(visual_tokens=x)["encoder_out"][:, 0]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            """Multi-scale CLS: one width per scale, concatenated (2 x 1024 for MUSK)."""
            return multiscale_cls(self.cls_token, x, self.scales, self.img_size)

    return MuskVision


def split_grid(x: Any, parts: int) -> Any:
    """Cut a (B, C, H, W) batch into parts x parts tiles stacked on the batch axis, tile-major: (parts^2 * B, ...)."""
    import torch

    h, w = x.shape[-2] // parts, x.shape[-1] // parts
    tiles = [x[..., i * h : (i + 1) * h, j * w : (j + 1) * w] for i in range(parts) for j in range(parts)]
    return torch.cat(tiles, dim=0)


def multiscale_cls(cls_fn: Any, x: Any, scales: Sequence[int], tile: int) -> Any:
    """Upstream's `ms_aug`: per scale, bicubic upscale, cut into tiles of `tile` px, CLS per tile, mean over tiles.

    Args:
        cls_fn: (N, C, tile, tile) -> (N, D) CLS features.
        x: the preprocessed batch, (B, C, tile, tile).
        scales: upscale factors; 1 is the input itself.
        tile: the model's input edge (the split size).

    Returns:
        (B, D * len(scales)), scale 1 first.
    """
    import math

    import torch
    import torch.nn.functional as F

    batch = x.shape[0]
    feats = []
    for scale in scales:
        size = (x.shape[-2] * scale, x.shape[-1] * scale)
        # Interpolate in float32 (bicubic is not implemented for half on every device), then cast back.
        scaled = x if scale == 1 else F.interpolate(x.float(), size=size, mode="bicubic", align_corners=False)
        parts = math.ceil(max(size) / tile)
        cls = cls_fn(split_grid(scaled.to(x.dtype), parts))
        feats.append(cls.reshape(parts * parts, batch, -1).mean(dim=0))
    return torch.cat(feats, dim=-1)


def build(config: Mapping[str, Any] | None = None, scales: Sequence[int] = SCALES) -> Any:
    """Build MUSK's image model (random init, or meta under `torch.device("meta")`); `config` overrides for tests."""
    merged = {**MUSK_CONFIG, **(config or {})}
    return _module_class()(merged, scales).eval()


def forward(model: Any, x: Any) -> Any:
    """The spec's forward: the multi-scale pooled features of a preprocessed 384 px batch."""
    return model(x)


def load_weights(model: Any, path: str | os.PathLike[str]) -> Any:
    """Load a MUSK `model.safetensors` strictly into the `beit3` part; a meta model is materialised by assignment.

    Raises:
        WeightsError: unreadable file, no `beit3.*` keys, or keys/shapes that do not fit.
    """
    path = Path(path)
    # Only the `beit3.*` keys: the heads and the logit scale are not used for image features.
    weights = {k: v for k, v in read_state_dict(path).items() if k.startswith("beit3.")}
    if not weights:
        raise WeightsError(f"weights {path} hold no 'beit3.*' keys: not a MUSK checkpoint")
    return load_tower(model, weights, path, "musk")


def specs() -> list[EncoderSpec]:
    """The MUSK encoder. Imports neither torch nor torchscale."""
    return [
        EncoderSpec(
            name="musk",
            dim=1024 * len(SCALES),
            # Resize 384 bicubic (antialias) -> crop 384 -> Inception mean/std 0.5.
            preprocess=Preprocess(384, 384, HALF, HALF, "bicubic"),
            build=functools.partial(build, None, SCALES),
            forward=forward,
            load_weights=load_weights,
            weights=WeightsSource(
                "hf",
                repo_id="xiangjx/musk",
                filename="model.safetensors",
                note="MUSK's own helper saves it to ~/.cache/model.safetensors, outside the HF cache",
            ),
            tier="musk",
            licence="CC-BY-NC-ND-4.0",
            gated=True,
            family="torchscale:BEiT3",
            params_m=673.1,  # image model only; the published 675.2 M adds the two unused 1024x1024 heads
            notes=(
                "ms_aug output is 2048 wide (CLS@384 ++ mean CLS of 2x2 tiles of the 768 px upscale); upstream "
                "declares 1024 but stores 2048; needs pip install --no-deps torchscale fairscale"
            ),
            meta_load=True,
        )
    ]
