"""Every encoder looks up its weights where upstream AtlasPatch put them, so an existing upstream cache is reused.

The table below is written from the reference documents, not from the registry: repo ids as upstream spells them
(`upstream-atlaspatch.md` §5.1, the string each upstream loader passes to the hub), file names from `encoders.md`
Table B (what each published repo holds). Where the two documents disagree on a repo id (`uni_v1`: `MahmoodLab/uni`
in §5.1, `MahmoodLab/UNI` in Table B; `hibou_b`: `histai/hibou-B` vs `histai/hibou-b`), §5.1 wins: it is the spelling
upstream's code uses, hence the cache folder name it leaves behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from atlaspatch_stream.backends import weights as wt
from atlaspatch_stream.backends.encoders import registry as reg
from atlaspatch_stream.backends.encoders.loading import find_local_weights, resolve_weights
from atlaspatch_stream.errors import WeightsError
from atlaspatch_stream.testing.sam2_weights import install_in_hf_cache

# How each upstream loader asks the hub for weights, in its order (the first file the repo has is the one cached).
TIMM = ("model.safetensors", "pytorch_model.bin")  # timm `hf-hub:` names: safetensors twin, then the pickle
OPEN_CLIP = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # open_clip, same rule
TRANSFORMERS = (  # transformers from_pretrained: single, sharded safetensors; single, sharded pickle
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_DINOV3 = "facebook/dinov3-{}-pretrain-{}"

# name -> (repo id as upstream spells it, file the repo holds, the names upstream's loader looks up)
UPSTREAM_HF: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "dinov2_small": ("facebook/dinov2-small", "model.safetensors", TRANSFORMERS),
    "dinov2_base": ("facebook/dinov2-base", "model.safetensors", TRANSFORMERS),
    "dinov2_large": ("facebook/dinov2-large", "model.safetensors", TRANSFORMERS),
    "dinov2_giant": ("facebook/dinov2-giant", "model.safetensors", TRANSFORMERS),
    "dinov3_vits16": (_DINOV3.format("vits16", "lvd1689m"), "model.safetensors", TRANSFORMERS),
    "dinov3_vits16_plus": (_DINOV3.format("vits16plus", "lvd1689m"), "model.safetensors", TRANSFORMERS),
    "dinov3_vitb16": (_DINOV3.format("vitb16", "lvd1689m"), "model.safetensors", TRANSFORMERS),
    "dinov3_vitl16": (_DINOV3.format("vitl16", "lvd1689m"), "model.safetensors", TRANSFORMERS),
    "dinov3_vitl16_sat": (_DINOV3.format("vitl16", "sat493m"), "model.safetensors", TRANSFORMERS),
    "dinov3_vith16_plus": (_DINOV3.format("vith16plus", "lvd1689m"), "model.safetensors", TRANSFORMERS),
    "dinov3_vit7b16": (_DINOV3.format("vit7b16", "lvd1689m"), "model.safetensors.index.json", TRANSFORMERS),
    "dinov3_vit7b16_sat": (
        _DINOV3.format("vit7b16", "sat493m"),
        "model.safetensors.index.json",
        TRANSFORMERS,
    ),
    "clip_rn50": ("timm/resnet50_clip.openai", "open_clip_pytorch_model.bin", OPEN_CLIP),
    "clip_rn101": ("timm/resnet101_clip.openai", "open_clip_pytorch_model.bin", OPEN_CLIP),
    "clip_rn50x4": ("timm/resnet50x4_clip.openai", "open_clip_pytorch_model.bin", OPEN_CLIP),
    "clip_rn50x16": ("timm/resnet50x16_clip.openai", "open_clip_pytorch_model.bin", OPEN_CLIP),
    "clip_rn50x64": ("timm/resnet50x64_clip.openai", "open_clip_pytorch_model.bin", OPEN_CLIP),
    "clip_vit_b_32": ("timm/vit_base_patch32_clip_224.openai", "open_clip_pytorch_model.bin", OPEN_CLIP),
    "clip_vit_b_16": ("timm/vit_base_patch16_clip_224.openai", "open_clip_pytorch_model.bin", OPEN_CLIP),
    "clip_vit_l_14": ("timm/vit_large_patch14_clip_224.openai", "open_clip_pytorch_model.bin", OPEN_CLIP),
    "clip_vit_l_14_336": ("timm/vit_large_patch14_clip_336.openai", "open_clip_pytorch_model.bin", OPEN_CLIP),
    "conch_v1": ("MahmoodLab/conch", "pytorch_model.bin", ("pytorch_model.bin",)),
    "conch_v15": ("MahmoodLab/conchv1_5", "pytorch_model_vision.bin", ("pytorch_model_vision.bin",)),
    "omiclip": ("WangGuangyuLab/Loki", "checkpoint.pt", ("checkpoint.pt",)),
    "quilt_b_32": ("wisdomik/QuiltNet-B-32", "pytorch_model.bin", TRANSFORMERS),
    "quilt_b_16": ("wisdomik/QuiltNet-B-16", "pytorch_model.bin", TRANSFORMERS),
    "quilt_b_16_pmb": ("wisdomik/QuiltNet-B-16-PMB", "open_clip_pytorch_model.bin", OPEN_CLIP),
    "uni_v1": ("MahmoodLab/uni", "pytorch_model.bin", TIMM),
    "uni_v2": ("MahmoodLab/UNI2-h", "pytorch_model.bin", TIMM),
    "lunit_resnet50_bt": ("1aurent/resnet50.lunit_bt", "model.safetensors", TIMM),
    "lunit_resnet50_swav": ("1aurent/resnet50.lunit_swav", "model.safetensors", TIMM),
    "lunit_resnet50_mocov2": ("1aurent/resnet50.lunit_mocov2", "model.safetensors", TIMM),
    "lunit_vit_small_patch16_dino": ("1aurent/vit_small_patch16_224.lunit_dino", "model.safetensors", TIMM),
    "lunit_vit_small_patch8_dino": ("1aurent/vit_small_patch8_224.lunit_dino", "model.safetensors", TIMM),
    "plip": ("vinid/plip", "pytorch_model.bin", TRANSFORMERS),
    "medsiglip": ("google/medsiglip-448", "model.safetensors", TRANSFORMERS),
    "musk": ("xiangjx/musk", "model.safetensors", ("model.safetensors",)),
    "openmidnight": ("SophontAI/OpenMidnight", "teacher_checkpoint_load.pt", ("teacher_checkpoint_load.pt",)),
    "pathorchestra": ("AI4Pathology/PathOrchestra", "pytorch_model.bin", TIMM),
    "h_optimus_0": ("bioptimus/H-optimus-0", "pytorch_model.bin", TIMM),
    "h_optimus_1": ("bioptimus/H-optimus-1", "pytorch_model.bin", TIMM),
    "h0_mini": ("bioptimus/H0-mini", "pytorch_model.bin", TIMM),
    "hibou_b": ("histai/hibou-B", "model.safetensors", TRANSFORMERS),
    "hibou_l": ("histai/hibou-L", "model.safetensors", TRANSFORMERS),
    "biomedclip": (
        "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
        "open_clip_pytorch_model.bin",
        OPEN_CLIP,
    ),
    "phikon_v1": ("owkin/phikon", "model.safetensors", TRANSFORMERS),
    "phikon_v2": ("owkin/phikon-v2", "model.safetensors", TRANSFORMERS),
    "virchow_v1": ("paige-ai/Virchow", "pytorch_model.bin", TIMM),
    "virchow_v2": ("paige-ai/Virchow2", "pytorch_model.bin", TIMM),
    "prov_gigapath": ("prov-gigapath/prov-gigapath", "pytorch_model.bin", TIMM),
    "midnight": ("kaiko-ai/midnight", "model.safetensors", TRANSFORMERS),
}
# torchvision's own cache, $TORCH_HOME/hub/checkpoints/<file> (the IMAGENET1K_V1 files; SWAG E2E for vit_h_14).
UPSTREAM_TORCHVISION: dict[str, str] = {
    "resnet18": "resnet18-f37072fd.pth",
    "resnet34": "resnet34-b627a593.pth",
    "resnet50": "resnet50-0676ba61.pth",
    "resnet101": "resnet101-63fe2227.pth",
    "resnet152": "resnet152-394f9c45.pth",
    "convnext_tiny": "convnext_tiny-983f1562.pth",
    "convnext_small": "convnext_small-0c510722.pth",
    "convnext_base": "convnext_base-6075fbad.pth",
    "convnext_large": "convnext_large-ea097f82.pth",
    "vit_b_16": "vit_b_16-c867db91.pth",
    "vit_b_32": "vit_b_32-d86f8d99.pth",
    "vit_l_16": "vit_l_16-852ce7e3.pth",
    "vit_l_32": "vit_l_32-c7638314.pth",
    "vit_h_14": "vit_h_14_swag-80465313.pth",
}
# Not on the hub: upstream fetches it from Google Drive with gdown into torch.hub.get_dir()/atlas_patch/chief/.
UPSTREAM_LOCAL: dict[str, tuple[str, str]] = {
    "chief-ctranspath": ("atlas_patch/chief", "CHIEF_CTransPath.pth")
}
UPSTREAM_NAMES = sorted({*UPSTREAM_HF, *UPSTREAM_TORCHVISION, *UPSTREAM_LOCAL})
# open_clip architecture names behind upstream's `pretrained="openai"` calls.
OPENAI_CLIP_ARCH = {
    "clip_rn50": "RN50", "clip_rn101": "RN101", "clip_rn50x4": "RN50x4", "clip_rn50x16": "RN50x16",
    "clip_rn50x64": "RN50x64", "clip_vit_b_32": "ViT-B-32", "clip_vit_b_16": "ViT-B-16", "clip_vit_l_14": "ViT-L-14",
    "clip_vit_l_14_336": "ViT-L-14-336",
}  # fmt: skip


def test_the_table_covers_exactly_the_66_upstream_names() -> None:
    """The upstream table has 66 names; the registry holds exactly those plus our own weight-free `color_stats`."""
    assert len(UPSTREAM_NAMES) == 66
    assert set(reg.available_encoders()) == {*UPSTREAM_NAMES, "color_stats"}


@pytest.mark.parametrize("name", sorted(UPSTREAM_HF))
def test_hub_repo_id_and_file_names_are_upstreams(name: str) -> None:
    """For each hub encoder: the repo id is upstream's, letter for letter; the file is the one the repo holds; the
    names looked up are upstream's loader's, in its order."""
    repo, filename, lookup = UPSTREAM_HF[name]
    source = reg.get_spec(name).weights
    assert (source.kind, source.repo_id, source.filename) == ("hf", repo, filename)
    assert source.files == lookup and filename in lookup


@pytest.mark.parametrize("name", sorted(UPSTREAM_TORCHVISION))
def test_torchvision_file_names_are_upstreams(name: str) -> None:
    """For each torchvision encoder: the file under $TORCH_HOME/hub/checkpoints is torchvision's, downloaded from
    its own URL."""
    source = reg.get_spec(name).weights
    assert (source.kind, source.filename) == ("torchvision", UPSTREAM_TORCHVISION[name])
    assert source.url == f"https://download.pytorch.org/models/{UPSTREAM_TORCHVISION[name]}"


def test_chief_is_looked_up_where_upstream_downloads_it() -> None:
    """CHIEF: local file only, also found in upstream's own download folder under the torch hub directory."""
    source = reg.get_spec("chief-ctranspath").weights
    assert (source.kind, source.folder, source.filename) == ("local", *UPSTREAM_LOCAL["chief-ctranspath"])


