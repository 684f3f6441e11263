"""Where each backend puts its tensors: SAM2 on the segmentation device; decoding, cutting and the encoders on the
feature device (so decoded pixels never cross devices). CPU here; tests/gpu repeats it with CUDA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from atlaspatch_stream.assembly import RealBackends
from atlaspatch_stream.backends.cuda_streams import EncoderCudaStreams, device_ops
from atlaspatch_stream.backends.readers import TileOnceReader
from atlaspatch_stream.config import load_config
from atlaspatch_stream.errors import ConfigError
from tests.conftest import real_slide
from tests.unit.test_readers import LibHandle, random_coords


def _config(tmp_path: Path, device: str, feature_device: str, **segment: object):
    return load_config({
        "segment": {"device": device, **segment},
        "encode": {"extractors": ("resnet18", "color_stats"), "device": feature_device, "precision": "float32",
                   "weights": (("resnet18", _resnet18(tmp_path)),)},
        "read": {"decoder": "dali"},
        "write": {"output": tmp_path / "out"},
    }, environ={})


def _resnet18(folder: Path) -> Path:
    import torchvision

    path = folder / "resnet18.pth"
    if not path.exists():
        torch.manual_seed(0)
        torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


def test_every_backend_puts_tensors_on_its_configured_device(tmp_path: Path) -> None:
    """SAM2's weights sit on the segmentation device; the decoder declares the feature device and the reader's
    device batches are there; each encoder's parameters and device outputs are there; the stream ring's slots too."""
    pytest.importorskip("nvidia.dali")
    from atlaspatch_stream.testing.sam2_weights import write_random_sam2_checkpoint

    ckpt = write_random_sam2_checkpoint(tmp_path / "sam2.pth")
    backends = RealBackends(_config(tmp_path, "cpu", "cpu", seg_weights=ckpt))
    segmenter = backends.make_segmenter()
    segmenter.warm_up()
    assert {p.device for p in segmenter.model.parameters()} == {torch.device("cpu")}
    encoders = backends.make_encoders().encoders
    decoder = backends.pixels.decoder()
    assert decoder.name == "dali" and decoder.device == "cpu"
    handle = LibHandle(real_slide("aperio/CMU-1-Small-Region.svs"), "tiffslide")
    reader = TileOnceReader(threads=2, decoder=decoder, device_output=True)
    coords = random_coords(handle.info, 8, seed=1, sizes=(224,))
    _, pixels = next(iter(reader.iter_patches(handle, coords, 224, 8)))
    assert isinstance(pixels, torch.Tensor) and str(pixels.device) == decoder.device
    for enc in encoders:
        params = {p.device for p in enc._model.parameters()} or {torch.device(enc.device)}
        assert params == {torch.device(enc.device)}
        assert str(enc.encode_device(pixels).device) == enc.device
    runner = EncoderCudaStreams(encoders, device_ops(decoder.device), batch_size=8, slots=2)
    feats = runner.collect(runner.submit(pixels)).features
    assert set(feats) == {"resnet18", "color_stats"} and all(np.isfinite(f).all() for f in feats.values())
    assert all(str(t.device) == decoder.device for t in runner._inputs)
    for enc in encoders:
        enc.close()


def test_a_named_feature_gpu_that_is_absent_stops_before_any_slide(tmp_path: Path) -> None:
    """`--device cpu --feature-device cuda:1` without that GPU: building the decoder (with the encoders, before any
    slide) fails with a ConfigError naming the device."""
    if torch.cuda.device_count() > 1:
        pytest.skip("cuda:1 exists here")
    backends = RealBackends(_config(tmp_path, "cpu", "cuda:1"))
    with pytest.raises(ConfigError, match="cuda:1"):
        backends.make_encoders()
