"""What a slide encoder is (`SlideEncoderSpec`) and where it is built (`BuildContext`): shared by the registry and the
encoder families, so neither imports the other."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...protocols import SlideEncoder

# `h5_call(fn, *args)` -> fn(*args), run where the process's H5 reads must run (the output's one H5 thread).
H5Call = Callable[..., Any]


def call_here(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` in the calling thread (tests, and encoders that read no H5 themselves)."""
    return fn(*args)


@dataclass(frozen=True)
class BuildContext:
    """Where a slide encoder runs and which local weights the user named for it."""

    device: str
    precision: str
    weights: Path | None
    h5_call: H5Call = call_here


@dataclass(frozen=True)
class SlideEncoderSpec:
    """One slide encoder: what it reads, what it needs, how it is checked and built.

    Attributes:
        name: The name of `slide_features/<name>` and `patient_features/<name>/`.
        patch_encoder: The patch encoder whose features it reads.
        dim: The embedding width (0: the patch encoder's width, for mean pooling).
        patch_size: The `--patch-size` it needs (None: any).
        target_mag: The magnification it was trained at (None: any).
        patient: Whether it also embeds cases (`encode-patient`).
        extra: The pip extra that installs its code (None: core).
        weights: Where its weights come from, in words (README, `info`).
        build: `build(spec, context)` -> a `SlideEncoder`, not yet warmed up.
        prepare: `prepare(spec, context)` checks extras and finds weights; raises before any slide.
    """

    name: str
    patch_encoder: str
    dim: int
    patch_size: int | None
    target_mag: int | None
    patient: bool
    extra: str | None
    weights: str
    build: Callable[[SlideEncoderSpec, BuildContext], SlideEncoder]
    prepare: Callable[[SlideEncoderSpec, BuildContext], None] | None = None
