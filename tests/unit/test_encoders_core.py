"""Encoder registry and runtime: names, meta-device dims, preprocessing parity with torchvision on PIL, batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from atlaspatch_stream.backends.encoders import registry as reg
from atlaspatch_stream.backends.encoders.check import CheckResult, check_encoders, meta_output_dim
from atlaspatch_stream.backends.encoders.loading import has_unsaved_buffers
from atlaspatch_stream.backends.encoders.runtime import (
    TorchEncoder,
    autocast_dtype,
    crop_box,
    pil_resized_crops,
    preprocess_batch,
    resized_size,
)
from atlaspatch_stream.backends.encoders.spec import Preprocess
from atlaspatch_stream.errors import ConfigError, MissingExtraError

TIER1 = (  # noqa: SIM905 - one readable block
    "resnet18 resnet34 resnet50 resnet101 resnet152 convnext_tiny convnext_small convnext_base convnext_large "
    "vit_b_16 vit_b_32 vit_l_16 vit_l_32 vit_h_14 clip_rn50 clip_rn101 clip_rn50x4 clip_rn50x16 clip_rn50x64 "
    "clip_vit_b_32 clip_vit_b_16 clip_vit_l_14 clip_vit_l_14_336 uni_v1 uni_v2 virchow_v1 virchow_v2 prov_gigapath "
    "h_optimus_0 h_optimus_1 h0_mini pathorchestra lunit_resnet50_bt lunit_resnet50_swav lunit_resnet50_mocov2 "
    "lunit_vit_small_patch16_dino lunit_vit_small_patch8_dino openmidnight conch_v1 conch_v15 biomedclip "
    "chief-ctranspath"
).split()
# Upstream's declared widths (reference §5.1).
DECLARED = {
    "resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048, "resnet152": 2048,
    "convnext_tiny": 768, "convnext_small": 768, "convnext_base": 1024, "convnext_large": 1536,
    "vit_b_16": 768, "vit_b_32": 768, "vit_l_16": 1024, "vit_l_32": 1024, "vit_h_14": 1280,
    "clip_rn50": 1024, "clip_rn101": 512, "clip_rn50x4": 640, "clip_rn50x16": 768, "clip_rn50x64": 1024,
    "clip_vit_b_32": 512, "clip_vit_b_16": 512, "clip_vit_l_14": 768, "clip_vit_l_14_336": 768,
    "uni_v1": 1024, "uni_v2": 1536, "virchow_v1": 2560, "virchow_v2": 2560, "prov_gigapath": 1536,
    "h_optimus_0": 1536, "h_optimus_1": 1536, "h0_mini": 1536, "pathorchestra": 1024,
    "lunit_resnet50_bt": 2048, "lunit_resnet50_swav": 2048, "lunit_resnet50_mocov2": 2048,
    "lunit_vit_small_patch16_dino": 384, "lunit_vit_small_patch8_dino": 384, "openmidnight": 1536,
    "conch_v1": 512, "conch_v15": 768, "biomedclip": 512, "chief-ctranspath": 768,
}  # fmt: skip
PIXEL_TOLERANCE = (
    2 / 255 + 1e-4
)  # measured worst case on uniform noise: exactly 2/255 (PIL fixed-point rounding)


def _seeded_patches(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Tissue-like patches: smooth colour gradients plus noise, uint8 RGB."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        base = np.stack([200 - 80 * xx, 120 + 60 * yy, 190 - 40 * xx * yy], axis=-1)
        out.append(np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8))
    return np.stack(out)


def test_tier1_names_are_all_registered_in_the_core_tier() -> None:
    """The 42 tier-1 names exist, need no extra, and color_stats is there too; the registry list is sorted."""
    names = reg.available_encoders()
    assert names == sorted(names)
    for name in [*TIER1, "color_stats"]:
        assert name in names
        assert reg.get_spec(name).tier == "core"
        assert reg.get_spec(name).extra is None
    assert len(TIER1) == 42


def test_every_tier1_architecture_gives_the_declared_width_on_meta() -> None:
    """Build each tier-1 architecture once on the meta device and run upstream's pooling on a meta batch.

    Invariants: the width equals upstream's declared dim; a spec marked meta_load has no buffer missing from its
    state dict (the meta fast path would leave such a buffer garbage).
    """
    for name in TIER1:
        spec = reg.get_spec(name)
        with torch.device("meta"):
            model = spec.build()
        assert spec.meta_load == (not has_unsaved_buffers(model)), name
        assert meta_output_dim(spec, model=model) == DECLARED[name] == spec.dim, name


def test_check_encoders_reports_each_name() -> None:
    """check_encoders returns one CheckResult per name, ok with the measured width."""
    results = check_encoders(["resnet18", "color_stats", "conch_v1"])
    assert [r.name for r in results] == ["resnet18", "color_stats", "conch_v1"]
    assert all(
        isinstance(r, CheckResult) and r.ok and r.got == r.expected and r.error is None for r in results
    )


@pytest.mark.parametrize("name", [n for n in TIER1 if reg.get_spec(n).family.startswith("torchvision")])
def test_torchvision_preprocessing_equals_the_weights_enum(name: str) -> None:
    """Resize, crop, interpolation and stats equal torchvision's own `weights.transforms()` for the upstream weights."""
    import torchvision.models as tvm

    enum = tvm.get_model_weights(name)
    weights = enum.IMAGENET1K_SWAG_E2E_V1 if name == "vit_h_14" else enum.IMAGENET1K_V1
    tf = weights.transforms()
    pre = reg.get_spec(name).preprocess
    assert pre is not None
    assert [pre.resize] == tf.resize_size and [pre.crop] == tf.crop_size
    assert pre.interpolation == tf.interpolation.value
    assert np.allclose(pre.mean, tf.mean) and np.allclose(pre.std, tf.std)
    assert reg.get_spec(name).weights.filename == weights.url.rsplit("/", 1)[1]


