"""Real forwards of every core encoder under ~350 M parameters against a plain re-enactment of upstream.

For each name: the upstream architecture is built here from its recipe (reference §5.1 / encoders.md Table A) and
given seeded random weights; our `spec.build()` must take that state dict strictly (same keys and shapes). Then
`TorchEncoder.encode` on two H&E-like uint8 patches is compared with the straightforward upstream path written in
this file: `PIL.Image.fromarray` -> torchvision `Resize` / `CenterCrop` / `ToTensor` / `Normalize` with the values
the reference gives for that name -> the upstream forward, with every non-trivial pooling (CLIP attention pool and
projection, CONCH poolers, CLS ++ mean, Swin mean) written out as arithmetic on the module's own parameters.

Encoders built from our own modules (CONCH v1 / v1.5, BiomedCLIP, CHIEF) have no library twin: the reference uses
the same module but its own pooling arithmetic.

Observed max |ours - upstream| / max |upstream| here (2 patches of 256 px; PIL's fixed-point resampling is the only
difference, <= 2/255 per pixel). Resize 256 of a 256 px patch is the identity, so those names differ by float noise:
  resnet18..152 2e-7..4e-7; vit_b_16 / vit_b_32 / vit_l_32 0; vit_l_16 2.5e-4; convnext_* 2.9e-4..4.5e-4;
  clip_rn50 5.9e-6, rn101 2.6e-5, rn50x4 1.0e-5, rn50x16 3.6e-5; clip_vit_b_32 1.4e-4, b_16 6.2e-5, l_14 6.3e-5,
  l_14_336 2.7e-5; uni_v1 6.1e-5; pathorchestra 6.6e-4; h0_mini 3.6e-4; lunit_resnet50_* 8.9e-5;
  lunit_vit_small_patch16 2.9e-4, patch8 1.6e-4; conch_v1 9.9e-5; conch_v15 6.4e-4; biomedclip 8.4e-5;
  chief-ctranspath 5.2e-4.
Names of >= 300 M parameters are marked `slow`: about 60 s of the file's ~100 s on two shared cores.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from atlaspatch_stream.backends.encoders import registry as reg
from atlaspatch_stream.backends.encoders.loading import has_unsaved_buffers
from atlaspatch_stream.backends.encoders.runtime import TorchEncoder
from atlaspatch_stream.testing.synthetic import draw_tissue

torch = pytest.importorskip("torch")
T = pytest.importorskip("torchvision.transforms")
timm = pytest.importorskip("timm")

LIMIT_M = 350.0  # parameters; bigger models take minutes on a 2-core CPU
SLOW_M = 300.0  # ViT-L class: 5-30 s each here, marked `slow` so `-m "not slow"` keeps the file near a minute
# Features may differ only through PIL's 8-bit resampling (<= 2/255 per pixel): relative to the feature scale.
RELATIVE_TOLERANCE = 1e-3
PATCH = 256
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
HOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
LUNIT = ((0.70322989, 0.53606487, 0.66096631), (0.21716536, 0.26081574, 0.20723464))

Module = Any
Pool = Callable[[Module, Any], Any]


@dataclass(frozen=True)
class Upstream:
    """Upstream's path for one name: its transform, its architecture (None: our own module) and its pooling."""

    resize: int
    crop: int | None
    interpolation: str
    stats: tuple[tuple[float, float, float], tuple[float, float, float]]
    build: Callable[[], Module] | None
    pool: Pool


# ------------------------------------------------------------------------------------------ upstream forwards


def _affine(x: Any, linear: Module) -> Any:
    """x W^T + b with a Linear's own parameters."""
    out = x @ linear.weight.T
    return out if linear.bias is None else out + linear.bias


def _attend(q: Any, k: Any, v: Any, heads: int) -> Any:
    """Multi-head softmax(q k^T / sqrt(d)) v on (B, N, C) tensors, heads split from C; returns (B, Nq, C)."""
    split = [t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v)]
    qh, kh, vh = split
    weights = (qh @ kh.transpose(-2, -1) / math.sqrt(qh.shape[-1])).softmax(dim=-1)
    return (weights @ vh).transpose(1, 2).flatten(2)


def model_call(model: Module, x: Any) -> Any:
    """Upstream calls the model with its head replaced by Identity: the model's own forward is the feature."""
    return model(x)


def cls_token(model: Module, x: Any) -> Any:
    """timm ViT with num_classes=0: token 0 of the final-normed tokens."""
    return model.forward_features(x)[:, 0]


def spatial_mean(model: Module, x: Any) -> Any:
    """timm ResNet with num_classes=0: global average of the last feature map."""
    return model.forward_features(x).mean(dim=(2, 3))