@pytest.mark.parametrize("name", sorted(OPENAI_CLIP_ARCH))
def test_openai_clip_repos_are_the_ones_open_clip_reads(name: str) -> None:
    """open_clip's own pretrained table (what upstream's `pretrained="openai"` resolves) names the same repo."""
    open_clip = pytest.importorskip("open_clip")
    hub = open_clip.get_pretrained_cfg(OPENAI_CLIP_ARCH[name], "openai")["hf_hub"]
    assert hub.rstrip("/") == reg.get_spec(name).weights.repo_id


def _other_case(repo_id: str) -> str:
    """The same repo id in another letter case (every id here has letters)."""
    swapped = repo_id.swapcase()
    assert swapped != repo_id
    return swapped


def _install(repo_id: str, filename: str, payload: bytes, tmp_path: Path) -> Path:
    """Cache `payload` as `filename` of `repo_id`, laid out as huggingface_hub leaves a download."""
    source = tmp_path / "download" / filename
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_bytes(payload)
    return install_in_hf_cache(source, wt.hf_cache_dir(), repo_id, filename)


@pytest.mark.parametrize("spelling", ["upstream", "other case"])
@pytest.mark.parametrize("name", sorted(UPSTREAM_HF))
def test_an_upstream_cache_is_found_offline(name: str, spelling: str, tmp_path: Path) -> None:
    """Lay out the cache as upstream's download leaves it (`models--ORG--NAME/refs/main`, `snapshots/<sha>/<file>`,
    and a `.no_exist/<sha>/` marker for each name its loader asked for first and the repo lacked), under upstream's
    spelling or another letter case; offline, the weights resolve to that file, and `encoders` reports them
    present."""
    repo, filename, lookup = UPSTREAM_HF[name]
    cached_as = repo if spelling == "upstream" else _other_case(repo)
    payload = b"weights of " + name.encode()
    if filename.endswith(".index.json"):  # sharded (DINOv3 7B): the index and its shard, in one snapshot
        _install(cached_as, "model-00001-of-00001.safetensors", payload, tmp_path)
        payload = json.dumps({"weight_map": {"w": "model-00001-of-00001.safetensors"}}).encode()
    installed = _install(cached_as, filename, payload, tmp_path)
    repo_dir = wt.hf_cache_dir() / f"models--{cached_as.replace('/', '--')}"
    assert installed.is_relative_to(repo_dir / "snapshots" / (repo_dir / "refs" / "main").read_text())
    for absent in lookup[: lookup.index(filename)]:  # what huggingface_hub records after a 404
        marker = repo_dir / ".no_exist" / installed.parent.name / absent
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    spec = reg.get_spec(name)
    assert resolve_weights(spec) == installed
    assert find_local_weights(spec) == installed


