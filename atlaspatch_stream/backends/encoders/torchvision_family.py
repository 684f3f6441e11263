"""The 14 torchvision encoders: ResNet, ConvNeXt and ViT with their IMAGENET1K_V1 (ViT-H: SWAG-E2E) weights.

The architecture comes from torchvision with `weights=None`; the weights are the very files torchvision downloads
into `$TORCH_HOME/hub/checkpoints/`, so an existing upstream cache is used as it is. Heads are replaced by Identity
exactly as upstream does (ResNet `fc`, ConvNeXt the whole `classifier`, ViT `heads`), so the checkpoint's head keys
are dropped before a strict load. Preprocessing values are those of each weights enum's `transforms()`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .loading import drop_prefixes, filtered_load
from .spec import IMAGENET_MEAN, IMAGENET_STD, EncoderSpec, Interpolation, Preprocess, WeightsSource

_URL = "https://download.pytorch.org/models/"
_LICENCE = "BSD-3-Clause (torchvision, ImageNet-1k weights)"

# name: (dim, checkpoint file, resize, crop, interpolation, head attribute, params M)
_Row = tuple[int, str, int, int, Interpolation, str, float]
_TABLE: dict[str, _Row] = {
    "resnet18": (512, "resnet18-f37072fd.pth", 256, 224, "bilinear", "fc", 11.2),
    "resnet34": (512, "resnet34-b627a593.pth", 256, 224, "bilinear", "fc", 21.3),
    "resnet50": (2048, "resnet50-0676ba61.pth", 256, 224, "bilinear", "fc", 23.5),
    "resnet101": (2048, "resnet101-63fe2227.pth", 256, 224, "bilinear", "fc", 42.5),
    "resnet152": (2048, "resnet152-394f9c45.pth", 256, 224, "bilinear", "fc", 58.1),
    "convnext_tiny": (768, "convnext_tiny-983f1562.pth", 236, 224, "bilinear", "classifier", 27.8),
    "convnext_small": (768, "convnext_small-0c510722.pth", 230, 224, "bilinear", "classifier", 49.5),
    "convnext_base": (1024, "convnext_base-6075fbad.pth", 232, 224, "bilinear", "classifier", 87.6),
    "convnext_large": (1536, "convnext_large-ea097f82.pth", 232, 224, "bilinear", "classifier", 196.2),
    "vit_b_16": (768, "vit_b_16-c867db91.pth", 256, 224, "bilinear", "heads", 85.8),
    "vit_b_32": (768, "vit_b_32-d86f8d99.pth", 256, 224, "bilinear", "heads", 87.5),
    "vit_l_16": (1024, "vit_l_16-852ce7e3.pth", 242, 224, "bilinear", "heads", 303.3),
    "vit_l_32": (1024, "vit_l_32-c7638314.pth", 256, 224, "bilinear", "heads", 305.5),
    "vit_h_14": (1280, "vit_h_14_swag-80465313.pth", 518, 518, "bicubic", "heads", 632.2),
}


def _builder(name: str, head: str) -> Callable[[], Any]:
    def build() -> Any:
        import torch
        import torchvision.models as tvm

        # SWAG-E2E ViT-H weights are for 518 px (a 1370-token position embedding).
        extra = {"image_size": 518} if name == "vit_h_14" else {}
        model = getattr(tvm, name)(weights=None, **extra)
        setattr(model, head, torch.nn.Identity())
        return model

    return build


def _family(name: str) -> str:
    return name.split("_")[0].rstrip("0123456789") if not name.startswith("vit") else "vit"


def _spec(name: str, row: _Row) -> EncoderSpec:
    dim, filename, resize, crop, interp, head, params = row
    return EncoderSpec(
        name=name,
        dim=dim,
        preprocess=Preprocess(resize, crop, IMAGENET_MEAN, IMAGENET_STD, interp),
        build=_builder(name, head),
        # the checkpoint's head keys are dropped: the head is Identity in the built model
        load_weights=filtered_load(lambda state, _model: drop_prefixes(state, (f"{head}.",))),
        weights=WeightsSource("torchvision", filename=filename, url=_URL + filename),
        licence="CC-BY-NC-4.0 (SWAG weights)" if name == "vit_h_14" else _LICENCE,
        family=f"torchvision-{_family(name)}",
        params_m=params,
        meta_load=True,  # no unsaved buffers (checked by the tests)
    )


def specs() -> list[EncoderSpec]:
    """The torchvision encoder specs."""
    return [_spec(name, row) for name, row in _TABLE.items()]