def _torchvision_reference(image: np.ndarray, pre: Preprocess) -> torch.Tensor:
    modes = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}
    size = pre.resize if isinstance(pre.resize, int) else list(pre.resize)  # type: ignore[arg-type]
    ops: list = [T.Resize(size, interpolation=modes[pre.interpolation])]
    if pre.crop is not None:
        ops.append(T.CenterCrop(pre.crop))
    ops += [T.ToTensor(), T.Normalize(pre.mean, pre.std)]
    return T.Compose(ops)(Image.fromarray(image))


def _unique_preprocess() -> dict[str, Preprocess]:
    seen: dict[str, Preprocess] = {}
    for name in reg.available_encoders():
        pre = reg.get_spec(name).preprocess
        if pre is not None and pre not in seen.values():
            seen[name] = pre
    return seen


@pytest.mark.parametrize("patch_size", [224, 256])
def test_tensor_preprocessing_matches_torchvision_on_pil(patch_size: int) -> None:
    """For every distinct built-in transform, our batched tensor ops equal torchvision on the PIL patch.

    Steps: one smooth+noise patch and one pure-noise patch (the hardest case for bicubic) at 224 and 256 px;
    compare in pixel units (difference x std). Invariant: max abs difference <= 2/255.
    """
    rng = np.random.default_rng(1)
    images = [
        _seeded_patches(1, patch_size)[0],
        rng.integers(0, 256, (patch_size, patch_size, 3), dtype=np.uint8),
    ]
    for name, pre in _unique_preprocess().items():
        for image in images:
            ref = _torchvision_reference(image, pre)
            x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
            got = preprocess_batch(x, pre)[0]
            assert got.shape == ref.shape, name
            diff = ((got - ref).abs() * torch.tensor(pre.std).view(3, 1, 1)).max().item()
            assert diff <= PIXEL_TOLERANCE, (name, diff * 255)


def test_resize_and_crop_follow_torchvision_rounding() -> None:
    """Shortest-side resize keeps the aspect with int truncation; the centre crop rounds its offsets."""
    assert resized_size(224, 300, 256) == (256, int(256 * 300 / 224))
    assert resized_size(300, 224, 256) == (int(256 * 300 / 224), 256)
    assert resized_size(100, 50, (224, 224)) == (224, 224)
    assert crop_box(256, 256, 224) == (16, 16)
    assert crop_box(233, 233, 224) == (round(4.5), round(4.5))
    small = torch.ones(1, 3, 200, 200)
    padded = preprocess_batch(small, Preprocess(None, 224, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))
    assert padded.shape[-2:] == (224, 224) and padded[0, 0, 0, 0] == 0 and padded[0, 0, 112, 112] == 1


