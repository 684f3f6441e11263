"""`EncoderSpec`: everything the package knows about one encoder name, without importing torch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

Interpolation = Literal["bilinear", "bicubic", "nearest"]
Resampler = Literal["pil", "tensor_uint8", "tensor_float"]
Tier = Literal["core", "hf", "openclip", "musk"]


# The file names upstream's hub loaders request, in their order (the first one the repo has is the one cached):
# timm (`hf-hub:` names) and open_clip ask for the safetensors twin before the pickle; transformers' `from_pretrained`
# tries single and sharded safetensors, then single and sharded pickles. "file" loaders download one named file.
HubLoader = Literal["file", "timm", "transformers", "open_clip"]
_LOADER_FILES: dict[str, tuple[str, ...]] = {
    "timm": ("model.safetensors", "pytorch_model.bin"),
    "transformers": (
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
    ),
    "open_clip": ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"),
}


@dataclass(frozen=True)
class WeightsSource:
    """Where upstream gets an encoder's weights.

    kind "hf": `repo_id` (spelled exactly as upstream spells it: the cache folder name depends on it) and `filename`
    (the file the published repo holds) in the Hugging Face cache, looked up under every name in `files`;
    kind "torchvision": `filename` under `$TORCH_HOME/hub/checkpoints/` (torchvision's own cache);
    kind "local": `--weights NAME=PATH`, or `filename` under `$TORCH_HOME/hub/<folder>/` when upstream keeps its own
    copy there; kind "none": weight-free.
    """

    kind: Literal["hf", "torchvision", "local", "none"]
    repo_id: str | None = None
    filename: str | None = None
    url: str | None = None
    note: str = ""
    loader: HubLoader = "file"
    folder: str | None = None

    @property
    def files(self) -> tuple[str, ...]:
        """The file names looked up in the repo, in upstream's loader's order."""
        if self.loader != "file":
            return _LOADER_FILES[self.loader]
        return (self.filename,) if self.filename else ()


@dataclass(frozen=True)
class Preprocess:
    """Upstream's transform, replayed as tensor ops: resize -> centre crop -> normalise.

    `resize` is an int (shortest side, aspect kept, as torchvision `Resize(int)`), a (h, w) pair (squash), or None.
    `crop` is the centre-crop edge or None.
    """

    resize: int | tuple[int, int] | None
    crop: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: Interpolation = "bilinear"
    antialias: bool = True
    # Whose resampling upstream's transform runs: "pil" (torchvision transforms on a PIL image, open_clip, timm),
    # "tensor_uint8" (transformers 5 image processors: torchvision on the uint8 tensor) or "tensor_float"
    # (processors that rescale to [0, 1] before resizing, e.g. DINOv3).
    resampler: Resampler = "pil"

    @property
    def input_size(self) -> int:
        """The edge of the tensor the model sees."""
        if self.crop is not None:
            return self.crop
        if isinstance(self.resize, tuple):
            return self.resize[0]
        return int(self.resize or 0)


@dataclass(frozen=True)
class EncoderSpec:
    """One encoder name: architecture builder, pooling, preprocessing, weights and licence."""

    name: str
    dim: int
    preprocess: Preprocess | None  # None: the encoder takes raw uint8 patches (weight-free encoders)
    # -> torch.nn.Module with random init (or on the meta device when called under it)
    build: Callable[[], Any]
    forward: Callable[[Any, Any], Any] | None = None  # (model, x) -> (B, D); default model(x) flattened
    # (model, path) -> loaded model; default: strict state dict
    load_weights: Callable[[Any, str], Any] | None = None
    weights: WeightsSource = field(default_factory=lambda: WeightsSource("none"))
    tier: Tier = "core"
    licence: str = ""
    gated: bool = False
    family: str = ""
    params_m: float | None = None
    notes: str = ""
    # Build on meta + to_empty + assign-load gives identical outputs (no unsaved buffers).
    meta_load: bool = False

    @property
    def input_size(self) -> int:
        """The edge of the model input, 0 for encoders that take raw patches."""
        return self.preprocess.input_size if self.preprocess else 0

    @property
    def extra(self) -> str | None:
        """The pip extra that this encoder needs, or None for the core install."""
        return None if self.tier == "core" else self.tier


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)


@dataclass
class CustomEncoderComponents:
    """What a custom loader returns (`plugins.register_custom_encoder`; defined here so the runtime needs no plugins).

    Attributes:
        model: a torch `nn.Module`; it is moved to the device and dtype and set to `eval()`.
        preprocess: PIL.Image -> CHW tensor, run on the CPU per patch.
        forward_fn: batch tensor -> (B, D) tensor; defaults to `model(batch)`. Higher-rank outputs are flattened.
    """

    model: Any
    preprocess: Callable[[Any], Any]
    forward_fn: Callable[[Any], Any] | None = None
