"""Helpers shared by the test tiers: a small fake-friendly configuration and checks on what a run leaves behind."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

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
