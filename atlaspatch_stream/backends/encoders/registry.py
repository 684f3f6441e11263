"""The encoder registry: every built-in name, plugin registration, and up-front weight/extra checks.

Built-in specs come from the family modules listed in `FAMILY_MODULES`, imported lazily (a family whose optional
extra is not installed still imports: its builders import the extra's packages only when a model is built).
`EncoderRegistry.prepare` resolves weights and extras for every requested name, so a run stops with `WeightsError` /
`MissingExtraError` before the first slide; `create` then builds, loads and warms the encoder.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ...errors import ConfigError, MissingExtraError
from .spec import EncoderSpec

FAMILY_MODULES: tuple[str, ...] = (
    "torchvision_family",
    "timm_family",
    "own_family",
    "color_stats",
    "hf_family",
    "openclip_family",
    "musk_family",
)
# tier -> (import names that must be present, how to install them)
EXTRAS: dict[str, tuple[tuple[str, ...], str]] = {
    "hf": (("transformers",), 'pip install "atlaspatch-stream[hf]"  (transformers)'),
    "openclip": (("open_clip",), 'pip install "atlaspatch-stream[openclip]"  (open_clip_torch)'),
    "musk": (
        ("torchscale", "fairscale", "einops"),
        "pip install --no-deps torchscale fairscale && pip install einops",
    ),
}


class DuplicateEncoderError(ConfigError, ValueError):
    """A name registered twice (upstream raises ValueError; we keep that base for plugin code that catches it)."""


@functools.lru_cache(maxsize=1)
def _builtin_specs() -> dict[str, EncoderSpec]:
    specs: dict[str, EncoderSpec] = {}
    for module_name in FAMILY_MODULES:
        for spec in importlib.import_module(f"{__package__}.{module_name}").specs():
            if spec.name in specs:
                raise RuntimeError(f"encoder {spec.name!r} is defined twice (second time in {module_name})")
            specs[spec.name] = spec
    return specs


def available_encoders() -> list[str]:
    """All built-in encoder names (every family present in the install), sorted."""
    return sorted(_builtin_specs())


def get_spec(name: str) -> EncoderSpec:
    """The spec of a built-in encoder.

    Raises:
        ConfigError: unknown name (the message lists the known ones).
    """
    spec = _builtin_specs().get(name.lower())
    if spec is None:
        raise ConfigError(f"unknown encoder {name!r}; available: {', '.join(available_encoders())}")
    return spec


def parse_feature_list(text: str, available: Iterable[str]) -> tuple[str, ...]:
    """Upstream's `--feature-extractors` rules: comma and/or whitespace separated, lowercased, no unknown or repeats.

    Raises:
        ConfigError: empty list, unknown names or duplicates (all named).
    """
    names = [part.lower() for part in re.split(r"[,\s]+", text.strip()) if part]
    if not names:
        raise ConfigError("--feature-extractors is empty")
    known = {n.lower() for n in available}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(
            f"unknown feature extractor(s): {', '.join(unknown)}; available: {', '.join(sorted(known))}"
        )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"duplicate feature extractor(s): {', '.join(repeated)}")
    return tuple(names)


def check_extra(spec: EncoderSpec) -> None:
    """Raise `MissingExtraError` when the optional packages an encoder needs are not installed."""
    if spec.extra is None or spec.extra not in EXTRAS:
        return
    modules, how = EXTRAS[spec.extra]
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtraError(
            f"encoder {spec.name} needs {', '.join(missing)} (extra '{spec.extra}'): {how}", extra=spec.extra
        )


class EncoderRegistry:
    """Built-in specs plus plugin builders, bound to one device / precision / weights mapping.

    Also answers upstream's plugin-facing API: `register(name, builder)` and `available()`.
    """

    def __init__(
        self, *, device: str = "cpu", precision: str = "float32", weights: Mapping[str, Path] | None = None,
        num_workers: int = 0, compile: bool = False,
    ) -> None:  # fmt: skip
        self.device = device
        self.precision = precision
        self.num_workers = num_workers
        self.compile = compile
        self._weights = {k.lower(): Path(v) for k, v in (weights or {}).items()}
        self._builders: dict[str, Callable[[], Any]] = {}
        self._resolved: dict[str, Path | None] = {}

    def register(self, name: str, builder: Callable[[], Any]) -> None:
        """Register a plugin encoder builder under `name` (lowercased).

        `builder()` returns either an object with `encode(pixels)` (our protocol) or an upstream feature extractor
        (`name`, `embedding_dim`, `extract_batch(list, *, batch_size)`, `cleanup()`).

        Raises:
            DuplicateEncoderError: the name is a built-in or already registered.
        """
        key = name.lower()
        if key in _builtin_specs() or key in self._builders:
            raise DuplicateEncoderError(f"feature extractor {key!r} is already registered")
        self._builders[key] = builder

    def available(self) -> list[str]:
        """All names: built-ins and plugins, sorted."""
        return sorted({*_builtin_specs(), *self._builders})

    def prepare(self, names: Sequence[str]) -> None:
        """Check extras and resolve (or download) weights for every name, before any slide is processed.

        Raises:
            ConfigError: an unknown name.
            MissingExtraError: an optional dependency is not installed.
            WeightsError: weights are not to be had.
        """
        from .loading import resolve_weights

        for name in names:
            key = name.lower()
            if key in self._builders or key in self._resolved:
                continue
            spec = get_spec(key)
            check_extra(spec)
            self._resolved[key] = resolve_weights(spec, self._weights.get(key))

    def create(self, name: str) -> Any:
        """A loaded encoder on the device, warmed up (implements `protocols.Encoder`)."""
        key = name.lower()
        if key in self._builders:
            return _adapt(self._builders[key]())
        self.prepare([key])
        from .runtime import TorchEncoder

        encoder = TorchEncoder(
            get_spec(key), device=self.device, precision=self.precision, weights=self._resolved[key],
            compile=self.compile,
        )
        encoder.warm_up()
        return encoder

    def weights_path(self, name: str) -> Path | None:
        """The weights file `prepare` found for `name` (None: weight-free or not prepared)."""
        return self._resolved.get(name.lower())


def _adapt(built: Any) -> Any:
    if hasattr(built, "encode"):
        return built
    if hasattr(built, "extract_batch"):
        from .runtime import ExtractorEncoder

        return ExtractorEncoder(built)
    raise TypeError(
        f"plugin builder returned {type(built).__name__}, which has neither encode() nor extract_batch()"
    )


def plugin_dtype(device: str, precision: str) -> Any:
    """The torch dtype handed to plugins: upstream's whole-model cast, fp16 on CPU falling back to fp32."""
    import torch

    if precision == "bfloat16":
        return torch.bfloat16
    if precision == "float16" and not device.startswith("cpu"):
        return torch.float16
    return torch.float32


