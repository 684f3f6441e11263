"""`atlaspatch encoders --check`: every architecture built on the meta device, pooled, its width checked.

Nothing is allocated and no weights are read, so this runs in seconds for all names on any machine and proves that
the embedded architecture recipes and poolings produce the declared feature width.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ...errors import AtlasPatchError, MissingExtraError
from .registry import available_encoders, check_extra, get_spec
from .spec import EncoderSpec

_RAW_EDGE = 224  # input edge for encoders that take raw patches (no preprocessing)


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one encoder's meta check.

    Attributes:
        name: the encoder.
        expected: the declared dim.
        got: the width of the pooled meta output (None when the build or forward failed).
        ok: got == expected.
        seconds: build + forward time.
        error: a one-line reason when not ok.
        missing_extra: the pip extra whose packages are not installed (the encoder was not built).
    """

    name: str
    expected: int
    got: int | None
    ok: bool
    seconds: float
    error: str | None = None
    missing_extra: str | None = None


def meta_output_dim(spec: EncoderSpec, batch: int = 2, model: Any = None) -> int:
    """Build `spec` on the meta device (or take `model`, built there), run its pooling on a meta batch.

    Returns:
        The feature width.
    """
    import torch

    edge = spec.input_size or _RAW_EDGE
    with torch.device("meta"):
        model = (model if model is not None else spec.build()).eval()
        x = torch.empty(batch, 3, edge, edge)
        with torch.inference_mode():
            out = spec.forward(model, x) if spec.forward is not None else model(x)
    if out.shape[0] != batch:
        raise ValueError(f"batch dimension {out.shape[0]} != {batch}")
    return int(out.flatten(1).shape[1])


def check_one(name: str) -> CheckResult:
    """Meta-check one encoder; failures become a result with `ok=False` and the reason."""
    spec = get_spec(name)
    start = time.perf_counter()
    try:
        check_extra(spec)
    except MissingExtraError as exc:
        return CheckResult(name, spec.dim, None, False, time.perf_counter() - start, str(exc),
                           missing_extra=exc.extra or "?")
    try:
        got = meta_output_dim(spec)
    except (AtlasPatchError, RuntimeError, ValueError, TypeError, ImportError, NotImplementedError) as exc:
        text = " ".join(str(exc).split())[:300]
        return CheckResult(
            name, spec.dim, None, False, time.perf_counter() - start, f"{type(exc).__name__}: {text}"
        )
    ok = got == spec.dim
    error = None if ok else f"output width {got} != declared {spec.dim}"
    return CheckResult(name, spec.dim, got, ok, time.perf_counter() - start, error)


def check_encoders(names: Sequence[str] | None = None) -> list[CheckResult]:
    """Meta-check the given encoders (all built-ins by default), in name order when none are given."""
    return [check_one(name) for name in (names if names is not None else available_encoders())]