def clip_vit_projection(model: Module, x: Any) -> Any:
    """open_clip `encode_image` of a CLIP ViT: ln_post(CLS) @ proj (no bias, no L2 normalisation)."""
    return model.forward_features(x)[:, 0] @ model.head.weight.T


def clip_attention_pool(model: Module, x: Any) -> Any:
    """OpenAI CLIP ResNet's AttentionPool2d: the mean token (plus position) queries all tokens, then c_proj."""
    head = model.head
    tokens = model.forward_features(x).flatten(2).transpose(1, 2)
    tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1) + head.pos_embed
    q, k, v = _affine(tokens[:, :1], head.q), _affine(tokens, head.k), _affine(tokens, head.v)
    return _affine(_attend(q, k, v, head.num_heads), head.proj)[:, 0]


def h0_mini_pool(model: Module, x: Any) -> Any:
    """H0-mini: CLS ++ mean of the patch tokens (tokens 1-4 are registers)."""
    tokens = model.forward_features(x)
    return torch.cat([tokens[:, 0], tokens[:, 5:].mean(dim=1)], dim=-1)


def conch_v1_pool(model: Module, x: Any) -> Any:
    """CONCH v1 `encode_image(proj_contrast=False, normalize=False)`: 1-query attention pool (separate q/k/v
    projections of nn.MultiheadAttention, 8 heads) over layer-normed trunk tokens, query 0, LayerNorm."""
    pool = model.attn_pool_contrast
    attn = pool.attn
    context = pool.ln_k(model.trunk.forward_features(x))
    query = pool.ln_q(pool.query).unsqueeze(0).expand(x.shape[0], -1, -1)
    bias_q, bias_k, bias_v = attn.in_proj_bias.chunk(3)
    q = query @ attn.q_proj_weight.T + bias_q
    k = context @ attn.k_proj_weight.T + bias_k
    v = context @ attn.v_proj_weight.T + bias_v
    pooled = _affine(_attend(q, k, v, attn.num_heads), attn.out_proj)
    return model.ln_contrast(pooled[:, 0])


def conch_v15_pool(model: Module, x: Any) -> Any:
    """CONCH v1.5 (TITAN): CoCa attentional pooler (to_q / to_kv / to_out without bias, 8 heads), query 0, LN."""
    pool = model.attn_pool_contrast
    context = pool.ln_k(model.trunk.forward_features(x))
    q = (pool.ln_q(pool.query) @ pool.to_q.weight.T).unsqueeze(0).expand(x.shape[0], -1, -1)
    k, v = (context @ pool.to_kv.weight.T).chunk(2, dim=-1)
    pooled = _attend(q, k, v, 8) @ pool.to_out.weight.T
    return model.ln_contrast(pooled[:, 0])


def biomedclip_pool(model: Module, x: Any) -> Any:
    """open_clip TimmModel (pool '', proj 'linear'): the trunk's CLS through a bias-free projection."""
    return model.trunk.forward_features(x)[:, 0] @ model.proj.weight.T


def chief_pool(model: Module, x: Any) -> Any:
    """CHIEF-CTransPath: mean over H, W of the final-norm NHWC Swin features."""
    return model.forward_features(x).mean(dim=(1, 2))


# ------------------------------------------------------------------------------------------ upstream recipes


def torchvision_model(name: str, head: str) -> Callable[[], Module]:
    """torchvision architecture with its head replaced by Identity, as upstream does."""

    def build() -> Module:
        import torchvision.models as tvm

        model = getattr(tvm, name)(weights=None)
        setattr(model, head, torch.nn.Identity())
        return model

    return build


def timm_model(arch: str, **kwargs: Any) -> Callable[[], Module]:
    """A stock timm architecture with the kwargs of the model's hub config (Table A)."""
    return lambda: timm.create_model(arch, pretrained=False, **kwargs)


def h0_mini_model() -> Module:
    """H0-mini per Table A: ViT-B/14 reg4 DINOv2, SwiGLU, mlp ratio 4096/768, no pooling."""
    from timm.layers import SwiGLUPacked

    return timm.create_model(
        "vit_base_patch14_reg4_dinov2", pretrained=False, img_size=224, num_classes=0, global_pool="",
        init_values=1e-5, mlp_ratio=4096 / 768, mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU,
    )  # fmt: skip


def _torchvision_rows() -> dict[str, Upstream]:
    resizes = {
        "resnet18": 256, "resnet34": 256, "resnet50": 256, "resnet101": 256, "resnet152": 256,
        "convnext_tiny": 236, "convnext_small": 230, "convnext_base": 232, "convnext_large": 232,
        "vit_b_16": 256, "vit_b_32": 256, "vit_l_16": 242, "vit_l_32": 256,
    }  # fmt: skip
    heads = {"resnet": "fc", "convnext": "classifier", "vit": "heads"}
    rows = {}
    for name, size in resizes.items():
        head = next(attr for family, attr in heads.items() if name.startswith(family))
        rows[name] = Upstream(size, 224, "bilinear", IMAGENET, torchvision_model(name, head), model_call)
    return rows


