"""Weights: the caches upstream fills, local files, strict loading, and offline errors that say what to do."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from atlaspatch_stream.backends.encoders import registry as reg
from atlaspatch_stream.backends.encoders.loading import read_state_dict
from atlaspatch_stream.backends.encoders.own_family import _resample_dino
from atlaspatch_stream.errors import WeightsError


def _patches(n: int = 2, size: int = 224, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _hf_cache_file(repo_id: str, filename: str) -> Path:
    """The path a file takes in a Hugging Face cache snapshot (refs/main -> snapshots/<commit>/<file>)."""
    root = Path(os.environ["HF_HUB_CACHE"]) / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    path = root / "snapshots" / commit / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _registry(**weights: Path) -> reg.EncoderRegistry:
    return reg.build_registry(device="cpu", precision="float32", weights=weights, plugins=(), num_workers=0)


def _reference(encoder: object, model: torch.nn.Module, pixels: np.ndarray, forward=None) -> np.ndarray:
    """The saved model's output on exactly the tensor the encoder feeds its own model."""
    x = encoder.model_input(pixels)  # type: ignore[attr-defined]
    with torch.inference_mode():
        out = forward(model, x) if forward else model(x)
    return out.flatten(1).float().numpy()


def test_torchvision_cache_file_round_trips() -> None:
    """Save a seeded torchvision resnet18 (with its fc, torchvision's key names) where torchvision caches it.

    prepare() finds it under $TORCH_HOME/hub/checkpoints; the created encoder (meta build, head dropped, strict
    assign-load) reproduces the saved model's pooled features.
    """
    import torchvision.models as tvm

    torch.manual_seed(3)
    full = tvm.resnet18(weights=None).eval()
    target = Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    target.parent.mkdir(parents=True)
    torch.save(full.state_dict(), target)
    registry = _registry()
    registry.prepare(["resnet18"])
    assert registry.weights_path("resnet18") == target
    encoder = registry.create("resnet18")
    full.fc = torch.nn.Identity()
    pixels = _patches()
    np.testing.assert_allclose(
        encoder.encode(pixels), _reference(encoder, full, pixels), rtol=1e-5, atol=1e-5
    )


def test_hf_cache_sibling_file_name_is_found() -> None:
    """timm's `hf-hub:` loader takes `model.safetensors` or, when the repo has none, `pytorch_model.bin`: a cached
    pickle is used for a repo whose published file is the safetensors one."""
    path = _hf_cache_file("1aurent/resnet50.lunit_bt", "pytorch_model.bin")
    torch.save({"w": torch.zeros(1)}, path)
    registry = _registry()
    registry.prepare(["lunit_resnet50_bt"])
    assert registry.weights_path("lunit_resnet50_bt") == path


def test_hf_cache_file_round_trips() -> None:
    """A timm ViT-S saved in its published key names into an HF cache snapshot loads through the meta fast path
    and reproduces the saved model."""
    import timm

    filename = "model.safetensors"

    torch.manual_seed(4)
    saved = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0).eval()
    path = _hf_cache_file("1aurent/vit_small_patch16_224.lunit_dino", filename)
    save_file(saved.state_dict(), str(path))
    registry = _registry()
    registry.prepare(["lunit_vit_small_patch16_dino"])
    assert registry.weights_path("lunit_vit_small_patch16_dino") == path
    encoder = registry.create("lunit_vit_small_patch16_dino")
    pixels = _patches(size=256)
    np.testing.assert_allclose(
        encoder.encode(pixels), _reference(encoder, saved, pixels), rtol=1e-5, atol=1e-5
    )


def test_local_pth_for_chief_with_wrapped_state_dict(tmp_path: Path) -> None:
    """CHIEF is local-file only: a `{'model': state_dict}` pickle given as --weights loads into the Swin + ConvStem
    build (normal CPU build: its buffers are not saved) and reproduces the saved model."""
    spec = reg.get_spec("chief-ctranspath")
    torch.manual_seed(5)
    saved = spec.build().eval()
    path = tmp_path / "CHIEF_CTransPath.pth"
    torch.save({"model": saved.state_dict()}, path)
    encoder = _registry(**{"chief-ctranspath": path}).create("chief-ctranspath")
    pixels = _patches(n=1, size=256)
    np.testing.assert_allclose(
        encoder.encode(pixels), _reference(encoder, saved, pixels), rtol=1e-4, atol=1e-4
    )


