"""Shared fixtures: the real slides in ../shared/slides (skipped when absent) and an offline environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED_SLIDES = Path(os.environ.get("ATLASPATCH_TEST_SLIDES", ROOT.parent / "shared" / "slides"))


def real_slide(relative: str) -> Path:
    """Path of a real slide under ../shared/slides, skipping the test when it is absent."""
    path = SHARED_SLIDES / relative
    if not path.exists():
        pytest.skip(f"real slide {relative} not available")
    return path


@pytest.fixture
def anyio_backend() -> str:
    """Async tests run on asyncio (what services and uvicorn use)."""
    return "asyncio"


@pytest.fixture
def slides_dir() -> Path:
    """The folder of real slides (skips when absent)."""
    if not SHARED_SLIDES.is_dir():
        pytest.skip("../shared/slides not available")
    return SHARED_SLIDES


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never touch the user's model caches: HF and torch caches point at an empty temporary folder."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(cache / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache / "hf" / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(cache / "torch"))