def build_registry(
    *,
    device: str,
    precision: str,
    weights: Mapping[str, Path],
    plugins: Sequence[Path],
    num_workers: int,
    compile: bool = False,
) -> EncoderRegistry:
    """A registry with the built-ins and every plugin file registered (`compile`: torch.compile built-ins).

    Raises:
        ConfigError: `--weights` for an unknown name, or a plugin that fails to import / register.
    """
    from .slide_registry import is_slide_encoder

    unknown = sorted(k for k in weights if k.lower() not in _builtin_specs() and not is_slide_encoder(k))
    if unknown:
        raise ConfigError(f"--weights given for unknown encoder(s): {', '.join(unknown)}")
    registry = EncoderRegistry(device=device, precision=precision, weights=weights, num_workers=num_workers,
                               compile=compile)
    if plugins:
        import torch

        from ...plugins import load_plugin

        torch_device, dtype = torch.device(device), plugin_dtype(device, precision)
        for path in plugins:
            load_plugin(Path(path), registry=registry, device=torch_device, dtype=dtype, num_workers=num_workers)
    return registry


def describe_encoders(weights: Mapping[str, Path] = {}) -> list[dict[str, Any]]:  # noqa: B006 - read-only default
    """One row per built-in: name, dim, input size, tier/extra, licence, gated, weights source, present locally."""
    from .loading import find_local_weights

    lowered = {k.lower(): Path(v) for k, v in weights.items()}
    rows = []
    for name in available_encoders():
        spec = get_spec(name)
        found = find_local_weights(spec, lowered.get(name))
        rows.append(
            {
                "name": name, "dim": spec.dim, "input_size": spec.input_size, "tier": spec.tier,
                "extra": spec.extra, "licence": spec.licence, "gated": spec.gated, "family": spec.family,
                "weights_source": _source_text(spec), "weights_present": spec.weights.kind == "none" or found is not None,
                "weights_path": str(found) if found else None, "notes": spec.notes,
            }
        )  # fmt: skip
    return rows


def _source_text(spec: EncoderSpec) -> str:
    source = spec.weights
    if source.kind == "hf":
        return f"hf:{source.repo_id}/{source.filename}"
    if source.kind == "torchvision":
        return f"torchvision:{source.filename}"
    return "local file" if source.kind == "local" else "none"