@pytest.mark.parametrize("name", ["resnet18", "lunit_vit_small_patch16_dino"])
def test_batch_features_equal_single_patch_features(name: str) -> None:
    """Encode a batch of 3 patches, then each alone: the rows agree (no cross-talk, pooling per patch)."""
    torch.manual_seed(0)
    spec = reg.get_spec(name)
    encoder = TorchEncoder(spec, device="cpu", precision="float32", model=spec.build().eval())
    patches = _seeded_patches(3, 256)
    batch = encoder.encode(patches)
    assert batch.shape == (3, spec.dim) and batch.dtype == np.float32
    singles = np.concatenate([encoder.encode(patches[i : i + 1]) for i in range(3)])
    np.testing.assert_allclose(batch, singles, rtol=1e-4, atol=1e-4)
    assert not np.allclose(batch[0], batch[1])
    assert encoder.encode(patches[:0]).shape == (0, spec.dim)


@pytest.mark.parametrize("name", ["resnet18", "lunit_vit_small_patch16_dino"])
def test_a_cpu_batch_runs_in_slices_with_the_whole_batch_features(name: str) -> None:
    """On a CPU a batch goes through the model `cpu_slice` patches at a time (the default `CPU_SLICE`): 7 patches in
    slices of 3 (the last one short) give the features of the whole batch at once, in order, at both precisions."""
    from atlaspatch_stream.backends.encoders.runtime import CPU_SLICE

    torch.manual_seed(0)
    spec = reg.get_spec(name)
    model = spec.build().eval()
    patches = _seeded_patches(7, 224)
    for precision in ("float32", "bfloat16"):
        encoder = TorchEncoder(spec, precision=precision, model=model)
        assert encoder.cpu_slice == CPU_SLICE
        encoder.cpu_slice = 3
        sliced = encoder.encode(patches)
        encoder.cpu_slice = 7
        np.testing.assert_allclose(sliced, encoder.encode(patches), rtol=1e-5, atol=1e-5)
        assert not np.allclose(sliced[0], sliced[1])
    with pytest.raises(ValueError, match="cpu_slice"):
        TorchEncoder(spec, model=model, cpu_slice=0)


def test_cls_plus_mean_pooling_skips_prefix_tokens() -> None:
    """Virchow/H0-mini pooling: concat(CLS, mean of patch tokens after the register tokens), on a tiny timm ViT."""
    import timm

    from atlaspatch_stream.backends.encoders.timm_family import cls_plus_mean

    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, reg_tokens=4, global_pool="", num_classes=0
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    tokens = model(x)
    pooled = cls_plus_mean(None)(model, x)
    assert model.num_prefix_tokens == 5 and pooled.shape == (2, 2 * 192)
    torch.testing.assert_close(pooled[:, :192], tokens[:, 0])
    torch.testing.assert_close(pooled[:, 192:], tokens[:, 5:].mean(1))
    torch.testing.assert_close(cls_plus_mean(1)(model, x)[:, 192:], tokens[:, 1:].mean(1))


def test_reduced_precision_runs_autocast_and_stays_close() -> None:
    """The precision -> autocast mapping per device; bf16 autocast on CPU stays close to float32 (cosine > 0.99)."""
    assert autocast_dtype("cpu", "float32") is None
    from atlaspatch_stream.cpu import native_bf16

    # float16 on a CPU: bf16 only where the CPU has it natively, else upstream's float32 (emulated bf16 is slow)
    assert autocast_dtype("cpu", "float16") is (torch.bfloat16 if native_bf16() else None)
    assert autocast_dtype("cuda", "float16") is torch.float16
    assert autocast_dtype("cuda:0", "bfloat16") is torch.bfloat16
    torch.manual_seed(0)
    spec = reg.get_spec("resnet18")
    model = spec.build().eval()
    patches = _seeded_patches(2, 224)
    exact = TorchEncoder(spec, precision="float32", model=model).encode(patches)
    half = TorchEncoder(spec, precision="bfloat16", model=model).encode(patches)
    assert half.dtype == np.float32
    cos = (exact * half).sum(1) / (np.linalg.norm(exact, axis=1) * np.linalg.norm(half, axis=1))
    assert (cos > 0.99).all()


def test_parse_feature_list_follows_upstream_rules() -> None:
    """Comma and/or whitespace separated, lowercased, order kept; unknown or repeated names are errors naming them."""
    available = ["resnet18", "uni_v1", "conch_v1"]
    assert reg.parse_feature_list("ResNet18, uni_v1  conch_v1", available) == (
        "resnet18",
        "uni_v1",
        "conch_v1",
    )
    assert reg.parse_feature_list("uni_v1,resnet18", available) == ("uni_v1", "resnet18")
    with pytest.raises(ConfigError, match="bogus"):
        reg.parse_feature_list("resnet18,bogus", available)
    with pytest.raises(ConfigError, match="duplicate.*resnet18"):
        reg.parse_feature_list("resnet18 RESNET18", available)
    with pytest.raises(ConfigError):
        reg.parse_feature_list(" , ", available)


