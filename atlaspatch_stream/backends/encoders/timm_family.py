"""Encoders built from stock timm architectures with embedded kwargs: OpenAI CLIP towers and pathology ViTs/ResNets.

timm cannot resolve `hf-hub:` names offline without the cached `config.json`, so the architecture kwargs each hub
config holds are written here (encoders.md Table A; the mlp ratios are load-bearing). Weights are the files upstream's
loaders fetch into the Hugging Face cache. CLIP files are in open_clip/OpenAI layout and DINOv2 hub checkpoints in
DINOv2 layout: timm's own checkpoint filters convert both.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

from .loading import filtered_load
from .spec import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    EncoderSpec,
    HubLoader,
    Preprocess,
    WeightsSource,
)

HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
# Lunit's published normalisation (1aurent hub configs).
LUNIT_MEAN = (0.70322989, 0.53606487, 0.66096631)
LUNIT_STD = (0.21716536, 0.26081574, 0.20723464)

_NC_ND = "CC-BY-NC-ND-4.0"


def _timm_builder(arch: str, **kwargs: Any) -> Callable[[], Any]:
    def build() -> Any:
        import timm

        return timm.create_model(arch, pretrained=False, **_resolve(kwargs))

    return build


def _resolve(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Replace the string placeholders for layer classes (kept as strings so this module imports without torch)."""
    import torch
    from timm.layers import SwiGLUPacked

    classes = {"SwiGLUPacked": SwiGLUPacked, "SiLU": torch.nn.SiLU}
    return {
        k: classes.get(v, v) if isinstance(v, str) and k.endswith("_layer") else v for k, v in kwargs.items()
    }


def cls_plus_mean(start: int | None = None) -> Callable[[Any, Any], Any]:
    """Pooling `concat(token 0, mean of tokens[start:])`; `start=None` uses the model's `num_prefix_tokens`."""

    def forward(model: Any, x: Any) -> Any:
        import torch

        tokens = model(x)
        first = model.num_prefix_tokens if start is None else start
        return torch.cat([tokens[:, 0], tokens[:, first:].mean(dim=1)], dim=-1)

    return forward


def _timm_filter(module: str) -> Callable[[dict[str, Any], Any], dict[str, Any]]:
    """timm's own `checkpoint_filter_fn` of `timm.models.<module>`, imported when a checkpoint is loaded."""

    def convert(state: dict[str, Any], model: Any) -> dict[str, Any]:
        return importlib.import_module(f"timm.models.{module}").checkpoint_filter_fn(state, model)

    return convert


def _clip_specs() -> list[EncoderSpec]:
    # (name, timm arch, dim, input size, params M); ViTs need the QuickGELU twins (plain GELU differs by 2e-2).
    table = [
        ("clip_rn50", "resnet50_clip", 1024, 224, 38.3),
        ("clip_rn101", "resnet101_clip", 512, 224, 56.3),
        ("clip_rn50x4", "resnet50x4_clip", 640, 288, 87.1),
        ("clip_rn50x16", "resnet50x16_clip", 768, 384, 167.3),
        ("clip_rn50x64", "resnet50x64_clip", 1024, 448, 420.4),
        ("clip_vit_b_32", "vit_base_patch32_clip_quickgelu_224", 512, 224, 87.8),
        ("clip_vit_b_16", "vit_base_patch16_clip_quickgelu_224", 512, 224, 86.2),
        ("clip_vit_l_14", "vit_large_patch14_clip_quickgelu_224", 768, 224, 304.0),
        ("clip_vit_l_14_336", "vit_large_patch14_clip_quickgelu_336", 768, 336, 304.3),
    ]
    out = []
    for name, arch, dim, size, params in table:
        is_vit = arch.startswith("vit")
        # open_clip's pretrained="openai" reads these timm-org repos
        repo = f"timm/{arch.replace('_quickgelu', '')}.openai"
        out.append(
            _hf_spec(name, dim, _timm_builder(arch, num_classes=dim),
                     Preprocess(size, size, CLIP_MEAN, CLIP_STD, "bicubic"), repo, "open_clip_pytorch_model.bin",
                     "open_clip", load_weights=filtered_load(_timm_filter("vision_transformer" if is_vit else "byobnet")),
                     licence="MIT (OpenAI CLIP)", family="clip-vit" if is_vit else "clip-resnet", params_m=params,
                     notes="projected image embedding (encode_image), not L2-normalised")
        )  # fmt: skip
    return out


_VIT_L_UNI = dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True)
_UNI2 = dict(
    img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536,
    mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True, mlp_layer="SwiGLUPacked", act_layer="SiLU",
    reg_tokens=8, dynamic_img_size=True,
)  # fmt: skip
_VIRCHOW = dict(
    img_size=224, init_values=1e-5, num_classes=0, mlp_ratio=5.3375, global_pool="",
    mlp_layer="SwiGLUPacked", act_layer="SiLU", dynamic_img_size=True,
)  # fmt: skip
_GIGAPATH = dict(
    img_size=224, patch_size=16, embed_dim=1536, depth=40, num_heads=24, init_values=1e-5,
    mlp_ratio=5.33334, num_classes=0,
)  # fmt: skip
_HOPTIMUS = dict(img_size=224, num_classes=0, global_pool="token", init_values=1e-5)
_H0_MINI = dict(
    img_size=224, num_classes=0, global_pool="", init_values=1e-5, mlp_ratio=4096 / 768,
    mlp_layer="SwiGLUPacked", act_layer="SiLU",
)  # fmt: skip

_IMAGENET_224_BICUBIC = Preprocess(224, 224, IMAGENET_MEAN, IMAGENET_STD, "bicubic")


