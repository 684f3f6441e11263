"""`nvimgcodec`: NVIDIA nvImageCodec directly (the `[gpu]` extra), the decoder DALI itself decodes through.

On CUDA a decoder asks for the hardware JPEG engine first (`hw_decoder_load` of each batch), then the GPU-only
backends (nvJPEG2000), then nvJPEG's CUDA decoder; without CUDA it uses the CPU backend (libjpeg-turbo, OpenJPEG
through OpenCV), which is what CI tests. Aperio RGB tiles are decoded with `ColorSpec.SYCC`: no colour conversion,
the stored components come out as they are (gpu.md §1.8); YCbCr JPEG with fancy upsampling, as libjpeg-turbo does.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...errors import import_extra
from ..tiles import TilePageMeta
from .base import codec_of, full_jpeg
from .batched import BatchedDecoder, Engine, stack_on_device


class NvImageCodecDecoder(BatchedDecoder):
    """Batch tile decoder over nvImageCodec; one `Decoder` per pooled engine (implements `TileDecoder`).

    Args:
        device: "cpu" or "cuda:N".
        batch_size: Most tiles per decode call.
        engines: Decoder objects (concurrent batch calls).
        hw_decoder_load: Share of each batch given to the hardware JPEG engine (CUDA only).
        cpu_threads: Host threads of each decoder (0 = the library's default, the CPU count).
    """

    name = "nvimgcodec"

    def __init__(self, device: str = "cpu", *, batch_size: int = 256, engines: int = 2,
                 hw_decoder_load: float = 0.65, cpu_threads: int = 0) -> None:
        self._nv = import_extra("nvidia.nvimgcodec", "gpu", "--decoder nvimgcodec needs NVIDIA nvImageCodec")
        self.hw_decoder_load = hw_decoder_load
        self.cpu_threads = cpu_threads
        super().__init__(device, batch_size, engines)
        nv = self._nv
        self._params = {
            "sycc": nv.DecodeParams(color_spec=nv.ColorSpec.SYCC, apply_exif_orientation=False),
            "srgb": nv.DecodeParams(color_spec=nv.ColorSpec.SRGB, apply_exif_orientation=False),
        }

    def _build(self, stream: Any) -> Any:
        nv = self._nv
        if self.cuda is None:
            return nv.Decoder(device_id=nv.NVIMGCODEC_DEVICE_CPU_ONLY, max_num_cpu_threads=self.cpu_threads,
                              backends=[nv.Backend(nv.BackendKind.CPU_ONLY)])
        backends = [
            nv.Backend(nv.BackendKind.HW_GPU_ONLY, load_hint=self.hw_decoder_load),
            nv.Backend(nv.BackendKind.GPU_ONLY),
            # nvJPEG's CUDA decoder is registered as hybrid: without it there is no CUDA fallback (nvImageCodec #26).
            nv.Backend(nv.BackendKind.HYBRID_CPU_GPU),
        ]
        return nv.Decoder(device_id=self.cuda, max_num_cpu_threads=self.cpu_threads, backends=backends,
                          options=":fancy_upsampling=1")

    def _prepare(self, raw: bytes, meta: TilePageMeta) -> bytes:
        return full_jpeg(raw, meta) if codec_of(meta).startswith("jpeg_") else raw

    def _run(self, engine: Engine, streams: list[bytes], meta: TilePageMeta) -> list[Any]:
        params = self._params["sycc" if codec_of(meta) == "jpeg_rgb" else "srgb"]
        if engine.stream is None:
            images = engine.handle.decode(streams, params=params)
            return [_host_image(img, i) for i, img in enumerate(images)]
        images = engine.handle.decode(streams, params=params, cuda_stream=engine.stream.cuda_stream)
        return stack_on_device([_device_image(img, i, self.cuda) for i, img in enumerate(images)], engine.stream)


def _failed(index: int) -> ValueError:
    return ValueError(f"nvImageCodec could not decode tile #{index} of the batch")


def _host_image(image: Any, index: int) -> np.ndarray:
    if image is None:
        raise _failed(index)
    return np.asarray(image.cpu())


def _device_image(image: Any, index: int, cuda: int | None) -> Any:
    import torch

    if image is None:
        raise _failed(index)
    return torch.as_tensor(image, device=f"cuda:{cuda}")
