"""GPU checks (opt-in: skipped without CUDA). Run on a GPU machine with `pytest tests/gpu -q` or `perf/gpu_smoke.py`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_sam2_batched_equals_per_image_on_cuda(tmp_path: Path) -> None:
    """Batched SAM2 masks on CUDA equal the same images segmented one at a time (float32)."""
    from atlaspatch_stream.backends.segment_sam2 import Sam2Segmenter
    from atlaspatch_stream.testing.sam2_weights import write_random_sam2_checkpoint
    from atlaspatch_stream.testing.synthetic import draw_tissue

    ckpt = write_random_sam2_checkpoint(tmp_path / "model.pth")
    images = [draw_tissue(640 + 64 * i, 480, seed=i)[0] for i in range(4)]
    seg = Sam2Segmenter("cuda", "float32", ckpt, batch_size=4)
    seg.warm_up()
    batched = seg.segment(images)
    single = [seg.segment([img])[0] for img in images]
    for a, b in zip(batched, single, strict=True):
        np.testing.assert_array_equal(a, b)


def test_encoder_fp16_on_cuda_close_to_fp32(tmp_path: Path) -> None:
    """resnet18 with fp16 autocast on CUDA stays close to float32 (cosine > 0.99)."""
    from atlaspatch_stream.backends.encoders.registry import get_spec
    from atlaspatch_stream.backends.encoders.runtime import TorchEncoder

    spec = get_spec("resnet18")
    torch.manual_seed(0)
    model = spec.build()
    pixels = np.random.default_rng(0).integers(0, 256, (8, 256, 256, 3), dtype=np.uint8)
    ref = TorchEncoder(spec, device="cpu", precision="float32", model=model).encode(pixels)
    fast = TorchEncoder(spec, device="cuda", precision="float16", model=model).encode(pixels)
    cos = (ref * fast).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(fast, axis=1)
    assert cos.min() > 0.99


def test_process_on_cuda(tmp_path: Path) -> None:
    """process with the encoder on CUDA writes complete feature sets."""
    import h5py

    from atlaspatch_stream.config import load_config
    from atlaspatch_stream.sync import process_slides
    from atlaspatch_stream.testing.synthetic import write_synthetic_slide

    slide = write_synthetic_slide(tmp_path / "s.svs", width=2048, height=2048)
    config = load_config({"plan": {"patch_size": 224, "target_mag": 20},
                          "segment": {"segmenter": "otsu", "device": "cuda"},
                          "encode": {"extractors": ("color_stats",), "device": "cuda"},
                          "write": {"output": tmp_path / "out"}}, environ={})
    assert process_slides([slide], config).ok
    with h5py.File(tmp_path / "out" / "patches" / "s.h5") as f:
        assert f["features/color_stats"].shape[0] == f.attrs["num_patches"] > 0
