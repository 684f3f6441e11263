"""The 21 encoders built with `transformers` (the "hf" extra): DINOv2, DINOv3, Phikon, Hibou, Midnight, MedSigLIP, PLIP, Quilt.

Architectures come from configuration values embedded here (no hub `config.json` at run time); only weights come from
outside. Weights load with `Model.from_pretrained(None, config=EMBEDDED, state_dict=sd)`, never with meta + assign:
DINOv3's rope `inv_freq` and CLIP/SigLIP's `position_ids` are non-persistent buffers that assign-loading leaves
uninitialised, which gives finite but wrong features (reference N2).

Importing this module, and calling `specs()`, imports neither torch nor transformers; builders import them lazily.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atlaspatch_stream.backends.encoders.loading import import_extra, read_state_dict
from atlaspatch_stream.backends.encoders.spec import (
    CLIP_MEAN,
    CLIP_STD,
    HALF,
    IMAGENET_MEAN,
    IMAGENET_STD,
    EncoderSpec,
    Interpolation,
    Preprocess,
    Resampler,
    WeightsSource,
)
from atlaspatch_stream.errors import ConfigError, WeightsError

HIBOU_MEAN = (0.7068, 0.5755, 0.722)
HIBOU_STD = (0.195, 0.2316, 0.1816)
SAT_MEAN = (0.430, 0.411, 0.296)
SAT_STD = (0.213, 0.156, 0.143)

_RESAMPLE: dict[int, Interpolation] = {0: "nearest", 2: "bilinear", 3: "bicubic"}

# Keys present in published files that the vision-only classes do not have: text towers, CLIP/SigLIP logit
# parameters and ViT's unused pooler. Anything else unexpected is an error, because it means the recipe is wrong.
_IGNORABLE_PREFIXES = ("text_model.", "text_projection.", "logit_scale", "logit_bias", "pooler.")


@dataclass(frozen=True)
class HfRecipe:
    """How to build, pool and preprocess one transformers encoder.

    Attributes:
        model_class: transformers model class name (vision-only where the hub model is dual-tower).
        config_class: transformers config class name.
        config: the embedded architecture values (the hub `config.json` fields that matter).
        pooling: "cls" (last_hidden_state[:, 0]), "pooler" (pooler_output), "image_embeds" or "cls_mean".
        processor: the hub image-processor values (`preprocessor_config.json`), or None when upstream hard-codes
            a torchvision transform (then `preprocess` is given directly).
        model_kwargs: extra keyword arguments of the model constructor / from_pretrained.
        preprocess: explicit preprocessing for models without a hub processor.
    """

    model_class: str
    config_class: str
    config: Mapping[str, Any]
    pooling: str
    processor: Mapping[str, Any] | None
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    preprocess: Preprocess | None = None


def _bit_processor(short: int, crop: int, mean: tuple[float, ...], std: tuple[float, ...]) -> dict[str, Any]:
    """A BitImageProcessor dict: shortest-side resize (bicubic) then centre crop (DINOv2, Hibou, Phikon-v2)."""
    return {
        "image_processor_type": "BitImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": short},
        "do_center_crop": True,
        "crop_size": {"height": crop, "width": crop},
        "resample": 3,
        "image_mean": list(mean),
        "image_std": list(std),
    }


def _square_processor(
    kind: str, edge: int, resample: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> dict:
    """A processor dict that squashes to edge x edge with no crop (DINOv3, ViT/Phikon, SigLIP)."""
    return {
        "image_processor_type": kind,
        "do_resize": True,
        "size": {"height": edge, "width": edge},
        "do_center_crop": False,
        "resample": resample,
        "image_mean": list(mean),
        "image_std": list(std),
    }


def _clip_processor() -> dict[str, Any]:
    """CLIPImageProcessor as published with PLIP and QuiltNet: 224 shortest side bicubic, crop 224, CLIP stats."""
    return {**_bit_processor(224, 224, CLIP_MEAN, CLIP_STD), "image_processor_type": "CLIPImageProcessor"}


def preprocess_from_processor(processor: Mapping[str, Any]) -> Preprocess:
    """Translate a hub image-processor dict into our `Preprocess` (resize -> centre crop -> normalise).

    Args:
        processor: `preprocessor_config.json` values (size, crop_size, do_center_crop, resample, image_mean/std).

    Returns:
        The equivalent `Preprocess`; `shortest_edge` becomes an int resize, height/width a (h, w) squash.
    """
    size = processor["size"]
    resize: int | tuple[int, int] = (
        int(size["shortest_edge"]) if "shortest_edge" in size else (int(size["height"]), int(size["width"]))
    )
    crop = int(processor["crop_size"]["height"]) if processor.get("do_center_crop") else None
    mean, std = _rgb(processor["image_mean"]), _rgb(processor["image_std"])
    resampler: Resampler = (
        "tensor_float" if processor["image_processor_type"] in _RESCALE_FIRST else "tensor_uint8"
    )
    return Preprocess(resize, crop, mean, std, _RESAMPLE[int(processor["resample"])], resampler=resampler)


# transformers 5 processors run torchvision on tensors; these rescale to [0, 1] before resizing.
_RESCALE_FIRST = frozenset({"DINOv3ViTImageProcessorFast", "DINOv3ViTImageProcessor"})


def _rgb(values: Any) -> tuple[float, float, float]:
    """Three per-channel floats from a processor config list."""
    red, green, blue = (float(v) for v in values)
    return red, green, blue


def _dinov2(hidden: int, layers: int, heads: int, swiglu: bool, image: int = 518, patch: int = 14) -> dict:
    """Embedded Dinov2Config values (layerscale 1.0, eps 1e-6, qkv bias, mlp_ratio 4)."""
    return {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "mlp_ratio": 4,
        "use_swiglu_ffn": swiglu,
        "patch_size": patch,
        "image_size": image,
        "layerscale_value": 1.0,
        "layer_norm_eps": 1e-6,
        "qkv_bias": True,
    }


def _dinov3(hidden: int, layers: int, heads: int, inter: int, gated: bool, qkv_bias: bool = True) -> dict:
    """Embedded DINOv3ViTConfig values (transformers 5 key names, reference N13)."""
    return {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": inter,
        "use_gated_mlp": gated,
        "hidden_act": "silu" if gated else "gelu",
        "patch_size": 16,
        "image_size": 224,
        "num_register_tokens": 4,
        "rope_theta": 100.0,
        "layer_norm_eps": 1e-5,
        "layerscale_value": 1.0,
        "query_bias": qkv_bias,
        "key_bias": False,
        "value_bias": qkv_bias,
        "pos_embed_rescale": 2.0,
    }


def _clip_vision(patch: int) -> dict:
    """Embedded CLIPVisionConfig of a ViT-B CLIP tower with a 512-wide projection (PLIP, QuiltNet)."""
    return {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "patch_size": patch,
        "image_size": 224,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": 512,
    }


def _hibou(hidden: int, layers: int, heads: int) -> dict:
    """Embedded Dinov2WithRegistersConfig for Hibou (4 registers, SwiGLU; reference N4)."""
    return {**_dinov2(hidden, layers, heads, swiglu=True, image=224), "num_register_tokens": 4}


_DINOV2_PROC = _bit_processor(256, 224, IMAGENET_MEAN, IMAGENET_STD)
_DINOV3_PROC = {
    "lvd1689m": _square_processor("DINOv3ViTImageProcessorFast", 224, 2, IMAGENET_MEAN, IMAGENET_STD),
    "sat493m": _square_processor("DINOv3ViTImageProcessorFast", 224, 2, SAT_MEAN, SAT_STD),
}
_HIBOU_PROC = _bit_processor(224, 224, HIBOU_MEAN, HIBOU_STD)

_D2 = ("Dinov2Model", "Dinov2Config")
_D2R = ("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig")
_D3 = ("DINOv3ViTModel", "DINOv3ViTConfig")
_CLIPV = ("CLIPVisionModelWithProjection", "CLIPVisionConfig")

# size: (hidden, layers, heads, SwiGLU, params M); repo facebook/dinov2-SIZE.
_DINOV2: dict[str, tuple[int, int, int, bool, float]] = {
    "small": (384, 12, 6, False, 22.1),
    "base": (768, 12, 12, False, 86.6),
    "large": (1024, 24, 16, False, 304.4),
    "giant": (1536, 40, 24, True, 1136.5),
}
# name: (`_dinov3` arguments, repo model, pretraining data, params M); repo facebook/dinov3-MODEL-pretrain-DATA.
_DINOV3: dict[str, tuple[tuple[Any, ...], str, str, float]] = {
    "dinov3_vits16": ((384, 12, 6, 1536, False), "vits16", "lvd1689m", 21.6),
    "dinov3_vits16_plus": ((384, 12, 6, 1536, True), "vits16plus", "lvd1689m", 28.7),
    "dinov3_vitb16": ((768, 12, 12, 3072, False), "vitb16", "lvd1689m", 85.7),
    "dinov3_vitl16": ((1024, 24, 16, 4096, False), "vitl16", "lvd1689m", 303.1),
    "dinov3_vitl16_sat": ((1024, 24, 16, 4096, False), "vitl16", "sat493m", 303.1),
    "dinov3_vith16_plus": ((1280, 32, 20, 5120, True), "vith16plus", "lvd1689m", 840.6),
    "dinov3_vit7b16": ((4096, 40, 32, 8192, True, False), "vit7b16", "lvd1689m", 6716.0),
    "dinov3_vit7b16_sat": ((4096, 40, 32, 8192, True, False), "vit7b16", "sat493m", 6716.0),
}

RECIPES: dict[str, HfRecipe] = {
    **{
        f"dinov2_{size}": HfRecipe(*_D2, _dinov2(hidden, layers, heads, swiglu), "cls", _DINOV2_PROC)
        for size, (hidden, layers, heads, swiglu, _) in _DINOV2.items()
    },
    **{
        name: HfRecipe(*_D3, _dinov3(*arch), "pooler", _DINOV3_PROC[data])
        for name, (arch, _, data, _) in _DINOV3.items()
    },
    "phikon_v1": HfRecipe(
        "ViTModel",
        "ViTConfig",
        {
            "hidden_size": 768,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "intermediate_size": 3072,
            "patch_size": 16,
            "image_size": 224,
            "qkv_bias": True,
            "layer_norm_eps": 1e-12,
        },
        "cls",
        _square_processor("ViTImageProcessor", 224, 3, IMAGENET_MEAN, IMAGENET_STD),
        model_kwargs={"add_pooling_layer": False},
    ),
    "phikon_v2": HfRecipe(
        *_D2,
        _dinov2(1024, 24, 16, False, image=224, patch=16),
        "cls",
        _bit_processor(224, 224, IMAGENET_MEAN, IMAGENET_STD),
    ),
    "hibou_b": HfRecipe(*_D2R, _hibou(768, 12, 12), "pooler", _HIBOU_PROC),
    "hibou_l": HfRecipe(*_D2R, _hibou(1024, 24, 16), "pooler", _HIBOU_PROC),
    # Midnight's checkpoint carries a 37x37 position grid, so image_size must be 518 (N7); upstream hard-codes
    # a torchvision transform rather than using a hub processor.
    "midnight": HfRecipe(
        *_D2,
        _dinov2(1536, 40, 24, True, image=518),
        "cls_mean",
        None,
        preprocess=Preprocess(224, 224, HALF, HALF, "bilinear"),
    ),
    "medsiglip": HfRecipe(
        "SiglipVisionModel",
        "SiglipVisionConfig",
        {
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "num_hidden_layers": 27,
            "num_attention_heads": 16,
            "patch_size": 14,
            "image_size": 448,
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-6,
            "vision_use_head": True,
        },
        "pooler",
        _square_processor("SiglipImageProcessor", 448, 3, HALF, HALF),
    ),
    "plip": HfRecipe(*_CLIPV, _clip_vision(32), "image_embeds", _clip_processor()),
    "quilt_b_32": HfRecipe(*_CLIPV, _clip_vision(32), "image_embeds", _clip_processor()),
    "quilt_b_16": HfRecipe(*_CLIPV, _clip_vision(16), "image_embeds", _clip_processor()),
}


@dataclass(frozen=True)
class _Meta:
    """Per-name facts that are not architecture: dim, weights, licence, gate, size (notes are in `_NOTES`)."""

    dim: int
    repo: str
    licence: str
    gated: bool
    params_m: float
    filename: str = "model.safetensors"


_CLIP_NOTE = (
    "vision tower only (CLIPVisionModelWithProjection -> image_embeds): transformers 5 returns an output object "
    "from CLIPModel.get_image_features, which upstream's forward assumes is a tensor; we take the projected tensor"
)
_SHARDED_NOTE = "sharded weights (≈27 GB in fp32); refused with a clear message when they cannot fit in memory"
_OWKIN = "Owkin non-commercial"
_META: dict[str, _Meta] = {
    **{
        f"dinov2_{size}": _Meta(hidden, f"facebook/dinov2-{size}", "Apache-2.0", False, params_m)
        for size, (hidden, _, _, _, params_m) in _DINOV2.items()
    },
    **{
        name: _Meta(
            arch[0],
            f"facebook/dinov3-{model}-pretrain-{data}",
            "DINOv3",
            True,
            params_m,
            "model.safetensors.index.json" if model == "vit7b16" else "model.safetensors",
        )
        for name, (arch, model, data, params_m) in _DINOV3.items()
    },
    "phikon_v1": _Meta(768, "owkin/phikon", _OWKIN, False, 85.8),
    "phikon_v2": _Meta(1024, "owkin/phikon-v2", _OWKIN, False, 303.4),
    # upstream's spelling: the cache folder is models--histai--hibou-B
    "hibou_b": _Meta(768, "histai/hibou-B", "Apache-2.0", True, 85.7),
    "hibou_l": _Meta(1024, "histai/hibou-L", "Apache-2.0", True, 303.7),
    "midnight": _Meta(3072, "kaiko-ai/midnight", "MIT", False, 1136.5),
    "medsiglip": _Meta(1152, "google/medsiglip-448", "Health AI Developer Foundations terms", True, 428.6),
    "plip": _Meta(512, "vinid/plip", "non-commercial research", False, 87.8, "pytorch_model.bin"),
    "quilt_b_32": _Meta(512, "wisdomik/QuiltNet-B-32", "see model card", False, 87.8, "pytorch_model.bin"),
    "quilt_b_16": _Meta(512, "wisdomik/QuiltNet-B-16", "see model card", False, 86.2, "pytorch_model.bin"),
}
_NOTES: dict[str, str] = {
    "dinov3_vit7b16": _SHARDED_NOTE,
    "dinov3_vit7b16_sat": _SHARDED_NOTE,
    "phikon_v1": "hub resample unverified",
    "phikon_v2": "image_size 224 inferred from the published parameter count; hub processor values unverified",
    "hibou_b": "native Dinov2WithRegistersModel instead of the hub's remote code (which imports transformers.onnx, "
        "gone in transformers 5); key names expected to match the hub class, to verify once on the real file",
    "hibou_l": "native Dinov2WithRegistersModel; SwiGLU inferred from the published parameter count",
    "midnight": "image_size 518 so the 37x37 position grid loads; interpolated to 16x16 at 224 px like upstream",
    "medsiglip": "vision tower only (SiglipVisionModel -> pooler_output, the MAP head): transformers 5 returns an "
        "output object from SiglipModel.get_image_features; hub resample unverified (bicubic assumed)",
    "plip": _CLIP_NOTE,
    "quilt_b_32": _CLIP_NOTE,
    "quilt_b_16": _CLIP_NOTE,
}

def _transformers() -> Any:
    """Import transformers, or say which extra to install."""
    return import_extra(
        "transformers",
        "this encoder needs the 'hf' extra: pip install 'atlaspatch-stream[hf]' (or pip install transformers)",
    )


def make_config(recipe: HfRecipe) -> Any:
    """The transformers config object for a recipe, from the embedded values only (no hub access)."""
    return getattr(_transformers(), recipe.config_class)(**recipe.config)


def build_model(recipe: HfRecipe) -> Any:
    """Build a recipe's model with random init (or on the meta device when called under `torch.device("meta")`)."""
    model_cls = getattr(_transformers(), recipe.model_class)
    return model_cls(make_config(recipe), **recipe.model_kwargs).eval()


