"""Batch norms folded into their convolutions for CPU inference (`backends/encoders/folding.py`)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn

from atlaspatch_stream.backends.encoders.folding import fold_batch_norms
from atlaspatch_stream.backends.encoders.registry import get_spec
from atlaspatch_stream.backends.encoders.runtime import TorchEncoder


def _with_running_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running statistics and affine parameters, so that a wrong fold shows."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
            module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            module.bias.data.copy_(torch.rand(n, generator=gen) - 0.5)
    return model.eval()


def _batch_norms(model: nn.Module) -> int:
    return sum(type(m) is nn.BatchNorm2d for m in model.modules())


def test_a_resnet_folds_every_batch_norm_and_gives_the_same_features() -> None:
    """timm's resnet18: all 20 batch norms fold, the class and its methods stay, features equal to float32
    rounding."""
    model = _with_running_stats(timm.create_model("resnet18", pretrained=False, num_classes=0))
    folded = copy.deepcopy(model)
    assert _batch_norms(model) == 20 and fold_batch_norms(folded) == 20 and _batch_norms(folded) == 0
    assert type(folded) is type(model) and hasattr(folded, "forward_features")
    x = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


class _Shared(nn.Module):
    """A convolution whose output the batch norm reads and the residual reuses: nothing may fold."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


class _Untraceable(nn.Module):
    """Control flow on a tensor's value: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.bn(self.conv(x))
        return x


class _Twice(nn.Module):
    """One batch norm called after two convolutions: folding it into either would change the other."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.a(x)) + self.bn(self.b(x))


@pytest.mark.parametrize("cls", [_Shared, _Untraceable, _Twice])
def test_what_cannot_fold_is_left_as_it_is(cls: type[nn.Module]) -> None:
    """A conv output used twice, an untraceable model, a batch norm called twice: 0 folded, outputs unchanged."""
    model = _with_running_stats(cls())
    before = copy.deepcopy(model)
    assert fold_batch_norms(model) == 0 and _batch_norms(model) == 1
    x = torch.rand(1, 3, 8, 8)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), before(x))


def test_a_model_in_training_mode_is_not_folded() -> None:
    """Training mode normalises with the batch's statistics, which no fold can capture."""
    model = timm.create_model("resnet18", pretrained=False, num_classes=0).train()
    assert fold_batch_norms(model) == 0 and _batch_norms(model) == 20


def test_the_cpu_encoder_folds_a_resnet_and_its_features_stay() -> None:
    """`TorchEncoder` on the CPU folds a convolutional model's batch norms at warm-up; its float32 features equal
    the unfolded model's, run by hand with the same preprocessing, to float32 rounding."""
    spec = get_spec("resnet18")
    model = _with_running_stats(timm.create_model("resnet18", pretrained=False, num_classes=0))
    reference = copy.deepcopy(model)
    encoder = TorchEncoder(spec, precision="float32", model=model)
    patches = np.random.default_rng(0).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    features = encoder.encode(patches)
    assert _batch_norms(model) == 0
    with torch.inference_mode():
        expected = reference(encoder.model_input(patches)).flatten(1).numpy()
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-5)
