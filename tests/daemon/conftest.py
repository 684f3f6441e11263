"""Daemon tests run on asyncio under anyio, each under a deadline; default state folders go under the test's tmp."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def local_state_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`$XDG_STATE_HOME` inside the test's tmp folder: a default state folder (and every daemon started as a
    subprocess, which inherits it) never touches the user's home."""
    home = tmp_path / "xdg-state"
    monkeypatch.setenv("XDG_STATE_HOME", str(home))
    return home