def test_the_two_reported_mismatches_are_found_under_their_real_world_spellings(tmp_path: Path) -> None:
    """The issue's cases: `models--MahmoodLab--uni` (upstream's timm call) and `models--MahmoodLab--UNI` (the hub's
    display name) both serve uni_v1; `models--histai--hibou-B` and `models--histai--hibou-b` both serve hibou_b."""
    for name, spellings in {
        "uni_v1": ("MahmoodLab/uni", "MahmoodLab/UNI"),
        "hibou_b": ("histai/hibou-B", "histai/hibou-b"),
    }.items():
        filename = UPSTREAM_HF[name][1]
        for repo in spellings:
            installed = _install(repo, filename, repo.encode(), tmp_path / repo)
            assert resolve_weights(reg.get_spec(name)) == installed
            os.remove(installed)


def test_missing_weights_name_the_lookup_exactly() -> None:
    """Offline, uni_v1 not cached: the one-line error names repo and files exactly as looked up, the cache folder
    searched, the gate and `--weights uni_v1=PATH`."""
    with pytest.raises(WeightsError) as info:
        resolve_weights(reg.get_spec("uni_v1"))
    text = str(info.value)
    for part in (
        "uni_v1:",
        "model.safetensors or pytorch_model.bin from Hugging Face repo MahmoodLab/uni ",
        str(wt.hf_cache_dir() / "models--MahmoodLab--uni"),
        "--weights uni_v1=PATH",
        "HF_TOKEN",
    ):
        assert part in text, part
    assert "\n" not in text