def test_local_safetensors_with_open_clip_layout_for_biomedclip(tmp_path: Path) -> None:
    """An open_clip-layout BiomedCLIP file (visual.trunk.*, visual.head.proj.weight, plus text-tower keys) given as
    a local .safetensors loads trunk and projection and reproduces the saved tower."""
    spec = reg.get_spec("biomedclip")
    torch.manual_seed(6)
    saved = spec.build().eval()
    state = {f"visual.trunk.{k}": v for k, v in saved.trunk.state_dict().items()}
    state["visual.head.proj.weight"] = saved.proj.weight.detach().clone()
    state["text.transformer.embeddings.word_embeddings.weight"] = torch.randn(10, 4)
    path = tmp_path / "biomedclip.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    encoder = _registry(biomedclip=path).create("biomedclip")
    pixels = _patches(n=1)
    np.testing.assert_allclose(
        encoder.encode(pixels), _reference(encoder, saved, pixels), rtol=1e-4, atol=1e-4
    )


def test_offline_missing_torchvision_weights_name_file_folder_and_remedy() -> None:
    """Offline with an empty torch cache: prepare() raises WeightsError naming the file, the folder and --weights."""
    with pytest.raises(WeightsError) as info:
        _registry().prepare(["resnet18"])
    text = str(info.value)
    assert "resnet18-f37072fd.pth" in text
    assert str(Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints") in text
    assert "--weights resnet18=PATH" in text


def test_offline_missing_gated_hf_weights_explain_the_gate() -> None:
    """A gated hub model missing from the cache: the error names repo, file, cache, the gate and HF_TOKEN."""
    with pytest.raises(WeightsError) as info:
        _registry().prepare(["uni_v1"])
    text = str(info.value)
    for part in (
        "MahmoodLab/uni",
        "pytorch_model.bin",
        os.environ["HF_HUB_CACHE"],
        "gated",
        "HF_TOKEN",
        "--weights uni_v1=PATH",
    ):
        assert part in text, part


def test_local_only_weights_and_bad_override_paths() -> None:
    """CHIEF without --weights, or a --weights path that does not exist: WeightsError saying how to supply it."""
    with pytest.raises(WeightsError, match=r"--weights chief-ctranspath=PATH"):
        _registry().prepare(["chief-ctranspath"])
    with pytest.raises(WeightsError, match="does not exist"):
        _registry(resnet18=Path("/nonexistent/r18.pth")).prepare(["resnet18"])


def test_checkpoint_that_does_not_fit_fails_loudly(tmp_path: Path) -> None:
    """A state dict with a missing key and a wrong shape: WeightsError naming both, nothing silently skipped."""
    import torchvision.models as tvm

    state = tvm.resnet18(weights=None).state_dict()
    del state["layer1.0.conv1.weight"]
    state["conv1.weight"] = torch.zeros(1, 1, 1, 1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(
        WeightsError, match=r"missing keys.*layer1\.0\.conv1\.weight.*shape mismatch.*conv1\.weight"
    ):
        _registry(resnet18=path).create("resnet18")


class _NotATensor:
    pass


def test_pickles_with_foreign_objects_are_refused(tmp_path: Path) -> None:
    """torch.load runs with weights_only=True: a pickle holding arbitrary objects is a WeightsError, not executed."""
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(2), "extra": _NotATensor()}, path)
    with pytest.raises(WeightsError, match="weights_only"):
        read_state_dict(path)


def test_conch_v15_position_embedding_is_resampled_dino_style() -> None:
    """The 14x14 grid of a 224-px checkpoint becomes 28x28 for 448 px; the class position is kept as is."""
    pos = torch.randn(1, 1 + 14 * 14, 8)
    out = _resample_dino(pos, 28)
    assert out.shape == (1, 1 + 28 * 28, 8)
    torch.testing.assert_close(out[:, :1], pos[:, :1])
    assert _resample_dino(pos, 14) is pos
