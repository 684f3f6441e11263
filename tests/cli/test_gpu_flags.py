"""`--decoder`, `--compile` and the two-device split, from flags to the backends that act on them."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from atlaspatch_stream.assembly import RealBackends
from atlaspatch_stream.cli import cli
from atlaspatch_stream.cli.options import build_config
from atlaspatch_stream.errors import ConfigError


def _params(**extra: object) -> dict[str, object]:
    return {"output": Path("out"), "patch_size": 256, "target_mag": 20, "feature_extractors": "color_stats",
            **extra}


def test_decoder_and_compile_flags_reach_the_config_and_the_registry() -> None:
    """`--decoder nvimgcodec --compile` end up as read.decoder and encode.compile, and the encoder registry built
    from that config compiles built-in encoders; without the flags: auto and no compile."""
    config = build_config(_params(decoder="nvimgcodec", compile_encoders=True, device="cpu"), features=True)
    assert config.read.decoder == "nvimgcodec" and config.encode.compile
    assert RealBackends(config).make_registry().compile
    default = build_config(_params(device="cpu"), features=True)
    assert default.read.decoder == "auto" and not default.encode.compile


def test_unknown_decoder_is_refused() -> None:
    """A decoder name outside the four is a usage error on the command line and a ConfigError in a TOML/env."""
    result = CliRunner().invoke(cli, ["process", ".", "-o", "out", "--patch-size", "256", "--target-mag", "20",
                                      "--feature-extractors", "color_stats", "--decoder", "turbo"])
    assert result.exit_code == 2 and "turbo" in result.output
    from atlaspatch_stream.config import load_config

    with pytest.raises(ConfigError, match="unknown decoder"):
        load_config(environ={"ATLASPATCH_READ__DECODER": "turbo"})


def test_device_split_puts_decoding_with_the_encoders() -> None:
    """`--device cuda:0 --feature-device cuda:1`: segmentation on cuda:0, encoders (and so decoded tiles) on
    cuda:1; without --feature-device both follow --device."""
    split = build_config(_params(device="cuda:0", feature_device="cuda:1"), features=True)
    assert split.segment.device == "cuda:0" and split.feature_device == "cuda:1"
    same = build_config(_params(device="cuda:0"), features=True)
    assert same.feature_device == "cuda:0"