def pool_cls(model: Any, x: Any) -> Any:
    """CLS token after the final LayerNorm: `last_hidden_state[:, 0]` (DINOv2, Phikon)."""
    return model(pixel_values=x).last_hidden_state[:, 0]


def pool_pooler(model: Any, x: Any) -> Any:
    """The model's `pooler_output` (DINOv3 and Hibou: normalised CLS; SigLIP: the MAP head)."""
    return model(pixel_values=x).pooler_output


def pool_image_embeds(model: Any, x: Any) -> Any:
    """The projected CLIP image embedding, not L2-normalised (what `get_image_features` gives)."""
    return model(pixel_values=x).image_embeds


def pool_cls_mean(model: Any, x: Any) -> Any:
    """CLS concatenated with the mean of the patch tokens (Midnight: 2 x 1536 = 3072)."""
    import torch

    tokens = model(pixel_values=x).last_hidden_state
    return torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=-1)


POOLINGS: dict[str, Callable[[Any, Any], Any]] = {
    "cls": pool_cls,
    "pooler": pool_pooler,
    "image_embeds": pool_image_embeds,
    "cls_mean": pool_cls_mean,
}


def _available_bytes(device: Any) -> int:
    """Free memory where tensors are being created: the CUDA device's, else the host's MemAvailable."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def ensure_fits(name: str, params_m: float, *, extra_bytes: int = 0) -> None:
    """Refuse a model that cannot fit where it would be materialised, before trying (the DINOv3 7B pair).

    The estimate is parameters x bytes per element of the current default dtype (+ `extra_bytes`, e.g. a state dict
    held at the same time) against the free memory of the current default device. Meta builds always pass.

    Raises:
        ConfigError: with the estimate, what is available, and what to do instead.
    """
    import torch

    device = torch.empty(0).device
    if device.type == "meta":
        return
    dtype = torch.get_default_dtype()
    need = int(params_m * 1e6) * torch.empty(0, dtype=dtype).element_size() + extra_bytes
    have = _available_bytes(device)
    if need > have:
        raise ConfigError(
            f"encoder {name} needs about {need / 2**30:.1f} GiB ({params_m:.0f} M parameters in {dtype}) but only "
            f"{have / 2**30:.1f} GiB is free on {device}; use a machine with more memory or a GPU in half precision"
        )


def _guarded_build(name: str, recipe: HfRecipe, params_m: float) -> Any:
    """Build, refusing up front when the model cannot fit (only large models are checked, the check is cheap)."""
    if params_m > 1000:
        ensure_fits(name, params_m)
    return build_model(recipe)


def _check_loading_info(name: str, path: Path, info: Mapping[str, Any]) -> None:
    """Fail loudly on missing or mis-shaped keys, and on unexpected keys that are not a known extra tower."""
    missing = list(info.get("missing_keys", []))
    mismatched = list(info.get("mismatched_keys", []))
    unexpected = [k for k in info.get("unexpected_keys", []) if not k.startswith(_IGNORABLE_PREFIXES)]
    if missing or mismatched or unexpected:
        raise WeightsError(
            f"weights {path} do not fit encoder {name}: missing {missing[:5]} ({len(missing)}), "
            f"unexpected {unexpected[:5]} ({len(unexpected)}), shape mismatches {mismatched[:5]} ({len(mismatched)})"
        )


def load_weights(name: str, model: Any, path: str | os.PathLike[str]) -> Any:
    """Load a published weights file into a fresh model of the encoder's class: `from_pretrained(None, ...)`.

    Only `model`'s class and config are used, so the caller may pass a model built on the meta device.

    Args:
        name: the encoder name (for messages and the memory check).
        model: a model built by the spec (meta or real).
        path: the weights file (safetensors, pickle, or a sharded index).

    Returns:
        A new model in eval mode with the weights; the non-persistent buffers are built by transformers itself.

    Raises:
        WeightsError: unreadable file, or keys that do not fit the embedded architecture.
    """
    recipe = RECIPES[name]
    path = Path(path)
    if _META[name].params_m > 1000:
        ensure_fits(name, _META[name].params_m, extra_bytes=path.stat().st_size if path.is_file() else 0)
    state_dict = adapt_keys(read_state_dict(path), set(model.state_dict()))
    model_cls = getattr(_transformers(), recipe.model_class)
    try:
        loaded, info = model_cls.from_pretrained(
            None,
            config=make_config(recipe),
            state_dict=state_dict,
            output_loading_info=True,
            dtype=state_dict_dtype(state_dict),
            **recipe.model_kwargs,
        )
    except RuntimeError as exc:  # transformers raises on shape mismatches itself
        raise WeightsError(
            f"weights {path} do not fit encoder {name}: {' '.join(str(exc).split())[:600]}"
        ) from exc
    _check_loading_info(name, path, info)
    return loaded.eval()


def adapt_keys(state_dict: Mapping[str, Any], expected: set[str]) -> dict[str, Any]:
    """Drop a wrapper prefix that the vision-only class does not have (`vision_model.` of a full SiglipModel file
    against transformers 5's flat SiglipVisionModel, or a DDP `module.`), key by key, only where it makes the key
    one the model expects; everything else is passed through for the loading report to judge."""
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        if key not in expected:
            for prefix in ("module.", "vision_model."):
                if key.startswith(prefix) and key.removeprefix(prefix) in expected:
                    key = key.removeprefix(prefix)
                    break
        out[key] = value
    return out


def state_dict_dtype(state_dict: Mapping[str, Any]) -> Any:
    """The floating dtype of a state dict's first floating tensor (float32 when none), so nothing is silently cast."""
    import torch

    for tensor in state_dict.values():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def _spec(name: str) -> EncoderSpec:
    """Assemble one EncoderSpec from its recipe and meta facts."""
    recipe, meta = RECIPES[name], _META[name]
    preprocess = recipe.preprocess or preprocess_from_processor(recipe.processor or {})
    return EncoderSpec(
        name=name,
        dim=meta.dim,
        preprocess=preprocess,
        build=functools.partial(_guarded_build, name, recipe, meta.params_m),
        forward=POOLINGS[recipe.pooling],
        load_weights=functools.partial(load_weights, name),
        weights=WeightsSource("hf", repo_id=meta.repo, filename=meta.filename, loader="transformers"),
        tier="hf",
        licence=meta.licence,
        gated=meta.gated,
        family=recipe.model_class,
        params_m=meta.params_m,
        notes=_NOTES.get(name, ""),
        meta_load=False,
    )


def specs() -> list[EncoderSpec]:
    """The 21 transformers encoders, in upstream's order within the family. Imports neither torch nor transformers."""
    return [_spec(name) for name in RECIPES]