def test_unknown_names_and_weights_for_unknown_names_are_config_errors() -> None:
    """get_spec and build_registry reject names that do not exist."""
    with pytest.raises(ConfigError, match="nope"):
        reg.get_spec("nope")
    with pytest.raises(ConfigError, match="nope"):
        reg.build_registry(
            device="cpu", precision="float32", weights={"nope": "x.pth"}, plugins=(), num_workers=0
        )  # type: ignore[dict-item]


def test_missing_extra_is_reported_before_any_slide(monkeypatch: pytest.MonkeyPatch) -> None:
    """A name whose optional package is not importable fails in prepare() with the pip line to fix it."""
    hf_names = [n for n in reg.available_encoders() if reg.get_spec(n).tier == "hf"]
    if not hf_names:
        pytest.skip("no hf family installed")
    monkeypatch.setitem(reg.EXTRAS, "hf", (("no_such_package_for_test",), "pip install something"))
    registry = reg.EncoderRegistry(device="cpu", precision="float32")
    with pytest.raises(MissingExtraError, match="pip install something"):
        registry.prepare([hf_names[0]])


def test_registry_creates_a_warm_weight_free_encoder() -> None:
    """build_registry -> prepare -> create('color_stats') needs no weights and encodes at once."""
    registry = reg.build_registry(device="cpu", precision="float32", weights={}, plugins=(), num_workers=0)
    registry.prepare(["color_stats"])
    encoder = registry.create("COLOR_STATS")
    out = encoder.encode(_seeded_patches(2, 64))
    assert out.shape == (2, 90)
    encoder.close()


def test_describe_encoders_lists_every_name_with_its_facts() -> None:
    """describe_encoders gives one row per built-in with dim, input size, tier, licence, gating and presence."""
    rows = {r["name"]: r for r in reg.describe_encoders()}
    assert set(rows) == set(reg.available_encoders())
    assert rows["uni_v1"]["gated"] is True and rows["uni_v1"]["weights_present"] is False
    assert rows["vit_h_14"]["input_size"] == 518 and rows["resnet18"]["dim"] == 512
    assert rows["color_stats"]["weights_present"] is True
    assert rows["chief-ctranspath"]["weights_source"] == "local file"


@pytest.mark.parametrize(
    ("shape", "size", "interpolation"),
    [((256, 256), (224, 224), "bilinear"), ((256, 256), (224, 224), "bicubic"), ((256, 256), (448, 448), "bicubic"),
     ((224, 224), (256, 256), "bilinear"), ((256, 300), (236, 276), "bicubic"), ((512, 512), (224, 224), "bicubic")],
)
def test_resize_is_bit_identical_to_pillow(shape: tuple[int, int], size: tuple[int, int], interpolation: str) -> None:
    """Our tensor resize reproduces `PIL.Image.resize` exactly, even on pure noise (the hardest case)."""
    from PIL import Image

    from atlaspatch_stream.backends.encoders.runtime import pil_like_resize
    from atlaspatch_stream.backends.encoders.spec import Preprocess

    images = np.random.default_rng(1).integers(0, 256, (2, *shape, 3), dtype=np.uint8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    pre = Preprocess(resize=size, crop=None, mean=(0, 0, 0), std=(1, 1, 1), interpolation=interpolation)
    ours = (pil_like_resize(x, size, pre) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    mode = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[interpolation]
    ref = np.stack([np.asarray(Image.fromarray(img).resize((size[1], size[0]), mode)) for img in images])
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("patch_size", [224, 256, 512])
def test_the_cpu_model_input_resized_by_pillow_equals_the_tensor_replay(patch_size: int) -> None:
    """On a CPU the encoder resizes and crops with Pillow itself (`pil_resized_crops`); for every distinct built-in
    transform its model input equals the tensor replay (`preprocess_batch`, the CUDA path) bit for bit, on noise."""
    patches = np.random.default_rng(2).integers(0, 256, (2, patch_size, patch_size, 3), dtype=np.uint8)
    x = torch.from_numpy(patches).permute(0, 3, 1, 2).float() / 255
    used = 0
    for name, pre in _unique_preprocess().items():
        spec = reg.get_spec(name)
        used += pil_resized_crops(patches, pre) is not None
        with torch.inference_mode():
            got = TorchEncoder(spec, model=torch.nn.Identity()).model_input(patches)
        assert torch.equal(got.contiguous(), preprocess_batch(x, pre).contiguous()), name
    assert used >= 3  # the Pillow path really ran
