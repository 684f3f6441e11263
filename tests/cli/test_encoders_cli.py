"""`atlaspatch encoders`: the listing and `--check` over every name, as a user runs them."""

from __future__ import annotations

from pathlib import Path

import torch
from click.testing import CliRunner

from atlaspatch_stream.cli import cli

UPSTREAM_NAMES = 66


def test_listing_has_every_upstream_name_and_color_stats(tmp_path: Path) -> None:
    """The listing shows all 66 upstream names plus color_stats, with dims; local weights show as present."""
    import torchvision

    weights = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    result = CliRunner().invoke(cli, ["encoders", "--weights", f"resnet18={weights}"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split() for line in result.output.splitlines()[1:]}
    assert len(rows) == UPSTREAM_NAMES + 1
    assert rows["musk"][1] == "2048" and rows["virchow_v2"][1] == "2560" and rows["color_stats"][2] == "0"
    assert "present" in rows["resnet18"] and "missing" in rows["resnet50"]


def test_check_every_name_on_the_meta_device() -> None:
    """`encoders --check` builds all 67 architectures on the meta device and every pooled width matches."""
    result = CliRunner().invoke(cli, ["encoders", "--check"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith(("ok", "FAIL"))]
    assert len(lines) == UPSTREAM_NAMES + 1
    assert all(line.startswith("ok") for line in lines)
    assert "all encoders ok" in result.output
