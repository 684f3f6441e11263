"""`dali`: NVIDIA DALI 2.4 (the `[dali]` extra), fed batches of compressed tiles from our reader threads.

Each pooled engine is a pipeline `fn.external_source(name="jpegs") -> fn.decoders.image`, run once per batch with
the batch as a named input (`Pipeline.run(stream, jpegs=[...])`, which DALI allows only with
`prefetch_queue_depth=1`; gpu.md §1.2 way A). Overlap comes from several pipelines in the pool and from DALI's own
threads within a batch. On CUDA the decoder runs on the `mixed` backend (the hardware JPEG engine takes
`hw_decoder_load` of each batch, nvJPEG's CUDA decoder the rest; JPEG 2000 through nvJPEG2000) with fancy upsampling
for libjpeg-turbo parity; without CUDA on DALI's CPU backend (libjpeg-turbo), which is what CI tests.

DALI has no input colour-space option, so Aperio RGB tiles get an APP14 transform=0 segment. That is bit-exact on
the CPU; on the GPU the start-up probe decides (gpu.md §6.1) and routes the family to `cpu` when nvJPEG gets it wrong.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np

from ...errors import import_extra
from ..tiles import TilePageMeta
from .base import codec_of, full_jpeg, with_app14_rgb
from .batched import BatchedDecoder, Engine, stack_on_device


class DaliDecoder(BatchedDecoder):
    """Batch tile decoder over DALI pipelines, one per pooled engine (implements `TileDecoder`).

    Args:
        device: "cpu" (DALI's CPU backend) or "cuda:N" (the mixed backend on that GPU).
        batch_size: The pipelines' batch size (most tiles per run).
        engines: Pipelines in the pool (concurrent batch calls).
        threads: DALI CPU threads per pipeline.
        hw_decoder_load: Share of each batch given to the hardware JPEG engine (CUDA only).
    """

    name = "dali"

    def __init__(self, device: str = "cpu", *, batch_size: int = 256, engines: int = 2, threads: int = 2,
                 hw_decoder_load: float = 0.65) -> None:
        self._dali = import_extra("nvidia.dali", "dali", "--decoder dali needs NVIDIA DALI")
        self.threads = threads
        self.hw_decoder_load = hw_decoder_load
        super().__init__(device, batch_size, engines)

    def _build(self, stream: Any) -> Any:
        fn: Any = importlib.import_module("nvidia.dali.fn")
        types: Any = importlib.import_module("nvidia.dali.types")
        pipeline_def: Any = self._dali.pipeline_def
        mixed = self.cuda is not None
        options: dict[str, Any] = {"output_type": types.RGB}
        if mixed:
            options |= {"hw_decoder_load": self.hw_decoder_load, "jpeg_fancy_upsampling": True,
                        "affine": False}  # affine=True pins threads to cores: wrong on a shared or cgroup-limited box

        @pipeline_def(batch_size=self.batch_size, num_threads=self.threads, device_id=self.cuda,
                      prefetch_queue_depth=1)
        def tiles() -> Any:
            encoded = fn.external_source(name="jpegs", dtype=types.UINT8, ndim=1, no_copy=True)
            return fn.decoders.image(encoded, device="mixed" if mixed else "cpu", **options)

        pipe = tiles()
        pipe.build()
        return pipe

    def _prepare(self, raw: bytes, meta: TilePageMeta) -> bytes:
        codec = codec_of(meta)
        if codec == "jpeg_rgb":
            return with_app14_rgb(full_jpeg(raw, meta))
        return full_jpeg(raw, meta) if codec == "jpeg_ycbcr" else raw

    def _run(self, engine: Engine, streams: list[bytes], meta: TilePageMeta) -> list[Any]:
        # no_copy: DALI reads these arrays in place, so they must live until run() returns (they do: locals).
        arrays = [np.frombuffer(s, np.uint8) for s in streams]
        if engine.stream is None:
            (out,) = engine.handle.run(jpegs=arrays)
            return _host_tiles(out)
        import torch

        (out,) = engine.handle.run(engine.stream, jpegs=arrays)
        return stack_on_device([torch.from_dlpack(out[i]) for i in range(len(out))], engine.stream)


def _host_tiles(out: Any) -> list[np.ndarray]:
    """Per-tile numpy copies of a CPU TensorList (uniform batches copy in one call)."""
    if out.is_dense_tensor():
        return list(out.as_array())
    return [np.array(out[i]) for i in range(len(out))]
