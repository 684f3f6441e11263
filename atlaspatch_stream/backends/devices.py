"""Device strings -> torch devices, with upstream's fallback for a plain "cuda" on a machine without one."""

from __future__ import annotations

import logging

import torch

from ..errors import ConfigError

log = logging.getLogger("atlaspatch_stream")


def resolve_device(device: str, purpose: str) -> torch.device:
    """A torch device for `device`; plain "cuda" without CUDA falls back to CPU with a warning (as upstream).

    Args:
        device: "cpu", "cuda", "cuda:N" (or any torch device string).
        purpose: what the device is for, named in the warning ("segmentation", "encoders").

    Raises:
        ConfigError: an explicit "cuda:N" without CUDA (or beyond the visible GPUs), or an unknown device string.
    """
    try:
        wanted = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"unknown device {device!r}: {exc}") from exc
    if wanted.type != "cuda":
        return wanted
    if not torch.cuda.is_available():
        if wanted.index is None:
            log.warning("CUDA requested for %s but not available; using CPU", purpose)
            return torch.device("cpu")
        raise ConfigError(f"device {device!r} requested but CUDA is not available")
    if wanted.index is not None and wanted.index >= torch.cuda.device_count():
        raise ConfigError(
            f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) visible"
        )
    return wanted