def _clip_rows() -> dict[str, Upstream]:
    table = {
        "clip_rn50": ("resnet50_clip", 1024, 224), "clip_rn101": ("resnet101_clip", 512, 224),
        "clip_rn50x4": ("resnet50x4_clip", 640, 288), "clip_rn50x16": ("resnet50x16_clip", 768, 384),
        "clip_vit_b_32": ("vit_base_patch32_clip_quickgelu_224", 512, 224),
        "clip_vit_b_16": ("vit_base_patch16_clip_quickgelu_224", 512, 224),
        "clip_vit_l_14": ("vit_large_patch14_clip_quickgelu_224", 768, 224),
        "clip_vit_l_14_336": ("vit_large_patch14_clip_quickgelu_336", 768, 336),
    }  # fmt: skip
    return {
        name: Upstream(size, size, "bicubic", CLIP, timm_model(arch, num_classes=dim),
                       clip_vit_projection if arch.startswith("vit") else clip_attention_pool)
        for name, (arch, dim, size) in table.items()
    }  # fmt: skip


def _pathology_rows() -> dict[str, Upstream]:
    vit_l = {"num_classes": 0, "init_values": 1e-5, "dynamic_img_size": True}
    rows = {
        "uni_v1": Upstream(224, 224, "bicubic", IMAGENET,
                           timm_model("vit_large_patch16_224", img_size=224, patch_size=16, **vit_l), cls_token),
        # Resize(224) on the shortest side and no crop: a square patch becomes 224 x 224.
        "pathorchestra": Upstream(224, None, "bilinear", IMAGENET, timm_model("vit_large_patch16_224", **vit_l),
                                  cls_token),
        "h0_mini": Upstream(224, 224, "bicubic", HOPTIMUS, h0_mini_model, h0_mini_pool),
    }  # fmt: skip
    for tag in ("bt", "swav", "mocov2"):
        rows[f"lunit_resnet50_{tag}"] = Upstream(
            224, 224, "bicubic", LUNIT, timm_model("resnet50", num_classes=0), spatial_mean
        )
    for patch in (16, 8):
        rows[f"lunit_vit_small_patch{patch}_dino"] = Upstream(
            224, 224, "bicubic", LUNIT, timm_model(f"vit_small_patch{patch}_224", num_classes=0), cls_token
        )
    return rows


def _own_rows() -> dict[str, Upstream]:
    return {
        "conch_v1": Upstream(448, 448, "bicubic", CLIP, None, conch_v1_pool),
        "conch_v15": Upstream(448, 448, "bilinear", IMAGENET, None, conch_v15_pool),
        "biomedclip": Upstream(224, 224, "bicubic", CLIP, None, biomedclip_pool),
        "chief-ctranspath": Upstream(224, None, "bilinear", IMAGENET, None, chief_pool),
    }


UPSTREAM: dict[str, Upstream] = {**_torchvision_rows(), **_clip_rows(), **_pathology_rows(), **_own_rows()}


# ------------------------------------------------------------------------------------------ weights and inputs


def _params_m(name: str) -> float:
    spec = reg.get_spec(name)
    if spec.params_m is not None:
        return spec.params_m
    with torch.device("meta"):
        return sum(p.numel() for p in spec.build().parameters()) / 1e6


CORE = [n for n in reg.available_encoders() if reg.get_spec(n).tier == "core" and n != "color_stats"]
SMALL = [n for n in CORE if _params_m(n) < LIMIT_M]


def _case(name: str) -> Any:
    if name in SMALL and _params_m(name) >= SLOW_M:
        return pytest.param(name, marks=pytest.mark.slow)
    if name in SMALL:
        return name
    reason = f"{name}: {_params_m(name):.0f} M parameters (>= {LIMIT_M:.0f} M) - too slow for a real CPU forward here"
    return pytest.param(name, marks=pytest.mark.skip(reason=reason))


def seed_weights(model: Module, seed: int) -> Module:
    """Seeded random values in every saved tensor, scaled so activations stay O(1) through deep stacks.

    Zero-mean uniform values with these standard deviations: matrices 1/sqrt(fan_in); norm weights 1 +- 0.1;
    biases 0.02; BN running stats near (0, 1); tokens, position embeddings and layer scales 0.1. Uniform draws
    are several times faster than the libraries' own trunc-normal init over 300 M values, and as realistic here.
    """
    torch.manual_seed(seed)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if not value.is_floating_point():
                value.zero_()
            elif key.endswith("running_var"):
                value.uniform_(0.5, 1.5)
            elif key.endswith("weight") and value.ndim >= 2:
                _uniform(value, 0.0, (value.numel() / value.shape[0]) ** -0.5)
            elif key.endswith("weight"):
                _uniform(value, 1.0, 0.1)
            elif key.endswith("bias"):
                _uniform(value, 0.0, 0.02)
            else:
                _uniform(value, 0.0, 0.1)
    return model.eval()


