"""Upstream-compatible encoder plugins: `--feature-plugin file.py`.

A plugin file written for upstream AtlasPatch works after changing its import line to::

    from atlaspatch_stream.plugins import CustomEncoderComponents, register_custom_encoder

The file must define `register_feature_extractors(registry, device, dtype, num_workers)`; it is called with keyword
arguments after the built-ins are registered. Inside it, either call `register_custom_encoder(...)` or, lower level,
`registry.register(name, builder)` where `builder()` returns an object with `name`, `embedding_dim`,
`extract_batch(list_of_HWC_uint8_RGB, *, batch_size) -> ndarray (n, D)` and `cleanup()`. A file may define
`register_slide_encoders(registry, device)` instead or as well (slide encoders: `load_slide_plugin`).

This module imports no torch; the adapters that run plugin models live in `backends.encoders.runtime`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Protocol

from .backends.encoders.spec import CustomEncoderComponents
from .errors import ConfigError

__all__ = [
    "CustomEncoderComponents",
    "CustomEncoderLoader",
    "CustomRegistryHook",
    "register_custom_encoder",
    "load_plugin",
    "load_slide_plugin",
]


class CustomEncoderLoader(Protocol):
    """`loader(device, dtype) -> CustomEncoderComponents`, called positionally when the encoder is first created."""

    def __call__(self, device: Any, dtype: Any) -> CustomEncoderComponents: ...


class CustomRegistryHook(Protocol):
    """The `register_feature_extractors` function a plugin file defines."""

    def __call__(self, registry: Any, device: Any, dtype: Any, num_workers: int) -> None: ...


def register_custom_encoder(*, registry: Any, name: str, embedding_dim: int, loader: CustomEncoderLoader, device: Any,
                            dtype: Any, num_workers: int = 0, non_blocking: bool = False) -> None:
    """Register a lazily built encoder made of a model, a PIL preprocess and an optional forward function.

    Args:
        registry: the registry handed to the plugin hook.
        name: the encoder name (the H5 dataset name); lowercased; must not clash with any other name.
        embedding_dim: the feature width (used for zero-patch slides).
        loader: `loader(device, dtype) -> CustomEncoderComponents`.
        device: the torch device the hook received.
        dtype: the torch dtype the hook received; the whole model and the inputs are cast to it.
        num_workers: accepted for compatibility (preprocessing runs in our reader threads).
        non_blocking: copy batches to the device asynchronously.
    """
    del num_workers  # upstream forks DataLoader workers per batch; our pipeline already overlaps preprocessing

    def build() -> Any:
        from .backends.encoders.runtime import CustomTorchEncoder

        return CustomTorchEncoder(name, int(embedding_dim), loader, device, dtype, non_blocking)

    registry.register(name, build)


def load_plugin(path: Path, *, registry: Any, device: Any, dtype: Any, num_workers: int) -> None:
    """Import a plugin file and call its `register_feature_extractors` hook with keyword arguments.

    Raises:
        ConfigError: the file is missing, fails to import, or defines no hook.
    """
    module = _import_file(Path(path))
    hook = getattr(module, "register_feature_extractors", None)
    if not callable(hook):
        if callable(getattr(module, "register_slide_encoders", None)):
            return  # a file of slide encoders only (`load_slide_plugin`)
        raise ConfigError(f"feature plugin {path} defines no register_feature_extractors(registry, device, dtype, "
                          "num_workers)")
    hook(registry=registry, device=device, dtype=dtype, num_workers=num_workers)


def _import_file(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(f"feature plugin {path} does not exist")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"feature plugin {path} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise ConfigError(f"feature plugin {path} failed to import: {type(exc).__name__}: {exc}") from exc
    return module


def load_slide_plugin(path: Path, *, registry: Any, device: str) -> None:
    """Call a plugin file's optional `register_slide_encoders(registry, device)` hook with keyword arguments.

    Inside it, `registry.register(name, patch_encoder=..., dim=..., builder=..., patch_size=None, target_mag=None,
    patient=False)`, where `builder()` returns a `protocols.SlideEncoder`. A file without the hook adds nothing.

    Raises:
        ConfigError: the file is missing or fails to import.
    """
    hook = getattr(_import_file(Path(path)), "register_slide_encoders", None)
    if callable(hook):
        hook(registry=registry, device=device)
