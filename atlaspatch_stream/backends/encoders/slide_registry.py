"""Slide and patient encoders: upstream 1.1's `titan`, `prism` and `moozy`, `mean-<patch encoder>` pooling, and
plugins (`register_slide_encoders(registry, device)` in a `--feature-plugin` file).

Each slide encoder names the patch encoder whose features it reads, the patch size it needs and the magnification it
was trained at; `plan_slide_encoders` turns a request into checks (before any slide) and the patch encoders to run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from ...config import PipelineConfig
from ...errors import ConfigError
from ...protocols import SlideEncoder
from .slide_spec import BuildContext, H5Call, SlideEncoderSpec, call_here

MEAN_PREFIX = "mean-"


def _build_mean(spec: SlideEncoderSpec, context: BuildContext) -> SlideEncoder:
    from .slide_mean import MeanPooling

    return MeanPooling(spec.name, spec.patch_encoder, spec.dim)


def _build_moozy(spec: SlideEncoderSpec, context: BuildContext) -> SlideEncoder:
    from .slide_moozy import build

    return build(spec, context)


def _prepare_moozy(spec: SlideEncoderSpec, context: BuildContext) -> None:
    from .slide_moozy import prepare

    prepare(spec, context)


def _build_hf(spec: SlideEncoderSpec, context: BuildContext) -> SlideEncoder:
    from .slide_hf import build

    return build(spec, context)


def _prepare_hf(spec: SlideEncoderSpec, context: BuildContext) -> None:
    from .slide_hf import prepare

    prepare(spec, context)


BUILTIN: dict[str, SlideEncoderSpec] = {
    "titan": SlideEncoderSpec("titan", "conch_v15", 768, 512, 20, False, "titan",
                              "Hugging Face MahmoodLab/TITAN (gated; the repo's own code)", _build_hf, _prepare_hf),
    "prism": SlideEncoderSpec("prism", "virchow_v1", 1280, 224, 20, False, "prism",
                              "Hugging Face paige-ai/Prism (gated; the repo's own code)", _build_hf, _prepare_hf),
    "moozy": SlideEncoderSpec("moozy", "lunit_vit_small_patch8_dino", 768, 224, 20, True, "moozy",
                              "Hugging Face AtlasAnalyticsLab/MOOZY, file moozy.pt", _build_moozy, _prepare_moozy),
}


def mean_spec(name: str) -> SlideEncoderSpec:
    """`mean-<patch encoder>`: the mean of a slide's (or a case's) patch features; any geometry, no weights."""
    return SlideEncoderSpec(name, name[len(MEAN_PREFIX):], 0, None, None, True, None, "none (weight-free)",
                            _build_mean)


class SlideEncoderRegistry:
    """Built-in slide encoders plus plugin ones, bound to one device, precision and `--weights` mapping."""

    def __init__(self, *, device: str = "cpu", precision: str = "float32",
                 weights: Mapping[str, Path] | None = None, h5_call: H5Call = call_here) -> None:
        self.device = device
        self.precision = precision
        self.h5_call = h5_call
        self._weights = {k.lower(): Path(v) for k, v in (weights or {}).items()}
        self._plugins: dict[str, SlideEncoderSpec] = {}

    def register(self, name: str, *, patch_encoder: str, dim: int, builder: Callable[[], SlideEncoder],
                 patch_size: int | None = None, target_mag: int | None = None, patient: bool = False) -> None:
        """Register a plugin slide encoder; `builder()` returns an object with `name`, `patch_encoder`, `dim`,
        `warm_up()`, `encode(slides) -> Embedding` and `close()` (`protocols.SlideEncoder`).

        Raises:
            ConfigError: the name is taken.
        """
        key = name.lower()
        if key in BUILTIN or key in self._plugins or key.startswith(MEAN_PREFIX):
            raise ConfigError(f"slide encoder {key!r} is already registered")
        self._plugins[key] = SlideEncoderSpec(key, patch_encoder.lower(), int(dim), patch_size, target_mag, patient,
                                              None, "plugin", lambda _spec, _context: builder())

    def available(self) -> list[str]:
        """Every fixed name (plus the `mean-<patch encoder>` pattern)."""
        return sorted({*BUILTIN, *self._plugins, MEAN_PREFIX + "<patch encoder>"})

    def spec(self, name: str) -> SlideEncoderSpec:
        """The spec of `name`.

        Raises:
            ConfigError: an unknown name.
        """
        key = name.lower()
        if key in self._plugins:
            return self._plugins[key]
        if key in BUILTIN:
            return BUILTIN[key]
        if key.startswith(MEAN_PREFIX) and len(key) > len(MEAN_PREFIX):
            return mean_spec(key)
        raise ConfigError(f"unknown slide encoder {name!r}; available: {', '.join(self.available())}")

    def context(self, name: str) -> BuildContext:
        """The device, precision and local weights of `name`."""
        return BuildContext(self.device, self.precision, self._weights.get(name.lower()), self.h5_call)

    def prepare(self, names: Sequence[str]) -> None:
        """Check every extra and find every weight file (MissingExtraError / WeightsError before any slide)."""
        for name in names:
            spec = self.spec(name)
            if spec.prepare is not None:
                spec.prepare(spec, self.context(name))

    def create(self, name: str) -> SlideEncoder:
        """`name` built (not yet warmed up)."""
        spec = self.spec(name)
        return spec.build(spec, self.context(name))


def is_slide_encoder(name: str) -> bool:
    """Whether `--weights NAME=...` may name a slide encoder (built-ins only; plugins bring their own weights)."""
    return name.lower() in BUILTIN


def build_slide_registry(config: PipelineConfig, device: str | None = None,
                         h5_call: H5Call = call_here) -> SlideEncoderRegistry:
    """A registry for this run: built-ins plus the slide encoders of every `--feature-plugin` file; `h5_call` runs
    an encoder's own reads of slide H5s (the output's one H5 thread)."""
    from ...plugins import load_slide_plugin

    enc = config.encode
    registry = SlideEncoderRegistry(device=device or config.feature_device, precision=enc.precision,
                                    weights={k: v for k, v in enc.weights if is_slide_encoder(k)}, h5_call=h5_call)
    for path in enc.plugins:
        load_slide_plugin(Path(path), registry=registry, device=registry.device)
    return registry


def plan_slide_encoders(config: PipelineConfig, names: Sequence[str], *, patient: bool = False) -> PipelineConfig:
    """Check a request for slide (or patient) encoders and return the config with their patch encoders added.

    Checks, each one line naming the encoder, before any slide: the name is known (and embeds cases, for
    `encode-patient`), `--patch-size` is what each needs and all agree ("incompatible patch geometries"),
    `--target-mag` is the magnification each was trained at, the extra is installed and the weights are found.

    Raises:
        ConfigError, MissingExtraError, WeightsError.
    """
    registry = build_slide_registry(config)
    specs = [registry.spec(n) for n in names]
    for spec in specs:
        if patient and not spec.patient:
            raise ConfigError(f"{spec.name} is a slide encoder only; patient encoders: moozy, mean-<patch encoder>")
    check_geometry(specs, config.plan.patch_size, config.plan.target_mag)
    registry.prepare(names)
    extractors = tuple(dict.fromkeys([*config.encode.extractors, *(s.patch_encoder for s in specs)]))
    slide = () if patient else tuple(s.name for s in specs)
    return config.replace(encode=replace(config.encode, extractors=extractors, slide_encoders=slide))


def check_geometry(specs: Sequence[SlideEncoderSpec], patch_size: int, target_mag: int) -> None:
    """`--patch-size` and `--target-mag` against what each encoder needs (upstream checks only the size).

    Raises:
        ConfigError: one line naming the encoder and the value it needs.
    """
    sizes = {s.name: s.patch_size for s in specs if s.patch_size is not None}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{n} needs {p}" for n, p in sizes.items())
        raise ConfigError(f"incompatible patch geometries: {listed}; run them in separate calls")
    for spec in specs:
        if spec.patch_size is not None and spec.patch_size != patch_size:
            raise ConfigError(f"slide encoder {spec.name} needs --patch-size {spec.patch_size} "
                              f"(its patch encoder {spec.patch_encoder}), got {patch_size}")
        if spec.target_mag is not None and spec.target_mag != target_mag:
            raise ConfigError(f"slide encoder {spec.name} was trained at {spec.target_mag}x: use --target-mag "
                              f"{spec.target_mag} (got {target_mag})")
