"""TITAN and PRISM: each model repo's own code and weights, from the Hugging Face cache under upstream's repo ids.

As upstream 1.1 does, the configuration and model classes come from the repo's `config.json` `auto_map` through
transformers' dynamic-module loader (the repo's Python files, cached beside its weights), the model is built from
`config.json` and `model.safetensors` is loaded: strictly for TITAN; for PRISM with tied word embeddings turned off
(also in its BioGPT sub-config), non-strictly because shared weights are stored once (unexpected keys are still
refused), and its text decoder is then dropped. Files are looked up in the cache first (downloaded only when online
and not `HF_HUB_OFFLINE`); both repos are gated, so access must be granted on the hub once.

Precision as upstream: the model cast to float16 with float16 autocast on CUDA for `--feature-precision float16`
(bfloat16 likewise), float32 on the CPU. Unlike upstream, TITAN always gets float32 features: float16 features break
its grid (it index-adds them into a float32 grid).
"""

from __future__ import annotations

import contextlib
import importlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from ...errors import ConfigError, MissingExtraError, WeightsError
from ...protocols import Embedding, SlideEncoder, SlideInputs
from ..weights import fetch_hf_file
from .slide_spec import BuildContext, SlideEncoderSpec

REPOS = {"titan": "MahmoodLab/TITAN", "prism": "paige-ai/Prism"}
# What each repo's own code imports (TITAN builds its CONCH v1.5 tower too).
MODULES = {"titan": ("transformers", "open_clip", "fairscale", "einops_exts", "sentencepiece"),
           "prism": ("transformers", "environs", "sacremoses")}
FILES = ("config.json", "model.safetensors")


def prepare(spec: SlideEncoderSpec, context: BuildContext) -> None:
    """The extra's modules import and the repo's config and weights are found (before any slide)."""
    for module in MODULES[spec.name]:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise MissingExtraError(f"slide encoder {spec.name} needs the '{spec.extra}' extra ({module} is missing): "
                                    f"pip install 'atlaspatch-stream[{spec.extra}]'", extra=spec.extra) from exc
    if context.weights is not None:
        raise ConfigError(f"--weights {spec.name}=PATH is not supported: {spec.name} loads from the Hugging Face "
                          f"cache ({REPOS[spec.name]}), as upstream")
    for filename in FILES:
        fetch_hf_file(REPOS[spec.name], filename)


def build(spec: SlideEncoderSpec, context: BuildContext) -> SlideEncoder:
    """TITAN or PRISM on the context's device (loaded by `warm_up`)."""
    prepare(spec, context)
    return RepoSlideEncoder(spec, context.device, context.precision)


def load_repo_model(repo_id: str, name: str) -> Any:
    """The repo's model class built from its `config.json`, with `model.safetensors` loaded (upstream's rules)."""
    from safetensors.torch import load_file
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    config_file = fetch_hf_file(repo_id, "config.json")
    auto_map = json.loads(config_file.read_text()).get("auto_map", {})
    if "AutoConfig" not in auto_map or "AutoModel" not in auto_map:
        raise WeightsError(f"{config_file}: no auto_map for AutoConfig/AutoModel; is this the {repo_id} repo?")
    folder = str(config_file.parent)
    config_class: Any = get_class_from_dynamic_module(auto_map["AutoConfig"], folder)
    config = config_class.from_pretrained(folder)
    if name == "prism":
        _untie(config)
    model = get_class_from_dynamic_module(auto_map["AutoModel"], folder)(config)
    state = load_file(str(fetch_hf_file(repo_id, "model.safetensors")))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or (missing and name != "prism"):
        raise WeightsError(f"{repo_id}: model.safetensors does not fit the repo's model "
                           f"(missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]})")
    if name == "prism" and hasattr(model, "text_decoder"):
        del model.text_decoder
    return model


def _untie(config: Any) -> None:
    """PRISM stores shared weights once: its word embeddings are not tied, also in the BioGPT sub-config."""
    config.tie_word_embeddings = False
    sub = getattr(config, "biogpt_config", None)
    if sub is not None:
        sub.tie_word_embeddings = False


class RepoSlideEncoder:
    """TITAN (features, coords, level-0 patch size) or PRISM (features only) (`protocols.SlideEncoder`)."""

    def __init__(self, spec: SlideEncoderSpec, device: str, precision: str) -> None:
        self.name = spec.name
        self.patch_encoder = spec.patch_encoder
        self.dim = spec.dim
        self.device = device
        self.precision = precision
        self.model: Any = None

    def _dtype(self) -> Any:
        import torch

        if not self.device.startswith("cuda") or self.precision == "float32":
            return None
        return torch.bfloat16 if self.precision == "bfloat16" else torch.float16

    def warm_up(self) -> None:
        """Build and load the model on the device, cast as upstream does."""
        model = load_repo_model(REPOS[self.name], self.name).to(self.device).eval()
        dtype = self._dtype()
        self.model = model.to(dtype) if dtype is not None else model

    def encode(self, slides: Sequence[SlideInputs]) -> Embedding:
        """One slide's embedding, float32 (dim,)."""
        import torch

        (slide,) = slides
        features = torch.from_numpy(np.ascontiguousarray(slide.features, dtype=np.float32)).unsqueeze(0)
        dtype = self._dtype()
        autocast = torch.autocast("cuda", dtype) if dtype is not None else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            if self.name == "titan":
                coords = torch.from_numpy(slide.coords[:, :2].astype(np.int64)).unsqueeze(0).to(self.device)
                out = self.model.encode_slide_from_patch_features(features.to(self.device), coords,
                                                                  slide.patch_size_level0)
            else:
                out = self.model.slide_representations(features.to(self.device))["image_embedding"]
        return Embedding(out.detach().float().cpu().numpy().reshape(-1).astype(np.float32), {})

    def close(self) -> None:
        """Drop the model."""
        self.model = None
