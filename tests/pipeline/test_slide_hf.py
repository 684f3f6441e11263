"""TITAN and PRISM through the real loading path (config `auto_map` -> transformers' dynamic modules -> the repo's
model class -> model.safetensors), against STAND-IN model repos written into a temporary Hugging Face cache.

The real TITAN and PRISM code and weights are gated (and TITAN's code is CC-BY-NC-ND), so these repos are small
stand-ins with the real repo ids, file names, class names and call signatures - not the real models. They check
loading (strict for TITAN; PRISM untied, non-strict, text decoder dropped), the float32 features TITAN needs (the
stand-in, like TITAN, index-adds features into a float32 grid), coords and `patch_size_level0`, and the outputs.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from atlaspatch_stream.cli import cli
from atlaspatch_stream.testing.synthetic import write_synthetic_slide

pytest.importorskip("transformers")

COMMIT = "0" * 40

TITAN_CONFIG = '''
from transformers import PretrainedConfig


class TitanConfig(PretrainedConfig):
    """Stand-in for MahmoodLab/TITAN's configuration (not the real one)."""

    model_type = "titan"

    def __init__(self, embed_dim=768, **kwargs):
        self.embed_dim = embed_dim
        super().__init__(**kwargs)
'''

TITAN_MODEL = '''
import torch
from torch import nn
from transformers import PreTrainedModel

from .configuration_titan import TitanConfig


class Titan(PreTrainedModel):
    """Stand-in for MahmoodLab/TITAN's model (not the real one): same class name and slide-encoding signature."""

    config_class = TitanConfig

    def __init__(self, config):
        super().__init__(config)
        self.proj = nn.Linear(config.embed_dim, config.embed_dim)
        self.pos = nn.Linear(2, config.embed_dim)

    def encode_slide_from_patch_features(self, patch_features, patch_coords, patch_size_lv0):
        cells = torch.div(patch_coords[0], int(patch_size_lv0), rounding_mode="floor")
        cells = cells - cells.min(dim=0).values
        width = int(cells[:, 0].max()) + 1
        index = cells[:, 1] * width + cells[:, 0]
        grid = torch.zeros(int(index.max()) + 1, patch_features.shape[-1], dtype=torch.float32,
                           device=patch_features.device)
        grid.index_add_(0, index, patch_features[0])  # float16 features fail here, as in TITAN
        pooled = grid.sum(dim=0) / patch_features.shape[1]
        return self.proj(pooled + self.pos(cells.float().mean(dim=0))).unsqueeze(0)
'''

PRISM_CONFIG = '''
from transformers import PretrainedConfig


class PrismConfig(PretrainedConfig):
    """Stand-in for paige-ai/Prism's configuration (not the real one)."""

    model_type = "prism"

    def __init__(self, context_dim=2560, latent_dim=1280, biogpt_config=None, **kwargs):
        self.context_dim = context_dim
        self.latent_dim = latent_dim
        self.biogpt_config = PretrainedConfig(**(biogpt_config or {"tie_word_embeddings": True}))
        super().__init__(**kwargs)
'''

PRISM_MODEL = '''
from torch import nn
from transformers import PreTrainedModel

from .configuring_prism import PrismConfig


class Prism(PreTrainedModel):
    """Stand-in for paige-ai/Prism's model (not the real one): same class name and slide_representations()."""

    config_class = PrismConfig

    def __init__(self, config):
        super().__init__(config)
        self.image_resampler = nn.Linear(config.context_dim, config.latent_dim)
        self.text_decoder = nn.Linear(config.latent_dim, 8)

    def slide_representations(self, tile_embeddings):
        latents = self.image_resampler(tile_embeddings)
        return {"image_embedding": latents.mean(dim=1), "image_latents": latents}
