"""The two encoders built with `open_clip` (the "openclip" extra): OmiCLIP (CoCa ViT-L/14) and QuiltNet-B-16-PMB.

Only the image tower is built (`open_clip`'s own vision-tower builder with the model config that ships inside
open_clip), so the text tower and the CoCa decoder cost nothing. Weights come from the published open_clip files:
`visual.*` keys (after stripping a DDP `module.` prefix) load strictly into the tower.

Importing this module, and calling `specs()`, imports neither torch nor open_clip.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import MissingExtraError, WeightsError
from .loading import import_extra, load_tower, read_state_dict, select_prefix
from .spec import CLIP_MEAN, CLIP_STD, EncoderSpec, Preprocess, WeightsSource


@dataclass(frozen=True)
class OpenClipRecipe:
    """One open_clip image tower.

    Attributes:
        model_name: the open_clip model config name (shipped with open_clip, no hub access).
        quick_gelu: the activation the checkpoint was trained with.
        normalize: L2-normalise the output, as the `encode_image` call upstream makes does by default.
        tokens_out: the tower returns (pooled, tokens) (CoCa); the pooled latent is the feature.
    """

    model_name: str
    quick_gelu: bool
    normalize: bool
    tokens_out: bool


RECIPES: dict[str, OpenClipRecipe] = {
    # CoCa.encode_image defaults to normalize=True and upstream calls it without arguments.
    "omiclip": OpenClipRecipe("coca_ViT-L-14", quick_gelu=False, normalize=True, tokens_out=True),
    # CLIP/CustomTextCLIP.encode_image defaults to normalize=False. Activation per the open_clip ViT-B-16 config
    # (GELU); the hub open_clip_config.json is unverified here (reference N6).
    "quilt_b_16_pmb": OpenClipRecipe("ViT-B-16", quick_gelu=False, normalize=False, tokens_out=False),
}

def build_visual(recipe: OpenClipRecipe) -> Any:
    """Build the image tower of an open_clip model config (random init, or meta under `torch.device("meta")`)."""
    open_clip = import_extra(
        "open_clip",
        "this encoder needs the 'openclip' extra: pip install 'atlaspatch-stream[openclip]' "
        "(or pip install open_clip_torch)",
    )
    from open_clip.model import _build_vision_tower

    cfg = open_clip.get_model_config(recipe.model_name)
    if cfg is None:  # pragma: no cover - only with an open_clip that dropped the config
        raise MissingExtraError(
            f"open_clip {open_clip.__version__} has no model config {recipe.model_name!r}"
        )
    return _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu=recipe.quick_gelu).eval()


def encode(recipe: OpenClipRecipe, model: Any, x: Any) -> Any:
    """Upstream's `encode_image(x)` on the tower alone: the pooled latent, L2-normalised when the model class does."""
    import torch.nn.functional as F

    out = model(x)
    latent = out[0] if recipe.tokens_out else out
    return F.normalize(latent, dim=-1) if recipe.normalize else latent


def visual_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The image-tower keys of a full open_clip checkpoint: strip `module.` (DDP) then keep `visual.*` unprefixed."""
    return select_prefix({k.removeprefix("module."): v for k, v in state_dict.items()}, "visual.")


def load_weights(name: str, model: Any, path: str | os.PathLike[str]) -> Any:
    """Load an open_clip checkpoint's `visual.*` weights strictly into the tower.

    A model on the meta device is materialised by assignment (the towers have no non-persistent buffers, so
    this is exact and skips random init).

    Raises:
        WeightsError: unreadable file, no `visual.*` keys, or keys/shapes that do not fit the tower.
    """
    path = Path(path)
    weights = visual_state_dict(read_state_dict(path))
    if not weights:
        raise WeightsError(f"weights {path} hold no 'visual.*' keys: not an open_clip checkpoint for {name}")
    return load_tower(model, weights, path, name)


_SPECS: dict[str, dict[str, Any]] = {
    "omiclip": {
        "dim": 768,
        "weights": WeightsSource("hf", repo_id="WangGuangyuLab/Loki", filename="checkpoint.pt"),
        "licence": "BSD-3-Clause",
        "gated": True,
        "params_m": 306.7,
        "notes": (
            "CoCa ViT-L/14 image tower only; output L2-normalised like CoCa.encode_image's default; the published "
            "checkpoint is an open_clip training pickle: it must load with weights_only=True (re-save the state "
            "dict otherwise)"
        ),
    },
    "quilt_b_16_pmb": {
        "dim": 512,
        "weights": WeightsSource(
            "hf", repo_id="wisdomik/QuiltNet-B-16-PMB", filename="open_clip_pytorch_model.bin", loader="open_clip"
        ),
        "licence": "see model card",
        "gated": False,
        "params_m": 86.2,
        "notes": "ViT-B/16 image tower only; GELU assumed (hub open_clip_config.json unverified)",
    },
}

# open_clip's default eval transform: shortest side 224 bicubic, centre crop, OpenAI CLIP statistics.
_PREPROCESS = Preprocess(224, 224, CLIP_MEAN, CLIP_STD, "bicubic")


def _spec(name: str) -> EncoderSpec:
    """Assemble one EncoderSpec."""
    recipe, facts = RECIPES[name], _SPECS[name]
    return EncoderSpec(
        name=name,
        preprocess=_PREPROCESS,
        build=functools.partial(build_visual, recipe),
        forward=functools.partial(encode, recipe),
        load_weights=functools.partial(load_weights, name),
        tier="openclip",
        family=f"open_clip:{recipe.model_name}",
        meta_load=True,
        **facts,
    )


def specs() -> list[EncoderSpec]:
    """The open_clip encoders. Imports neither torch nor open_clip."""
    return [_spec(name) for name in RECIPES]
