"""Shared by the fake-backend pipeline tests: the anyio backend and a small, fast configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

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


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


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