def _hf_spec(
    name: str,
    dim: int,
    build: Callable[[], Any],
    pre: Preprocess,
    repo: str,
    filename: str = "pytorch_model.bin",
    loader: HubLoader = "timm",
    **extra: Any,
) -> EncoderSpec:
    extra.setdefault("meta_load", True)
    extra.setdefault("family", "timm-vit")
    weights = WeightsSource("hf", repo, filename, loader=loader)
    return EncoderSpec(name=name, dim=dim, preprocess=pre, build=build, weights=weights, **extra)


def _pathology_specs() -> list[EncoderSpec]:
    nc_spec = functools.partial(_hf_spec, licence=_NC_ND, gated=True)  # gated, non-commercial licence
    return [
        nc_spec("uni_v1", 1024, _timm_builder("vit_large_patch16_224", **_VIT_L_UNI), _IMAGENET_224_BICUBIC,
                "MahmoodLab/uni", params_m=303.4),  # upstream's spelling (folder models--MahmoodLab--uni)
        nc_spec("uni_v2", 1536, _timm_builder("vit_giant_patch14_224", **_UNI2), _IMAGENET_224_BICUBIC,
                "MahmoodLab/UNI2-h", params_m=681.4),
        _hf_spec("virchow_v1", 2560, _timm_builder("vit_huge_patch14_224", **_VIRCHOW), _IMAGENET_224_BICUBIC,
                 "paige-ai/Virchow", forward=cls_plus_mean(1), params_m=631.2, gated=True,
                 licence="Apache-2.0 (+ model card terms)"),
        nc_spec("virchow_v2", 2560, _timm_builder("vit_huge_patch14_224", reg_tokens=4, **_VIRCHOW),
                _IMAGENET_224_BICUBIC, "paige-ai/Virchow2", forward=cls_plus_mean(5), params_m=631.2),
        _hf_spec("prov_gigapath", 1536, _timm_builder("vit_giant_patch14_dinov2", **_GIGAPATH),
                 Preprocess(256, 224, IMAGENET_MEAN, IMAGENET_STD, "bicubic"), "prov-gigapath/prov-gigapath",
                 params_m=1135.0, gated=True, licence="Apache-2.0 with research-use conditions"),
        _hf_spec("h_optimus_0", 1536, _timm_builder("vit_giant_patch14_reg4_dinov2", **_HOPTIMUS),
                 Preprocess((224, 224), None, HOPTIMUS_MEAN, HOPTIMUS_STD, "bilinear"), "bioptimus/H-optimus-0",
                 params_m=1134.8, gated=True, licence="Apache-2.0"),
        nc_spec("h_optimus_1", 1536, _timm_builder("vit_giant_patch14_reg4_dinov2", **_HOPTIMUS),
                Preprocess((224, 224), None, HOPTIMUS_MEAN, HOPTIMUS_STD, "bilinear"), "bioptimus/H-optimus-1",
                params_m=1134.8),
        nc_spec("h0_mini", 1536, _timm_builder("vit_base_patch14_reg4_dinov2", **_H0_MINI),
                Preprocess(224, 224, HOPTIMUS_MEAN, HOPTIMUS_STD, "bicubic"), "bioptimus/H0-mini",
                forward=cls_plus_mean(None), params_m=85.7,
                notes="preprocessing from the hub timm data config (resize/crop 224 bicubic assumed)"),
        _hf_spec("pathorchestra", 1024,
                 _timm_builder("vit_large_patch16_224", num_classes=0, init_values=1e-5, dynamic_img_size=True),
                 Preprocess(224, None, IMAGENET_MEAN, IMAGENET_STD, "bilinear"), "AI4Pathology/PathOrchestra",
                 params_m=303.4, gated=True, licence="see model card",
                 notes="architecture assumed ViT-L/16 (hub config unverified)"),
        _hf_spec("openmidnight", 1536, _timm_builder("vit_giant_patch14_reg4_dinov2", img_size=224, num_classes=0),
                 Preprocess((224, 224), None, IMAGENET_MEAN, IMAGENET_STD, "bilinear"), "SophontAI/OpenMidnight",
                 "teacher_checkpoint_load.pt", "file", load_weights=filtered_load(_timm_filter("vision_transformer")),
                 params_m=1134.8, gated=True, licence="see model card",
                 notes="DINOv2 hub checkpoint converted by timm's DINOv2 filter (no torch.hub code fetch)"),
    ]  # fmt: skip


def _lunit_specs() -> list[EncoderSpec]:
    pre = Preprocess(224, 224, LUNIT_MEAN, LUNIT_STD, "bicubic")
    lunit_spec = functools.partial(
        _hf_spec, licence="Lunit non-commercial", notes="hub timm data config (224, Lunit stats; resize mode assumed)"
    )
    out = [
        lunit_spec(f"lunit_resnet50_{tag}", 2048, _timm_builder("resnet50", num_classes=0), pre,
                   f"1aurent/resnet50.lunit_{tag}", "model.safetensors", family="timm-resnet", params_m=23.5)
        for tag in ("bt", "swav", "mocov2")
    ]  # fmt: skip
    for patch in (16, 8):
        arch = f"vit_small_patch{patch}_224"
        out.append(
            lunit_spec(f"lunit_vit_small_patch{patch}_dino", 384, _timm_builder(arch, num_classes=0), pre,
                       f"1aurent/{arch}.lunit_dino", "model.safetensors", params_m=21.7)
        )  # fmt: skip
    return out


def specs() -> list[EncoderSpec]:
    """The timm-built encoder specs (CLIP towers, pathology ViTs and Lunit models)."""
    return _clip_specs() + _pathology_specs() + _lunit_specs()
