"""Helpers shared by the test tiers: a small fake-friendly configuration and checks on what a run leaves behind."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import pytest

from atlaspatch_stream.backends.encoders.group import EncoderGroup
from atlaspatch_stream.backends.tiles import TilePageMeta, describe_levels, read_raw
from atlaspatch_stream.config import (
    EncodeConfig,
    OpenConfig,
    PipelineConfig,
    PlanConfig,
    QueueConfig,
    ReadConfig,
    SegmentConfig,
    WriteConfig,
)
from atlaspatch_stream.testing.fakes import FakeBackends, FakeEncoder


def fake_config(out: Path, extractors: tuple[str, ...] = ("a",), *, patch_size: int = 16, max_open: int = 200,
                queues: QueueConfig | None = None, skip_existing: bool = True, chunk: int = 4, batch: int = 8,
                seg_batch: int = 1) -> PipelineConfig:
    """Tiny patches, small chunks and batches, fake-friendly segmenter settings."""
    return PipelineConfig(
        open=OpenConfig(max_open_slides=max_open),
        segment=SegmentConfig(segmenter="otsu", device="cpu", seg_batch_size=seg_batch),
        plan=PlanConfig(patch_size=patch_size),
        read=ReadConfig(reader_threads=1, chunk_patches=chunk),
        encode=EncodeConfig(extractors=extractors, device="cpu", batch_size=batch),
        write=WriteConfig(output=out, write_batch=8, skip_existing=skip_existing),
        queues=queues or QueueConfig(),
    )


def level_meta(path: Path, level: int = 0) -> TilePageMeta:
    """The tile page of `path`'s pyramid level `level` (the slide must be tile-once readable)."""
    found = describe_levels(path)
    assert found is not None and found[1][level] is not None
    return found[1][level]


def all_raws(meta: TilePageMeta) -> list[bytes]:
    """The raw (still compressed) bytes of every tile of the page, in tile order."""
    fd = os.open(meta.path, os.O_RDONLY)
    try:
        raws = [read_raw(fd, meta, t) for t in range(meta.grid.count)]
    finally:
        os.close(fd)
    assert all(r is not None for r in raws)
    return raws  # type: ignore[return-value]


def leftovers(out: Path) -> list[str]:
    """Temporary files and lock files under the output folder (there should be none once a run is over)."""
    patches = out / "patches"
    if not patches.exists():
        return []
    return sorted(p.name for p in patches.iterdir() if ".tmp." in p.name or p.suffix == ".lock")


def h5_features(path: Path) -> dict[str, np.ndarray]:
    """Every feature set of an output file."""
    with h5py.File(path, "r") as f:
        return {name: f["features"][name][...] for name in f.get("features", {})}


@contextmanager
def mounted_tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (e.g. "4m") mounted at `where` for the block (root only; the test is skipped elsewhere)."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


# The body of an upstream-style encoder plugin file: imports and a loader of a tiny seeded CNN (32 dims).
PLUGIN_LOADER = """
import torch
import torchvision.transforms as T
from atlaspatch_stream.plugins import CustomEncoderComponents, register_custom_encoder


def _loader(device, dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.AdaptiveAvgPool2d(2))
    preprocess = T.Compose([T.Resize(32), T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])
    return CustomEncoderComponents(model=model, preprocess=preprocess, forward_fn=None)
"""

# An upstream-style encoder plugin file: that CNN registered as `tiny_conv`.
TINY_PLUGIN = PLUGIN_LOADER + """

def register_feature_extractors(registry, device, dtype, num_workers):
    register_custom_encoder(registry=registry, name="tiny_conv", embedding_dim=32, loader=_loader,
                            device=device, dtype=dtype, num_workers=num_workers)
"""


class BrokenEncoder(FakeEncoder):
    """A device failure: every call raises (a broken run, not a per-slide problem)."""

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        raise RuntimeError("CUDA error: device lost")


class BrokenDeviceBackends(FakeBackends):
    """Fake backends whose one encoder (`a`) fails on every batch."""

    def make_encoders(self) -> EncoderGroup:
        return EncoderGroup([BrokenEncoder(name="a")])
