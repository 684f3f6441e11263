"""The scaling tests share one folder of 8 small synthetic slides and one single-process run over them."""

from __future__ import annotations

from pathlib import Path

import pytest

from atlaspatch_stream import sync
from tests.distributed.common import COUNT, config, write_slides


@pytest.fixture(scope="session")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 slides `he00.svs`..`he07.svs` (their names split 4/4 over 2 shards and 4/2/2 over 3)."""
    return write_slides(tmp_path_factory.mktemp("scale_slides"), COUNT)


@pytest.fixture(scope="session")
def reference(slides: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One local process over every slide: the outputs every sharded, staged or Ray run must reproduce."""
    out = tmp_path_factory.mktemp("single")
    assert sync.process_slides([slides], config(out)).count("done") == COUNT
    return out
