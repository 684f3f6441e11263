"""Encoders that need a few modules of our own on top of a timm trunk: CONCH v1, CONCH v1.5, BiomedCLIP, CHIEF.

Each module keeps the parameter names of the published checkpoint, so the files load strictly after a prefix filter:
- CONCH v1: timm ViT-B/16 at 448 -> 1-query attentional pooler (`nn.MultiheadAttention` 512 <- 768) -> LayerNorm(512).
- CONCH v1.5: timm ViT-L/16 -> 1-query CoCa pooler (to_q / to_kv / to_out, no biases) -> LayerNorm(768).
- BiomedCLIP: timm ViT-B/16 CLS -> Linear(768, 512, bias=False) (open_clip's timm head with `proj="linear"`).
- CHIEF-CTransPath: timm Swin-T with a convolutional stem; mean of the final-norm NHWC map.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from .loading import load_strict, read_state_dict, select_prefix
from .spec import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, EncoderSpec, Preprocess, WeightsSource


@functools.cache
def _modules() -> dict[str, type]:
    """The module classes by name, created on first use so that importing this file does not import torch."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from timm.models.vision_transformer import VisionTransformer

    class AttentionalPooler(nn.Module):
        """CONCH v1's contrastive pooler: learned queries attend over the layer-normed trunk tokens."""

        def __init__(
            self, d_model: int = 512, context_dim: int = 768, n_head: int = 8, n_queries: int = 1
        ) -> None:
            super().__init__()
            self.query = nn.Parameter(torch.randn(n_queries, d_model))
            self.attn = nn.MultiheadAttention(
                d_model, n_head, kdim=context_dim, vdim=context_dim, batch_first=True
            )
            self.ln_q = nn.LayerNorm(d_model)
            self.ln_k = nn.LayerNorm(context_dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.ln_k(x)
            q = self.ln_q(self.query).unsqueeze(0).expand(x.shape[0], -1, -1)
            return self.attn(q, x, x, need_weights=False)[0]

    class CoCaPooler(nn.Module):
        """CONCH v1.5's pooler: separate bias-free projections, multi-head scaled dot-product attention."""

        def __init__(
            self, dim: int = 768, context_dim: int = 1024, heads: int = 8, n_queries: int = 1
        ) -> None:
            super().__init__()
            self.heads = heads
            self.query = nn.Parameter(torch.randn(n_queries, dim))
            self.ln_q = nn.LayerNorm(dim)
            self.ln_k = nn.LayerNorm(context_dim)
            self.to_q = nn.Linear(dim, dim, bias=False)
            self.to_kv = nn.Linear(context_dim, dim * 2, bias=False)
            self.to_out = nn.Linear(dim, dim, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            context = self.ln_k(x)
            q = self.to_q(self.ln_q(self.query)).unsqueeze(0).expand(x.shape[0], -1, -1)
            k, v = self.to_kv(context).chunk(2, dim=-1)
            split = [t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v)]
            out = F.scaled_dot_product_attention(*split)
            return self.to_out(out.transpose(1, 2).flatten(2))

    class PooledTrunk(nn.Module):
        """trunk.forward_features tokens -> pooler -> first query -> LayerNorm (CONCH image embedding)."""

        def __init__(self, trunk: VisionTransformer, pooler: nn.Module, dim: int) -> None:
            super().__init__()
            self.trunk: VisionTransformer = trunk
            self.attn_pool_contrast = pooler
            self.ln_contrast = nn.LayerNorm(dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            tokens = self.trunk.forward_features(x)
            return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])

    class ProjectedTrunk(nn.Module):
        """timm trunk CLS -> bias-free linear projection (BiomedCLIP's visual tower)."""

        def __init__(self, trunk: nn.Module, in_dim: int, out_dim: int) -> None:
            super().__init__()
            self.trunk = trunk
            self.proj = nn.Linear(in_dim, out_dim, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(self.trunk(x))

    class ConvStem(nn.Module):
        """CTransPath's patch embedding: two 3x3 stride-2 conv/BN/ReLU (embed/8, embed/4), 1x1 conv, LayerNorm."""

        def __init__(self, img_size: Any = 224, patch_size: Any = 4, in_chans: int = 3, embed_dim: int = 96,
                     norm_layer: Any = None, output_fmt: str = "NHWC", **_: Any) -> None:  # fmt: skip
            super().__init__()
            if patch_size not in (4, (4, 4)):
                raise ValueError("ConvStem needs patch size 4")
            size = img_size if isinstance(img_size, tuple) else (img_size, img_size)
            self.img_size, self.patch_size = size, (4, 4)
            self.grid_size = (size[0] // 4, size[1] // 4)
            self.num_patches = self.grid_size[0] * self.grid_size[1]
            self.flatten = output_fmt != "NHWC"
            layers: list[nn.Module] = []
            width_in, width_out = in_chans, embed_dim // 8
            for _stage in range(2):
                layers += [nn.Conv2d(width_in, width_out, 3, 2, 1, bias=False), nn.BatchNorm2d(width_out),
                           nn.ReLU(inplace=True)]  # fmt: skip
                width_in, width_out = width_out, width_out * 2
            layers.append(nn.Conv2d(width_in, embed_dim, kernel_size=1))
            self.proj = nn.Sequential(*layers)
            self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

        def set_input_size(self, img_size: Any = None, **_: Any) -> None:
            if img_size is not None:
                size = img_size if isinstance(img_size, tuple) else (img_size, img_size)
                self.img_size, self.grid_size = size, (size[0] // 4, size[1] // 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(self.proj(x).permute(0, 2, 3, 1))

    return {c.__name__: c for c in (AttentionalPooler, CoCaPooler, PooledTrunk, ProjectedTrunk, ConvStem)}


# --- CONCH v1 -------------------------------------------------------------------------------------------------


def _build_conch_v1() -> Any:
    import timm

    trunk = timm.create_model(
        "vit_base_patch16_224", pretrained=False, img_size=448, num_classes=0, dynamic_img_size=True
    )
    return _modules()["PooledTrunk"](trunk, _modules()["AttentionalPooler"](512, 768, 8, 1), 512)


def _load_conch_v1(model: Any, path: str) -> Any:
    # The file is the whole CoCa model: keep the image trunk, the contrastive pooler and its LayerNorm only.
    visual = select_prefix(read_state_dict(path), "visual.")
    keep = ("trunk.", "attn_pool_contrast.", "ln_contrast.")
    return load_strict(model, {k: v for k, v in visual.items() if k.startswith(keep)})


# --- CONCH v1.5 -----------------------------------------------------------------------------------------------


def _build_conch_v15() -> Any:
    import timm

    # Built at 448 so the position embedding is resampled once at load time (see _resample_dino).
    trunk = timm.create_model(
        "vit_large_patch16_224", pretrained=False, img_size=448, init_values=1e-6, num_classes=0
    )
    return _modules()["PooledTrunk"](trunk, _modules()["CoCaPooler"](768, 1024, 8, 1), 768)


def _resample_dino(pos_embed: Any, grid: int) -> Any:
    """The DINO-style resize TITAN applies every forward: bicubic by `scale_factor=(grid+0.1)/old`, no antialias."""
    import torch.nn.functional as F

    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    old = int(math.sqrt(patch_pos.shape[1]))
    if old == grid:
        return pos_embed
    scale = (grid + 0.1) / old
    square = patch_pos.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    resized = F.interpolate(square, scale_factor=(scale, scale), mode="bicubic", align_corners=False)
    resized = resized[:, :, :grid, :grid].permute(0, 2, 3, 1).reshape(1, grid * grid, -1)
    return __import__("torch").cat([cls_pos, resized.to(pos_embed.dtype)], dim=1)


def _load_conch_v15(model: Any, path: str) -> Any:
    state = read_state_dict(path)
    if any(k.startswith("visual.") for k in state):
        state = select_prefix(state, "visual.")
    key = "trunk.pos_embed"
    if key in state:
        state[key] = _resample_dino(state[key], model.trunk.patch_embed.grid_size[0])
    return load_strict(model, state)


# --- BiomedCLIP -----------------------------------------------------------------------------------------------


def _build_biomedclip() -> Any:
    import timm

    trunk = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    return _modules()["ProjectedTrunk"](trunk, 768, 512)


def _load_biomedclip(model: Any, path: str) -> Any:
    state = read_state_dict(path)
    picked = {"trunk." + k: v for k, v in select_prefix(state, "visual.trunk.").items()}
    if "visual.head.proj.weight" in state:
        picked["proj.weight"] = state["visual.head.proj.weight"]
    return load_strict(model, picked)


# --- CHIEF-CTransPath -----------------------------------------------------------------------------------------


def _build_chief() -> Any:
    import timm

    return timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, embed_layer=_modules()["ConvStem"], num_classes=0
    )


def _load_chief(model: Any, path: str) -> Any:
    from timm.models.swin_transformer import checkpoint_filter_fn

    # The filter moves original-layout `layers.i.downsample` to timm's `layers.i+1` and drops rebuilt buffers.
    state = checkpoint_filter_fn(read_state_dict(path), model)
    return load_strict(model, {k: v for k, v in state.items() if not k.startswith("head.")})


def specs() -> list[EncoderSpec]:
    """Specs of the encoders that use our own small modules."""
    return [
        EncoderSpec(
            name="conch_v1", dim=512,
            preprocess=Preprocess(448, 448, CLIP_MEAN, CLIP_STD, "bicubic"),
            build=_build_conch_v1, load_weights=_load_conch_v1,
            weights=WeightsSource("hf", "MahmoodLab/conch", "pytorch_model.bin"),
            licence="CC-BY-NC-ND-4.0", gated=True, family="conch", params_m=87.6, meta_load=True,
            notes="encode_image(proj_contrast=False, normalize=False)",
        ),
        EncoderSpec(
            name="conch_v15", dim=768,
            preprocess=Preprocess(448, 448, IMAGENET_MEAN, IMAGENET_STD, "bilinear"),
            build=_build_conch_v15, load_weights=_load_conch_v15,
            weights=WeightsSource("hf", "MahmoodLab/conchv1_5", "pytorch_model_vision.bin"),
            licence="CC-BY-NC-ND-4.0", gated=True, family="conch", params_m=306.7, meta_load=True,
            notes="TITAN's CONCH v1.5; preprocessing and pooler numerics unverified against real weights",
        ),
        EncoderSpec(
            name="biomedclip", dim=512,
            preprocess=Preprocess(224, 224, CLIP_MEAN, CLIP_STD, "bicubic"),
            build=_build_biomedclip, load_weights=_load_biomedclip,
            weights=WeightsSource(
                "hf", "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224", "open_clip_pytorch_model.bin",
                loader="open_clip",
            ),
            licence="MIT", family="biomedclip", params_m=86.2, meta_load=True,
        ),
        EncoderSpec(
            name="chief-ctranspath", dim=768,
            preprocess=Preprocess(224, None, IMAGENET_MEAN, IMAGENET_STD, "bilinear"),
            build=_build_chief, load_weights=_load_chief,
            weights=WeightsSource(
                "local", filename="CHIEF_CTransPath.pth",
                note="upstream fetches it from Google Drive id 1_vgRF1QXa8sPCOpJ1S9BihwZhXQMOVJc with gdown; also in "
                "the gated dataset MahmoodLab/hest-bench fm_v1/ctranspath/",
                folder="atlas_patch/chief",  # where upstream's gdown download puts it, under torch.hub.get_dir()
            ),
            licence="CHIEF AGPL-3.0 / CTransPath GPL-3.0; weights research use", family="chief-swin",
            params_m=27.5, meta_load=False,  # Swin's relative_position_index / attn_mask are not saved
        ),
    ]  # fmt: skip
