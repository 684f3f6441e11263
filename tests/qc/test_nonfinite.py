"""The NaN guard: an encoder that overflows float16 fails its slide by default, or is kept and counted on request."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import orjson
import pytest
from click.testing import CliRunner

from atlaspatch_stream.backends.encoders.group import CudaEncoderGroup, EncoderGroup
from atlaspatch_stream.cli import cli
from atlaspatch_stream.testing.fakes import FakeEncoder
from atlaspatch_stream.testing.synthetic import write_synthetic_slide

# An upstream-style plugin whose activations overflow float16 (largest finite value 65504), as a large-activation
# layer does under fp16 autocast on CUDA. On a CPU our `float16` runs bf16 or fp32, where nothing overflows, so the
# plugin casts to float16 itself: that cast is the stand-in for the GPU's fp16 arithmetic. A patch whose mean
# brightness is above 0.5 overflows to Inf; the second feature (Inf - Inf) is then NaN. Deterministic: same pixels,
# same rows.
OVERFLOW_PLUGIN = """
import torch
import torchvision.transforms as T
from atlaspatch_stream.plugins import CustomEncoderComponents, register_custom_encoder


def _loader(device, dtype):
    def forward(x):
        act = x.mean(dim=(1, 2, 3)).to(torch.float16) * 131072.0  # > 65504 once the mean passes 0.5: Inf
        return torch.stack([act, act - act, x.mean(dim=(1, 2, 3)).to(act.dtype)], dim=1).float()

    return CustomEncoderComponents(model=torch.nn.Identity(), preprocess=T.Compose([T.Resize(8), T.ToTensor()]),
                                   forward_fn=forward)


def register_feature_extractors(registry, device, dtype, num_workers):
    register_custom_encoder(registry=registry, name="fp16_overflow", embedding_dim=3, loader=_loader,
                            device=device, dtype=dtype, num_workers=num_workers)
"""


@pytest.fixture
def overflow_run(tmp_path: Path) -> list[str]:
    """A synthetic slide and the `process` arguments that encode it with the overflowing plugin."""
    folder = tmp_path / "in"
    write_synthetic_slide(folder / "bright.svs", width=2048, height=1536, seed=3)
    plugin = tmp_path / "overflow_plugin.py"
    plugin.write_text(OVERFLOW_PLUGIN)
    return ["process", str(folder), "--patch-size", "256", "--target-mag", "20", "--segmenter", "otsu",
            "--device", "cpu", "--feature-extractors", "fp16_overflow", "--feature-plugin", str(plugin)]


def _events(out: Path) -> list[dict]:
    return [orjson.loads(line) for line in (out / "atlaspatch-report.jsonl").read_bytes().splitlines()]


def test_overflowing_encoder_fails_the_slide_then_allow_nonfinite_keeps_and_counts(overflow_run: list[str],
                                                                                   tmp_path: Path) -> None:
    """Run 1 (default): exit 1, one [FAIL] line naming the encoder, the bad row count and both fixes, and no H5.
    Run 2 (--allow-nonfinite, other output): exit 0; the H5's non-finite rows are exactly the count in the feature
    set's `nonfinite_rows` attribute, in the run report, and in run 1's line."""
    strict, kept = tmp_path / "strict", tmp_path / "kept"
    first = CliRunner().invoke(cli, [*overflow_run, "-o", str(strict)], catch_exceptions=False)
    assert first.exit_code == 1, first.output
    [line] = [x for x in first.stderr.splitlines() if x.startswith("[FAIL]")]
    assert "bright" in line and "encoder fp16_overflow wrote" in line
    assert "--feature-precision bfloat16 or float32" in line and "--allow-nonfinite" in line
    assert not list((strict / "patches").glob("*.h5"))
    second = CliRunner().invoke(cli, [*overflow_run, "-o", str(kept), "--allow-nonfinite"], catch_exceptions=False)
    assert second.exit_code == 0, second.output
    with h5py.File(kept / "patches" / "bright.h5") as f:
        features = f["features/fp16_overflow"][...]
        recorded = int(f["features/fp16_overflow"].attrs["nonfinite_rows"])
    bad = int((~np.isfinite(features).all(axis=1)).sum())
    assert 0 < bad == recorded
    assert f"wrote {bad} of {len(features)} feature rows" in line
    [slide] = [e for e in _events(kept) if e["event"] == "slide"]
    assert slide["nonfinite_rows"] == {"fp16_overflow": bad}


class _Overflows(FakeEncoder):
    """Rows whose first pixel is bright come out as Inf (a float16 overflow stand-in), on the host or, through
    `encode_device`, as a torch tensor on its device (the ring's path)."""

    device = "cpu"
    fixed_batch = False

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        out = super().encode(np.asarray(pixels))
        out[np.asarray(pixels)[:, 0, 0, 0] > 127, 0] = np.inf
        return out

    def encode_device(self, pixels: object) -> object:
        import torch

        return torch.from_numpy(self.encode(pixels.numpy()))  # type: ignore[attr-defined]


def test_cpu_and_ring_paths_report_the_same_nonfinite_rows() -> None:
    """One batch through the CPU group, and through the device ring (CPU ops), where the mask is computed by torch
    on the features' device: the same bool mask of Inf rows; an all-finite encoder is absent from it."""
    pixels = np.zeros((6, 4, 4, 3), dtype=np.uint8)
    pixels[[1, 4], 0, 0, 0] = 200
    cpu = EncoderGroup([_Overflows(name="x"), FakeEncoder(name="ok")])
    ring = CudaEncoderGroup([_Overflows(name="x"), FakeEncoder(name="ok")], "cpu", batch_size=8, patch_size=4,
                            memory_budget=0.5)
    for group in (cpu, ring):
        group.warm_up()
        got = group.collect(group.submit(pixels, None))
        assert set(got.nonfinite) == {"x"} and set(got.features) == {"x", "ok"}
        assert got.nonfinite["x"].tolist() == [False, True, False, False, True, False]
        group.close()
    assert ring._on_device and ring._on_device[0].name == "x"  # the ring really ran it
