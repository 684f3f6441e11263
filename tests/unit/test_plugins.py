"""Upstream-style encoder plugins: a user's plugin file, the low-level register() path, and errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from atlaspatch_stream.backends.encoders import registry as reg
from atlaspatch_stream.errors import ConfigError
from tests.helpers import PLUGIN_LOADER

PLUGIN = PLUGIN_LOADER + """

class Means:
    name = "channel_means"
    embedding_dim = 3

    def extract_batch(self, images, *, batch_size):
        return torch.stack([torch.from_numpy(img).float().mean(dim=(0, 1)) for img in images])

    def cleanup(self):
        Means.cleaned = True


def register_feature_extractors(registry, device, dtype, num_workers):
    register_custom_encoder(registry=registry, name="Tiny_Conv", embedding_dim=32, loader=_loader,
                            device=device, dtype=dtype, num_workers=num_workers)
    registry.register("channel_means", lambda: Means())
"""


def _write(tmp_path: Path, text: str, name: str = "my_plugin.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def _registry(*plugins: Path) -> reg.EncoderRegistry:
    return reg.build_registry(device="cpu", precision="float32", weights={}, plugins=plugins, num_workers=2)


def test_upstream_style_plugin_file_registers_and_encodes(tmp_path: Path) -> None:
    """A plugin written as for upstream (only the import line changed) adds two encoders.

    Steps: load the file through build_registry; create both; encode two patches. Invariants: names lowercased,
    the custom encoder equals running its model on the PIL-preprocessed patches, the low-level extractor is adapted.
    """
    registry = _registry(_write(tmp_path, PLUGIN))
    assert {"tiny_conv", "channel_means"} <= set(registry.available())
    pixels = np.random.default_rng(0).integers(0, 256, (2, 48, 48, 3), dtype=np.uint8)

    tiny = registry.create("TINY_CONV")
    out = tiny.encode(pixels)
    assert out.shape == (2, 32) and out.dtype == np.float32 and tiny.dim == 32
    import torchvision.transforms as T
    from PIL import Image

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.AdaptiveAvgPool2d(2)).eval()
    tf = T.Compose([T.Resize(32), T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])
    with torch.no_grad():
        expected = model(torch.stack([tf(Image.fromarray(p)) for p in pixels])).flatten(1).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)

    means = registry.create("channel_means")
    np.testing.assert_allclose(means.encode(pixels), pixels.reshape(2, -1, 3).mean(1), rtol=1e-5)
    means.close()
    assert type(means._extractor).cleaned is True  # cleanup() reached the plugin object


def test_the_encoder_group_says_what_each_plugin_ran_in(tmp_path: Path) -> None:
    """`register_custom_encoder` casts the whole model, and says so; a low-level extractor does not say, and the
    group reports it as run by its plugin (the run report's `precision_ran`)."""
    from atlaspatch_stream.backends.encoders.group import EncoderGroup

    registry = _registry(_write(tmp_path, PLUGIN))
    group = EncoderGroup([registry.create("tiny_conv"), registry.create("channel_means"), registry.create("color_stats")])
    group.warm_up()
    assert group.precision_ran == {"Tiny_Conv": "float32 (the whole model cast)",
                                   "channel_means": "as its plugin runs it", "color_stats": "exact (weight-free)"}
    group.close()


def test_plugin_cannot_reuse_a_builtin_name(tmp_path: Path) -> None:
    """Registering a built-in name is refused with an error that is also a ValueError (as upstream)."""
    text = "def register_feature_extractors(registry, device, dtype, num_workers):\n    registry.register('resnet18', object)\n"
    with pytest.raises(ValueError, match="resnet18"):
        _registry(_write(tmp_path, text))


def test_plugin_without_hook_or_broken_import_is_a_config_error(tmp_path: Path) -> None:
    """No register_feature_extractors, a syntax error or a missing file: ConfigError naming the file, before any slide."""
    with pytest.raises(ConfigError, match="register_feature_extractors"):
        _registry(_write(tmp_path, "x = 1\n", "nohook.py"))
    with pytest.raises(ConfigError, match="failed to import"):
        _registry(_write(tmp_path, "def broken(:\n", "broken.py"))
    with pytest.raises(ConfigError, match="does not exist"):
        _registry(tmp_path / "missing.py")


def test_loader_must_return_components(tmp_path: Path) -> None:
    """A loader returning something else raises TypeError when the encoder is created (upstream's rule)."""
    text = """
    from atlaspatch_stream.plugins import register_custom_encoder

    def register_feature_extractors(registry, device, dtype, num_workers):
        register_custom_encoder(registry=registry, name="bad", embedding_dim=4, loader=lambda d, t: None,
                                device=device, dtype=dtype)
    """
    registry = _registry(_write(tmp_path, text, "bad_plugin.py"))
    with pytest.raises(TypeError, match="CustomEncoderComponents"):
        registry.create("bad")


def test_plugins_module_does_not_import_torch() -> None:
    """`import atlaspatch_stream.plugins` stays light: torch is not imported by it."""
    code = "import sys, atlaspatch_stream.plugins; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