'''


def _import(path: Path, package: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"{package}.{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def write_standin_repo(cache: Path, repo_id: str, files: dict[str, str], auto_map: dict[str, str], seed: int,
                       drop: tuple[str, ...] = ()) -> Path:
    """A stand-in model repo in the hub cache layout (snapshot + refs/main), with seeded random weights."""
    snapshot = cache / ("models--" + repo_id.replace("/", "--")) / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(COMMIT)
    for name, text in files.items():
        (snapshot / name).write_text(text)
    (snapshot / "config.json").write_text(json.dumps({"auto_map": auto_map}))
    package = f"standin_{repo_id.split('/')[1].lower()}"
    sys.modules[package] = ModuleType(package)
    sys.modules[package].__path__ = [str(snapshot)]  # type: ignore[attr-defined]
    config_mod, model_mod = (auto_map[k].split(".")[0] for k in ("AutoConfig", "AutoModel"))
    config_cls = getattr(_import(snapshot / f"{config_mod}.py", package), auto_map["AutoConfig"].split(".")[1])
    model_cls = getattr(_import(snapshot / f"{model_mod}.py", package), auto_map["AutoModel"].split(".")[1])
    torch.manual_seed(seed)
    model = model_cls(config_cls())
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith(drop)}
    save_file(state, str(snapshot / "model.safetensors"))
    return snapshot


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty Hugging Face cache (offline) with its own dynamic-modules folder."""
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf" / "modules"))
    return cache


def _patch_features(path: Path, name: str, dim: int, seed: int) -> None:
    """Replace `features/<name>` by seeded random values (the patch encoder itself is not what is tested)."""
    with h5py.File(path, "a") as f:
        n = int(f.attrs["num_patches"])
        f.create_dataset(f"features/{name}", data=np.random.default_rng(seed).standard_normal((n, dim),
                                                                                               dtype=np.float32))


def _reference(snapshot: Path, auto_map: dict[str, str]) -> torch.nn.Module:
    package = f"ref_{snapshot.parents[2].name.replace('-', '_')}"
    sys.modules[package] = ModuleType(package)
    sys.modules[package].__path__ = [str(snapshot)]  # type: ignore[attr-defined]
    config_mod, model_mod = (auto_map[k].split(".")[0] for k in ("AutoConfig", "AutoModel"))
    config = getattr(_import(snapshot / f"{config_mod}.py", package), auto_map["AutoConfig"].split(".")[1])()
    model = getattr(_import(snapshot / f"{model_mod}.py", package), auto_map["AutoModel"].split(".")[1])(config)
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(snapshot / "model.safetensors")), strict=False)
    return model.eval()


def _coords_only(slide: Path, out: Path, patch_size: int) -> Path:
    args = ["segment-and-get-coords", str(slide), "-o", str(out), "--patch-size", str(patch_size),
            "--target-mag", "20", "--segmenter", "otsu", "--device", "cpu"]
    assert CliRunner().invoke(cli, args, catch_exceptions=False).exit_code == 0
    return out / "patches" / f"{slide.stem}.h5"


def _embed(out: Path, patch_size: int, name: str, patch_encoder: str, h5: Path) -> tuple[str, ...]:
    """Stage `embed`'s backend, as `encode-slide` builds it, over one finished H5 (the ViT-L/ViT-H patch encoders
    themselves are not built: their features are already in the file)."""
    from atlaspatch_stream.assembly import make_slide_embedder
    from atlaspatch_stream.config import load_config

    config = load_config({"plan": {"patch_size": patch_size, "target_mag": 20},
                          "encode": {"device": "cpu", "extractors": (patch_encoder,), "slide_encoders": (name,)},
                          "write": {"output": out}}, environ={})
    embedder = make_slide_embedder(config)
    embedder.warm_up()
    return embedder.embed(h5)


def test_titan_standin_loads_and_embeds(hub: Path, tmp_path: Path) -> None:
    """The titan slide encoder over existing conch_v15 features (stand-in repo): the repo's class is
    loaded strictly from the cache, gets float32 features, level-0 coords and patch_size_level0, and the stored
    embedding equals the stand-in model run on the H5's own data."""
    auto_map = {"AutoConfig": "configuration_titan.TitanConfig", "AutoModel": "modeling_titan.Titan"}
    snapshot = write_standin_repo(hub, "MahmoodLab/TITAN", {"configuration_titan.py": TITAN_CONFIG,
                                                            "modeling_titan.py": TITAN_MODEL}, auto_map, seed=5)
    slide = tmp_path / "s.svs"
    write_synthetic_slide(slide, width=4096, height=3072, seed=7)
    out = tmp_path / "out"
    h5 = _coords_only(slide, out, 512)
    _patch_features(h5, "conch_v15", 768, seed=1)
    assert _embed(out, 512, "titan", "conch_v15", h5) == ("titan",)
    with h5py.File(h5, "r") as f:
        stored = f["slide_features/titan"][...]
        attrs = dict(f["slide_features/titan"].attrs)
        features = torch.from_numpy(f["features/conch_v15"][...]).unsqueeze(0)
        coords = torch.from_numpy(f["coords"][:, :2].astype(np.int64)).unsqueeze(0)
        size0 = int(f.attrs["patch_size_level0"])
    assert stored.shape == (768,) and stored.dtype == np.float32
    assert attrs["source_patch_encoder"] == "conch_v15" and attrs["patch_size_level0"] == size0 == 1024
    with torch.inference_mode():
        expected = _reference(snapshot, auto_map).encode_slide_from_patch_features(features, coords, size0)
    np.testing.assert_allclose(stored, expected.numpy().reshape(-1), rtol=1e-5, atol=1e-6)


def test_prism_standin_untied_nonstrict_without_decoder(hub: Path, tmp_path: Path) -> None:
    """PRISM (stand-in repo) loads with a checkpoint lacking shared keys, drops its text decoder, and the stored
    1280-wide embedding equals `slide_representations(features)['image_embedding']`."""
    from atlaspatch_stream.backends.encoders.slide_hf import load_repo_model

    auto_map = {"AutoConfig": "configuring_prism.PrismConfig", "AutoModel": "modeling_prism.Prism"}
    snapshot = write_standin_repo(hub, "paige-ai/Prism", {"configuring_prism.py": PRISM_CONFIG,
                                                          "modeling_prism.py": PRISM_MODEL}, auto_map, seed=6,
                                  drop=("text_decoder",))
    model = load_repo_model("paige-ai/Prism", "prism")
    assert not hasattr(model, "text_decoder") and model.config.biogpt_config.tie_word_embeddings is False
    slide = tmp_path / "p.svs"
    write_synthetic_slide(slide, width=2048, height=2048, seed=8)
    out = tmp_path / "out"
    h5 = _coords_only(slide, out, 224)
    _patch_features(h5, "virchow_v1", 2560, seed=2)
    assert _embed(out, 224, "prism", "virchow_v1", h5) == ("prism",)
    with h5py.File(h5, "r") as f:
        stored = f["slide_features/prism"][...]
        features = torch.from_numpy(f["features/virchow_v1"][...]).unsqueeze(0)
    with torch.inference_mode():
        expected = _reference(snapshot, auto_map).slide_representations(features)["image_embedding"]
    assert stored.shape == (1280,)
    np.testing.assert_allclose(stored, expected.numpy().reshape(-1), rtol=1e-5, atol=1e-6)


def test_titan_missing_from_cache_one_line(hub: Path, tmp_path: Path) -> None:
    """Without the TITAN repo in the cache (offline), the run stops before any slide with one line naming it."""
    slide = tmp_path / "s.svs"
    write_synthetic_slide(slide, width=2048, height=2048, seed=7)
    result = CliRunner().invoke(cli, ["encode-slide", str(slide), "-o", str(tmp_path / "o"), "--patch-size", "512",
                                      "--target-mag", "20", "--segmenter", "otsu", "--device", "cpu",
                                      "--slide-encoders", "titan"])
    errors = [t for t in result.output.splitlines() if t.startswith("Error:")]
    assert result.exit_code == 1 and len(errors) == 1 and "MahmoodLab/TITAN" in errors[0]
    assert not (tmp_path / "o" / "patches").exists()
