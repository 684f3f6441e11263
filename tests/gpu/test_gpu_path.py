"""The GPU path on CUDA (opt-in: skipped without CUDA; perf/gpu_check.py runs the same checks with numbers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import real_slide
from tests.helpers import all_raws, level_meta

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _cmu_level() -> tuple[object, list[bytes]]:
    meta = level_meta(real_slide("aperio/CMU-1-Small-Region.svs"))
    return meta, all_raws(meta)


@pytest.mark.parametrize("backend", ["nvimgcodec", "dali"])
def test_gpu_backend_decodes_aperio_tiles_close_to_cpu(backend: str) -> None:
    """CMU-1's RGB-photometric tiles on the GPU: tensors on cuda, colours right (mean |diff| < 0.5, max <= 8), or
    the backend's probe routes the family to cpu (then `unsupported` says why)."""
    pytest.importorskip("nvidia.dali" if backend == "dali" else "nvidia.nvimgcodec")
    from atlaspatch_stream.backends.decoders import DecoderSettings, make_decoder
    from atlaspatch_stream.backends.decoders.cpu import CpuDecoder

    meta, raws = _cmu_level()
    dec = make_decoder(DecoderSettings(backend, "cuda:0"))
    if dec.unsupported(meta):  # type: ignore[arg-type]
        pytest.skip(f"routed to cpu: {dec.unsupported(meta)}")  # type: ignore[arg-type]
    out = dec.decode_batch(raws, meta)  # type: ignore[arg-type]
    out.ready.synchronize()
    want = CpuDecoder().decode_batch(raws, meta).pixels  # type: ignore[arg-type]
    diff = np.stack([np.abs(g.cpu().numpy().astype(int) - w) for g, w in zip(out.pixels, want, strict=True)])
    assert out.pixels[0].device.type == "cuda" and diff.mean() < 0.5 and diff.max() <= 8


def test_cutter_on_cuda_equals_cutter_on_cpu() -> None:
    """The torch cutter/resizer gives the same bytes on CUDA as on the CPU (integer arithmetic throughout)."""
    from atlaspatch_stream.backends.patches import cut_patches

    rng = np.random.default_rng(0)
    tiles = {t: rng.integers(0, 256, (240, 240, 3), dtype=np.uint8) for t in range(12)}
    from atlaspatch_stream.tileplan import TileGrid

    grid = TileGrid(900, 700, 240, 240)
    for read in (512, 300, 256):
        rects = np.stack([rng.integers(-100, 900, 20), rng.integers(-100, 700, 20), np.full(20, read),
                          np.full(20, read)], 1)
        cpu = cut_patches(tiles, grid, rects, 256, "cpu")
        gpu = cut_patches(tiles, grid, rects, 256, "cuda:0")
        assert torch.equal(cpu, gpu.cpu())


def test_encoder_streams_on_cuda_equal_direct_encoding() -> None:
    """Batches through the CUDA ring (own streams, events, pinned features) give the features of a direct encode."""
    from atlaspatch_stream.backends.cuda_streams import CudaOps, EncoderCudaStreams
    from atlaspatch_stream.backends.encoders.registry import get_spec
    from atlaspatch_stream.backends.encoders.runtime import TorchEncoder

    torch.manual_seed(0)
    enc = TorchEncoder(get_spec("resnet18"), device="cuda:0", precision="float32", model=get_spec("resnet18").build())
    runner = EncoderCudaStreams([enc], CudaOps("cuda:0"), batch_size=16, slots=3)
    rng = np.random.default_rng(1)
    inputs = [rng.integers(0, 256, (16, 224, 224, 3), dtype=np.uint8) for _ in range(5)]
    tickets = [runner.submit(torch.from_numpy(p).cuda() if i % 2 else p) for i, p in enumerate(inputs[:3])]
    got = [runner.collect(t).features["resnet18"] for t in tickets]
    for feats, pixels in zip(got, inputs, strict=False):
        np.testing.assert_allclose(feats, enc.encode(pixels), rtol=1e-4, atol=1e-4)


def test_nonfinite_rows_are_counted_on_the_device() -> None:
    """A device encoder whose fp16 activations overflow for bright patches, through the CUDA ring: the rows with
    Inf come back as the bool mask computed on the device (untested until a GPU is lent: skipped without CUDA)."""
    from atlaspatch_stream.backends.cuda_streams import EncoderCudaStreams, device_ops

    class Overflows:
        name, dim, device, fixed_batch = "fp16", 2, "cuda:0", False

        def warm_up(self) -> None:
            """Nothing to load."""

        def encode_device(self, pixels: torch.Tensor) -> torch.Tensor:
            act = pixels[:, 0, 0, 0].half() * 1024.0  # > 65504 once the pixel passes 64: Inf in float16
            return torch.stack([act, act], dim=1).float()

    pixels = torch.zeros((6, 4, 4, 3), dtype=torch.uint8, device="cuda:0")
    pixels[[1, 4], 0, 0, 0] = 200
    ring = EncoderCudaStreams([Overflows()], device_ops("cuda:0"), batch_size=8, slots=2)
    got = ring.collect(ring.submit(pixels))
    assert got.nonfinite["fp16"].tolist() == [False, True, False, False, True, False]