def _uniform(value: Any, mean: float, std: float) -> None:
    half_width = std * math.sqrt(3.0)
    value.uniform_(mean - half_width, mean + half_width)


def upstream_model(name: str, seed: int = 0) -> Module:
    """Upstream's architecture for `name` with seeded weights (our own module where upstream has no library twin)."""
    spec = reg.get_spec(name)
    build = UPSTREAM[name].build or spec.build
    if spec.meta_load:
        with torch.device("meta"):
            model = build()
        assert not has_unsaved_buffers(model), name
        model = model.to_empty(device="cpu")
    else:  # Swin's relative-position index and attention mask are rebuilt only by a real construction
        model = build()
    seed_weights(model, seed)
    if name.startswith("clip_vit"):
        with torch.no_grad():
            model.head.bias.zero_()  # open_clip's projection has no bias; timm's filter writes zeros
    return model


def our_model(name: str, upstream: Module) -> Module:
    """`spec.build()` holding upstream's tensors: a strict load, so the architectures agree key for key."""
    spec = reg.get_spec(name)
    if UPSTREAM[name].build is None:
        return upstream
    with torch.device("meta"):
        model = spec.build()
    model.load_state_dict(upstream.state_dict(), strict=True, assign=True)
    return model.eval()


def tissue_patches(n: int = 2) -> np.ndarray:
    """H&E-like uint8 patches: stained blobs, dark nuclei and fine texture, fully covered by tissue."""
    return np.stack([draw_tissue(PATCH, PATCH, seed=10 + i, tissue="full")[0] for i in range(n)])


def upstream_transform(row: Upstream) -> Callable[[Any], Any]:
    """torchvision transforms on a PIL image, as upstream composes them."""
    mode = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}[
        row.interpolation
    ]
    steps: list[Any] = [T.Resize(row.resize, interpolation=mode, antialias=True)]
    if row.crop is not None:
        steps.append(T.CenterCrop(row.crop))
    steps += [T.ToTensor(), T.Normalize(*row.stats)]
    return T.Compose(steps)


def upstream_features(name: str, model: Module, patches: np.ndarray) -> Any:
    """Upstream's features: one PIL image per patch through the transform, stacked, forward, pooled."""
    from PIL import Image

    row = UPSTREAM[name]
    transform = upstream_transform(row)
    batch = torch.stack([transform(Image.fromarray(p)) for p in patches])
    with torch.inference_mode():
        return row.pool(model, batch).flatten(1)


# ------------------------------------------------------------------------------------------ tests


def test_every_small_core_encoder_has_an_upstream_reference() -> None:
    """The core tier minus color_stats, below the size limit, is exactly the set of names this file re-enacts;
    a new core name cannot slip past the parity test."""
    assert set(SMALL) == set(UPSTREAM)
    assert len(SMALL) >= 30


@pytest.mark.parametrize("name", [_case(n) for n in CORE])
def test_encode_matches_upstream_transform_and_pooling(name: str) -> None:
    """Build upstream's architecture with seeded random weights; our spec.build() takes the state dict strictly;
    TorchEncoder (float32, CPU) encodes two H&E-like 256 px patches.

    Invariants: width = spec.dim = upstream's; features finite and not constant; every value within 1e-3 of the
    feature scale of upstream's PIL/torchvision path (resize, crop, ToTensor, Normalize, forward, pooling).
    """
    spec = reg.get_spec(name)
    upstream = upstream_model(name)
    encoder = TorchEncoder(spec, device="cpu", precision="float32", model=our_model(name, upstream))
    patches = tissue_patches()
    ours = torch.from_numpy(encoder.encode(patches))
    ref = upstream_features(name, upstream, patches)
    assert ours.shape == ref.shape == (len(patches), spec.dim)
    assert torch.isfinite(ours).all() and ours.std() > 0
    scale = ref.abs().max().item()
    error = (ours - ref).abs().max().item()
    print(f"{name}: max |ours - upstream| / max |upstream| = {error / scale:.2e} (scale {scale:.3g})")
    assert error <= RELATIVE_TOLERANCE * scale, (name, error / scale)
    # The features follow the image content by far more than the error: a model or pooling that ignored its
    # input (or a wrong token) could not pass by comparing two near-constant vectors.
    between = (ref[0] - ref[1]).abs().max().item()
    assert between > max(RELATIVE_TOLERANCE * scale, 10 * error), (name, between, error)
