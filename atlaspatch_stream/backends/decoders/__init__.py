"""Tile decoders behind one protocol (`TileDecoder`): `cpu` (the reference), `dali`, `nvimgcodec`; `auto` picks.

`make_decoder` is called once per run, before any slide: an explicit backend whose library is missing raises
`MissingExtraError` naming the extra there. The reader asks the decoder, per level, whether it decodes that level
exactly (`unsupported`); what it cannot (deflate/LZW tiles, a colour family its start-up probe got wrong) goes to
`cpu`, and the reason is kept on the reader for the run report. NDPI never reaches a decoder: its restart-marker
stripes are not tiles, and such slides are read with `read_region`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import get_args

from ...config import DecoderName
from ...errors import ConfigError
from ...protocols import TileDecoder


@dataclass(frozen=True)
class DecoderSettings:
    """How to build a decoder backend (from `ReadConfig`).

    Attributes:
        name: "auto", "cpu", "dali" or "nvimgcodec".
        device: Where decoded pixels should live ("cpu", "cuda:N"): the encoders' device.
        batch_size: Tiles per GPU decode call.
        engines: Pipelines/decoders in the backend's pool (concurrent batch calls).
        threads: DALI CPU threads per pipeline.
        hw_decoder_load: Share of each batch for the hardware JPEG engine (CUDA only).
    """

    name: str = "auto"
    device: str = "cpu"
    batch_size: int = 256
    engines: int = 2
    threads: int = 2
    hw_decoder_load: float = 0.65


def _installed(module: str) -> bool:
    """Whether `module` can be imported, without importing it (DALI takes seconds to import)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _cuda(device: str) -> bool:
    if not device.startswith("cuda"):
        return False
    import torch

    return bool(torch.cuda.is_available())


def resolve_decoder(name: str, device: str) -> str:
    """The backend `name` stands for on `device`: `auto` is dali with CUDA and DALI, else nvimgcodec with CUDA and
    nvImageCodec, else cpu. Explicit names are returned as they are (validated).

    Raises:
        ConfigError: an unknown name.
    """
    if name not in get_args(DecoderName):
        raise ConfigError(f"unknown decoder {name!r} (one of {', '.join(get_args(DecoderName))})")
    if name != "auto":
        return name
    if _cuda(device) and _installed("nvidia.dali"):
        return "dali"
    if _cuda(device) and _installed("nvidia.nvimgcodec"):
        return "nvimgcodec"
    return "cpu"


def make_decoder(settings: DecoderSettings) -> TileDecoder:
    """Build (not yet warm) the decoder backend `settings` ask for.

    A GPU backend asked for on a machine without CUDA runs on its CPU backend (as in CI); `auto` never picks one
    there.

    Raises:
        ConfigError: an unknown decoder name.
        MissingExtraError: `dali` without DALI installed (names `[dali]`), `nvimgcodec` without nvImageCodec
            (names `[gpu]`).
    """
    name = resolve_decoder(settings.name, settings.device)
    device = settings.device if _cuda(settings.device) else "cpu"
    if name == "dali":
        from .dali import DaliDecoder

        return DaliDecoder(device, batch_size=settings.batch_size, engines=settings.engines,
                           threads=settings.threads, hw_decoder_load=settings.hw_decoder_load)
    if name == "nvimgcodec":
        from .nvimgcodec import NvImageCodecDecoder

        return NvImageCodecDecoder(device, batch_size=settings.batch_size, engines=settings.engines,
                                   hw_decoder_load=settings.hw_decoder_load)
    from .cpu import CpuDecoder

    return CpuDecoder()