def test_chief_in_upstreams_download_folder_is_used() -> None:
    """Without --weights and without the file, CHIEF's error names upstream's folder and the flag; with the file
    where upstream's gdown download put it, that file is used."""
    spec = reg.get_spec("chief-ctranspath")
    target = Path(os.environ["TORCH_HOME"]) / "hub" / "atlas_patch" / "chief" / "CHIEF_CTransPath.pth"
    with pytest.raises(WeightsError) as info:
        resolve_weights(spec)
    assert str(target) in str(info.value) and "--weights chief-ctranspath=PATH" in str(info.value)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"chief")
    assert resolve_weights(spec) == target
    assert find_local_weights(spec) == target


# ------------------------------------------------------------------------------------ real loads from the cache


def _patches(n: int = 2, size: int = 224, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _encode_both(name: str, saved: Any, forward: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """The registry's encoder (weights resolved from the cache) and the saved model, on the same input tensor."""
    import torch

    encoder = reg.build_registry(
        device="cpu", precision="float32", weights={}, plugins=(), num_workers=0
    ).create(name)
    pixels = _patches()
    x = encoder.model_input(pixels)
    with torch.inference_mode():
        reference = forward(saved, x) if forward else saved(x)
    return encoder.encode(pixels), reference.flatten(1).float().numpy()


@pytest.mark.parametrize("spelling", ["upstream", "other case"])
def test_timm_weights_load_from_either_spelling(spelling: str, tmp_path: Path) -> None:
    """A seeded timm ViT-S saved as upstream's file in a cache folder of either letter case: the encoder built
    offline from it reproduces the saved model."""
    import torch
    from safetensors.torch import save_file

    name = "lunit_vit_small_patch16_dino"
    repo, filename, _ = UPSTREAM_HF[name]
    torch.manual_seed(21)
    saved = reg.get_spec(name).build().eval()
    source = tmp_path / filename
    save_file(saved.state_dict(), str(source))
    install_in_hf_cache(
        source, wt.hf_cache_dir(), repo if spelling == "upstream" else _other_case(repo), filename
    )
    ours, reference = _encode_both(name, saved)
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spelling", ["upstream", "other case"])
def test_transformers_weights_load_from_either_spelling(spelling: str, tmp_path: Path) -> None:
    """A seeded DINOv2-S saved as upstream's model.safetensors in a cache folder of either letter case: the encoder
    built offline from it reproduces the saved model."""
    pytest.importorskip("transformers")
    import torch
    from safetensors.torch import save_file

    name = "dinov2_small"
    repo, filename, _ = UPSTREAM_HF[name]
    spec = reg.get_spec(name)
    torch.manual_seed(22)
    saved = spec.build().eval()
    source = tmp_path / filename
    save_file({k: v.contiguous() for k, v in saved.state_dict().items()}, str(source))
    install_in_hf_cache(
        source, wt.hf_cache_dir(), repo if spelling == "upstream" else _other_case(repo), filename
    )
    ours, reference = _encode_both(name, saved, spec.forward)
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4)
